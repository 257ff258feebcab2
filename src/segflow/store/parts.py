"""Tables kept as a folder of hashed part files: the index and the catalogue.

A table of one row per item lives in ``STORE/NAME/`` as :data:`BUCKETS` Parquet files
(``part-XX.parquet``), an item's part chosen by a stable hash of its id, so a run that
touches a few items rewrites a few parts, never the whole table. Each part is written aside
and renamed into place (one PUT on an object store): a reader sees a part before or after,
never half of one. pandas, pyarrow, geopandas and DuckDB read the folder as one table.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from segflow.store.fs import fresh_fs
from segflow.store.lock import is_local, local_path

BUCKETS = 256
_READERS = 8  # parts read at once (local reads overlap their decoding; remote ones their GETs)


def bucket_of(item_id: str) -> int:
    """The part an item's row lives in (a stable hash of its id).

    Examples
    --------
    >>> bucket_of("tile_0001") == bucket_of("tile_0001") < BUCKETS
    True
    """
    return zlib.crc32(item_id.encode("utf-8")) % BUCKETS


def part_name(bucket: int) -> str:
    return f"part-{bucket:02x}.parquet"


def folder_of(store: str, name: str) -> str:
    return f"{str(store).rstrip('/')}/{name}"


def part_buckets(store: str, name: str) -> list[int]:
    """The buckets that have a part file in ``STORE/NAME/`` (none when it is not a folder)."""
    fs, folder = fresh_fs(folder_of(store, name))
    if not fs.isdir(folder):
        return []
    found = []
    for entry in fs.ls(folder, detail=False):
        base = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".parquet"):
            try:
                found.append(int(base[5:-8], 16))
            except ValueError:
                continue
    return sorted(found)


def read_part(store: str, name: str, bucket: int) -> Any | None:
    """One part as a ``pyarrow.Table``, or None when it has none."""
    import pyarrow.parquet as pq

    url = f"{folder_of(store, name)}/{part_name(bucket)}"
    if is_local(url):
        try:
            return pq.read_table(local_path(url))
        except FileNotFoundError:
            return None
    fs, path = fresh_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def read_parts(store: str, name: str, buckets: Sequence[int] | None = None) -> list[Any]:
    """The parts of ``buckets`` (every part when None) as ``pyarrow.Table`` objects, read
    :data:`_READERS` at a time; missing ones left out."""
    wanted = part_buckets(store, name) if buckets is None else list(buckets)
    found = read_part_map(store, name, wanted)
    return [found[b] for b in wanted if found[b] is not None]


def read_part_map(store: str, name: str, buckets: Sequence[int]) -> dict[int, Any]:
    """Each of ``buckets`` with its part (None where it has none), :data:`_READERS` at a
    time."""
    return dict(zip(buckets, _each(lambda b: read_part(store, name, b), buckets), strict=True))


def write_parts(store: str, name: str, tables: Mapping[int, Any]) -> None:
    """Write each bucket's table as its part (:func:`write_part`), :data:`_READERS` at a
    time: Arrow encodes and the disk or the object store writes without holding the GIL,
    so the fixed cost of the parts a large compaction touches overlaps."""
    _each(lambda bucket: write_part(store, name, bucket, tables[bucket]), list(tables))


def _each(call: Callable[[int], Any], buckets: Sequence[int]) -> list[Any]:
    if len(buckets) < 2:
        return [call(b) for b in buckets]
    with ThreadPoolExecutor(min(_READERS, len(buckets))) as pool:
        return list(pool.map(call, buckets))


def write_part(store: str, name: str, bucket: int, table: Any) -> None:
    """Write one part: aside and renamed into place (one PUT remotely)."""
    import pyarrow.parquet as pq

    target = f"{folder_of(store, name)}/{part_name(bucket)}"
    if is_local(target):
        final = local_path(target)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        aside = os.path.join(os.path.dirname(final), f".{part_name(bucket)}.{os.getpid()}.tmp")
        try:
            pq.write_table(table, aside)
            os.replace(aside, final)
        finally:
            if os.path.exists(aside):
                os.remove(aside)
        return
    fs, path = fresh_fs(target)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs.pipe_file(path, buffer.getvalue())

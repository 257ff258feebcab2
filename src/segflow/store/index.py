"""The collection index: one Parquet row per item (status, error, counts, hashes).

During a run each finished item appends one JSON line to its run's record file
(``STORE/.segflow/records/RUN.jsonl``, flushed and fsynced): an append, never a
read-modify-write of a growing table, so recording an item costs the same at 100,000 items
as at 10, and a killed run keeps the records of the items it finished. The records are
compacted into ``index.parquet/`` when the run ends (or by the next run), and the rows of
the items they name into the catalogue (:mod:`segflow.store.catalogue`); :func:`read_index`
reads both, a later record replacing an earlier row of the same id.

``index.parquet/`` is a folder of hashed part files (:mod:`segflow.store.parts`, as the
catalogue): compaction rewrites the parts of the items it folds in, so adding one item to
a store of 100,000 writes one part (some 400 rows), not the whole index. pandas, pyarrow
and DuckDB read the folder as one table. An older store's single file is read as it is and
moved into parts by its next run (:func:`migrate_index`).

Every path goes through fsspec, so a store on ``s3://`` (or ``gs://``, ``az://``) keeps its
index exactly as a local one. Object stores have no append: there each call writes its own
small record object (``RUN.<time>.jsonl``), and each part is replaced in one PUT.
"""

from __future__ import annotations

import array
import contextlib
import json
import math
import os
import pathlib
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pandas.api.extensions import ExtensionDtype

from segflow.errors import StoreError
from segflow.faults import fault_point
from segflow.store.fs import fresh_fs
from segflow.store.lock import bookkeeping_path, is_local, local_path
from segflow.store.names import INDEX_NAME, check_reserved_names
from segflow.store.parts import (
    bucket_of,
    part_buckets,
    read_part,
    read_part_map,
    read_parts,
    write_parts,
)

_appending = threading.Lock()  # one record file per run, appended to by the run's items
STATUSES = ("done", "failed", "skipped")
# Core columns and their dtypes; rows may add more columns, which are kept as given.
_TEXT = pd.StringDtype()
INDEX_COLUMNS: dict[str, ExtensionDtype] = {
    "id": _TEXT,
    "source": _TEXT,
    "status": _TEXT,
    "error": _TEXT,
    "shape": _TEXT,
    "object_count": pd.Int64Dtype(),
    "area_p05": pd.Float64Dtype(),
    "area_p50": pd.Float64Dtype(),
    "area_p95": pd.Float64Dtype(),
    "seconds": pd.Float64Dtype(),
    "config_hash": _TEXT,
    "config_name": _TEXT,
    "warning": _TEXT,
    "model_hash": _TEXT,
    "code_version": _TEXT,
    "fingerprint": _TEXT,
    # What the item's committed group held when its row was recorded (segflow.store.stamps):
    # a matching stamp lets the planner skip without opening the group.
    "commit_id": _TEXT,
    "commit_stamp": _TEXT,
}
COMMIT_COLUMNS = ("commit_id", "commit_stamp")


def read_index(store: str | os.PathLike[str]) -> pd.DataFrame:
    """The collection index of ``store``: its parts (``STORE/index.parquet/``), with the
    rows of the records not compacted yet (a later record replacing an earlier row of the
    same id); an empty frame with the core columns for a new store. An older store's single
    ``index.parquet`` file is read as it is (its next run migrates it: :func:`migrate_index`).

    Every reader of the index (the planner, ``segflow run``'s and ``segflow evaluate``'s
    checks, exports, tasks, tests) goes through this function.

    Examples
    --------
    >>> list(read_index("no_such_store.zarr").columns)[:3]
    ['id', 'source', 'status']
    """
    frame = _stored_index(store)
    records = [row for _, rows in _record_files(store) for row in rows]
    if not records:
        return frame
    latest = {str(row["id"]): row for row in records}  # a later record wins
    return _overlay(frame, _frame_of(latest.values()))


def index_table(store: str | os.PathLike[str]) -> Any | None:
    """The rows :func:`read_index` gives, as one ``pyarrow.Table`` read from the index's
    parts without pandas (the core columns first, sorted by id, nulls where pandas gives
    missing values: NaN, and whole numbers as floats in an extra column with gaps, as
    :func:`read_index` and ``pyarrow.Table.from_pandas`` make them); None where the store
    has records not compacted yet, an older single-file index, or no parts (read those with
    :func:`read_index`). Reading 10^5 rows this way holds their Arrow buffers only, not a
    frame of Python strings and its copies."""
    import pyarrow as pa

    path = _join(store, INDEX_NAME)
    fs, inner = _fs(path)
    if fs.isdir(inner) and fs.exists(f"{inner}/zarr.json"):
        check_reserved_names(str(store))  # an item group took the index's name: say so
    if _record_names(store) or any(fs.isfile(_fs(p)[1]) for p in (path, _legacy_aside(store))):
        return None
    try:
        parts = read_parts(str(store), INDEX_NAME)
    except Exception as exc:
        raise StoreError(f"cannot read index '{path}' ({type(exc).__name__}: {exc})") from exc
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="permissive")
    columns = {name: _as_pandas_gives(table, name) for name in INDEX_COLUMNS}
    columns.update({n: _as_pandas_gives(table, n) for n in table.column_names if n not in columns})
    return pa.table(columns).sort_by("id")


def _as_pandas_gives(table: Any, name: str) -> Any:
    """Column ``name`` of ``table`` with the values ``read_index`` then
    ``Table.from_pandas`` give it (core columns in their dtypes)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    core = {"string": pa.large_string(), "Int64": pa.int64(), "Float64": pa.float64()}.get(
        str(INDEX_COLUMNS.get(name))
    )
    if name not in table.column_names:
        return pa.nulls(len(table), core or pa.large_string())
    column = table.column(name)
    if core is not None:
        column = column.cast(core)
    elif pa.types.is_integer(column.type) and column.null_count:
        column = column.cast(pa.float64())  # pandas has no gaps in whole numbers
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column


def _stored_index(store: str | os.PathLike[str]) -> pd.DataFrame:
    """The compacted rows: an older single file (or the copy a migration set aside), then
    the parts over it."""
    path = _join(store, INDEX_NAME)
    fs, inner = _fs(path)
    if fs.isdir(inner) and fs.exists(f"{inner}/zarr.json"):
        check_reserved_names(str(store))  # an item group took the index's name: say so
    frame = _empty_index()
    try:
        for single in (inner, _fs(_legacy_aside(store))[1]):
            if fs.isfile(single):
                with fs.open(single, "rb") as handle:
                    frame = _overlay(frame, _with_core_columns(pd.read_parquet(handle)))
        parts = read_parts(str(store), INDEX_NAME)
    except Exception as exc:
        raise StoreError(f"cannot read index '{path}' ({type(exc).__name__}: {exc})") from exc
    if parts:
        import pyarrow as pa

        table = pa.concat_tables(parts, promote_options="permissive")
        frame = _overlay(frame, _with_core_columns(table.to_pandas()))
    return frame


def _overlay(frame: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the rows of ``new`` replacing those of the same id, sorted by id."""
    if frame.empty:
        return new.sort_values("id", ignore_index=True)
    kept = frame[~frame["id"].isin(new["id"])]
    merged = new if kept.empty else pd.concat([kept, new], ignore_index=True)
    return _with_core_columns(merged).sort_values("id", ignore_index=True)


def _frame_of(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    return _with_core_columns(pd.DataFrame([_normalise_row(row) for row in rows]))


def append_records(
    store: str | os.PathLike[str], run_id: str, rows: Sequence[dict[str, Any]]
) -> None:
    """Append ``rows`` to this run's record file, durably (flushed and fsynced).

    Call after an item's data is committed. Rows are checked as :func:`write_index` checks
    them; :func:`compact_index` folds the records into ``index.parquet``.

    Examples
    --------
    >>> import tempfile
    >>> store = tempfile.mkdtemp()
    >>> append_records(store, "run-1", [{"id": "a", "status": "done"}])
    >>> read_index(store).loc[0, "status"]
    'done'
    """
    _check_rows(rows)
    lines = "".join(json.dumps(_jsonable(row), default=str) + "\n" for row in rows)
    if is_local(str(store)):
        path = pathlib.Path(local_path(bookkeeping_path(str(store), "records", f"{run_id}.jsonl")))
        path.parent.mkdir(parents=True, exist_ok=True)
        with _appending, open(path, "a", encoding="utf-8") as handle:  # items of several threads
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
    else:  # no appends on object stores: one small object per call, ordered by its name
        name = f"{run_id}.{time.time_ns():020d}.{uuid.uuid4().hex[:8]}.jsonl"
        fs, inner = _fs(bookkeeping_path(str(store), "records", name))
        fs.pipe_file(inner, lines.encode())
    fault_point("record-written")


def compact_index(store: str | os.PathLike[str]) -> set[str]:
    """Fold every record file into the index's parts and remove them; return the ids of
    the items they recorded (none without records: the index is left as it is).

    Only the parts holding those items are rewritten (:mod:`segflow.store.parts`), so a run
    that adds one item to a store of 100,000 writes one part of the index and one of the
    catalogue. An older single-file index is migrated first (:func:`migrate_index`).
    Call while holding the store's lock (no run appends meanwhile).

    The records are folded in chunks of whole parts (:data:`CHUNK_ROWS` rows), read back
    from a local temporary copy, so a compaction holds one chunk, not every record: its
    memory does not grow with the run's items. A compaction killed between chunks leaves
    the records, and the next one folds them all again (a row replaced by itself).
    """
    migrate_index(store)
    names = _record_names(store)
    if not names:
        return set()
    folded: set[str] = set()
    with _record_chunks(store, names) as (chunks, columns):
        stac = _stac_update(store)
        for rows in chunks:  # whole parts at a time: memory does not grow with the records
            _merge_rows(store, _chunk_frame(rows, columns))
            _update_catalogue(store, rows, stac=stac)
            folded.update(str(row["id"]) for row in rows)
        if folded:  # the Collection, once, after every part
            _update_catalogue(store, [], stac=stac, finish=True)
    fault_point("index-compact")
    _remove_records(store, [(name, None) for name in names])
    return folded


def migrate_index(store: str | os.PathLike[str]) -> str | None:
    """Move an older store's single ``index.parquet`` file into parts; return a line saying
    so (for the run's log), or None when there was nothing to move.

    The file is first set aside in the store's bookkeeping folder, where :func:`read_index`
    still reads it, so a kill at any point loses no row; the parts are written from it, and
    it is removed last. Call while holding the store's lock.
    """
    path, aside = _join(store, INDEX_NAME), _legacy_aside(store)
    fs, inner = _fs(path)
    aside_inner = _fs(aside)[1]
    if fs.isfile(inner):
        fs.makedirs(aside_inner.rsplit("/", 1)[0], exist_ok=True)
        if is_local(path):
            os.replace(local_path(path), local_path(aside))
        else:  # no rename on object stores: a copy, then the original removed
            fs.copy(inner, aside_inner)
            fs.rm_file(inner)
    if not fs.isfile(aside_inner):
        return None
    with fs.open(aside_inner, "rb") as handle:
        frame = _with_core_columns(pd.read_parquet(handle))
    if not frame.empty:
        _merge_rows(store, frame)
    fs.rm_file(aside_inner)
    return (
        f"store {store}: index.parquet is now a folder of part files ({len(frame)} row(s) "
        "moved from the single file), so a run rewrites only the parts of the items it "
        "touched; pandas, pyarrow and DuckDB read the folder as before"
    )


def _legacy_aside(store: str | os.PathLike[str]) -> str:
    return bookkeeping_path(str(store), "index-single-file.parquet")


def write_index(store: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> str:
    """Merge ``rows`` into ``STORE/index.parquet``, keyed by item id, and return its path.

    A row replaces the stored row with the same ``id``; other stored rows are kept. Rows are
    sorted by id. A ``shape`` given as a tuple is stored as text (``"(718, 791)"``). The file
    is replaced atomically, but concurrent writers are not merged: write from one process
    (the flow), not from workers.

    Parameters
    ----------
    store : str or path
        Path or URL of the output store.
    rows : sequence of dict
        One dict per item with at least ``id`` and ``status`` (``"done"``, ``"failed"`` or
        ``"skipped"``); any of the core columns and extra keys.

    Raises
    ------
    ValueError
        If a row has no ``id``, repeats an id, or has an unknown ``status``.

    Examples
    --------
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_store.zarr"
    >>> path = write_index(store, [{"id": "a", "status": "done"}])
    >>> read_index(store).loc[0, "status"]
    'done'
    """
    _check_rows(rows)
    migrate_index(store)
    latest = {str(row["id"]): row for _, found in _record_files(store) for row in found}
    latest.update({str(row["id"]): dict(row) for row in rows})  # the rows given win
    _merge_rows(store, _frame_of(latest.values()))
    _update_catalogue(store, list(latest.values()))
    _remove_records(store, _record_files(store))  # now folded into the table
    return _join(store, INDEX_NAME)


def _stac_update(store: str | os.PathLike[str]) -> Any:
    from segflow.store.stac import StacUpdate

    try:
        return StacUpdate(str(store))
    except Exception as exc:
        raise StoreError(
            f"cannot write the catalogue of '{store}' ({type(exc).__name__}: {exc})"
        ) from exc


def _update_catalogue(
    store: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    *,
    stac: Any = None,
    finish: bool = False,
) -> None:
    """Bring the catalogue's rows of ``rows`` up to date (:mod:`segflow.store.catalogue`),
    before the records that name them are removed; with ``stac`` (a
    :class:`~segflow.store.stac.StacUpdate` shared by the chunks of one compaction) its
    Collection is left to the call with ``finish``."""
    from segflow.store.catalogue import update_catalogue

    try:
        if rows:
            update_catalogue(str(store), [_normalise_row(row) for row in rows], stac=stac)
        if finish and stac is not None:
            stac.finish({})
    except Exception as exc:
        raise StoreError(
            f"cannot write the catalogue of '{store}' ({type(exc).__name__}: {exc})"
        ) from exc


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    ids = [str(row.get("id")) for row in rows]
    for row in rows:
        if not row.get("id"):
            raise ValueError(f"index row {row!r} has no `id`")
        if row.get("status") not in STATUSES:
            raise ValueError(
                f"index row '{row['id']}': `status` {row.get('status')!r} must be one of {STATUSES}"
            )
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"index rows repeat ids {repeated}")


def _merge_rows(store: str | os.PathLike[str], new: pd.DataFrame) -> None:
    """Replace the stored rows of the items in ``new`` (one row each), part by part.

    Every part keeps one schema (the union of the columns ever written, each with one
    type), so the folder reads as one table: rows bringing a new column, or a type an older
    column must widen to, rewrite every part once; otherwise only the touched parts are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path = _join(store, INDEX_NAME)
    try:
        fresh = pa.Table.from_pandas(new, preserve_index=False).replace_schema_metadata(None)
        ids = [str(i) for i in fresh.column("id").to_pylist()]
        buckets = pa.array([bucket_of(i) for i in ids], pa.int32())
        existing = part_buckets(str(store), INDEX_NAME)
        schema = _part_schema(store, existing)
        unified = fresh.schema if schema is None else _unify(schema, fresh.schema)
        touched = set(buckets.to_pylist())
        if schema is not None and not unified.equals(schema):
            touched |= set(existing)  # one schema for every part
        olds = read_part_map(str(store), INDEX_NAME, sorted(touched))
        merged = {}
        for bucket, old in olds.items():
            part = fresh.filter(pc.equal(buckets, bucket))
            if old is not None:
                stale = pc.is_in(old.column("id"), value_set=part.column("id"))
                part = pa.concat_tables(
                    [part, old.filter(pc.invert(stale))], promote_options="permissive"
                )
            merged[bucket] = _conform(part, unified).sort_by("id")
        write_parts(str(store), INDEX_NAME, merged)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot write index '{path}' ({type(exc).__name__}: {exc})") from exc


def _part_schema(store: str | os.PathLike[str], buckets: Sequence[int]) -> Any:
    """The schema the index's parts share (read from the first one), or None without any."""
    for bucket in buckets[:1]:
        table = read_part(str(store), INDEX_NAME, bucket)
        if table is not None:
            return table.schema
    return None


def _unify(old: Any, new: Any) -> Any:
    """The schema holding both: columns of either, a column's type widened where needed
    (``null`` to a type, ``int64`` to ``double``); a column that is text in one and a
    number in the other cannot be kept in one table, and is named."""
    import pyarrow as pa

    try:
        return pa.unify_schemas([old, new], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        clash = [f.name for f in new if f.name in old.names and old.field(f.name).type != f.type]
        raise StoreError(
            f"index rows give column(s) {clash} another type than the stored index has ({exc})"
        ) from exc


def _conform(table: Any, schema: Any) -> Any:
    """``table`` with exactly ``schema``'s columns, in its order and types (absent ones
    null)."""
    import pyarrow as pa

    columns = [
        table.column(field.name).cast(field.type)
        if field.name in table.column_names
        else pa.nulls(len(table), field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _record_files(store: str | os.PathLike[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every run's record file, oldest first, with its complete lines (a line cut short by
    a kill is left out)."""
    fs, _ = _fs(bookkeeping_path(str(store), "records"))
    out = []
    for name in _record_names(store):
        rows = [row for line in _record_lines(fs, name) if (row := _record(line)) is not None]
        out.append((name, rows))
    return out


def _record_names(store: str | os.PathLike[str]) -> list[str]:
    """Every run's record file, oldest first."""
    fs, folder = _fs(bookkeeping_path(str(store), "records"))
    if not fs.isdir(folder):
        return []
    listed = fs.find(folder, detail=True)
    files = sorted(
        (info for name, info in listed.items() if name.endswith(".jsonl")),
        key=lambda info: (_modified(info), info["name"]),
    )
    return [str(info["name"]) for info in files]


def _record_lines(fs: Any, name: str) -> Iterator[bytes]:
    """The lines of one record file, read as a stream (a file holds a run's records)."""
    with fs.open(name, "rb") as handle:
        yield from handle


def _record(line: bytes | str) -> dict[str, Any] | None:
    """One record line's row, or None for a line cut short by a kill (or not a row)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and row.get("id") else None


# Records folded into the index and the catalogue at once by :func:`compact_index` (whole
# parts at a time, so a chunk may hold a part more): what a compaction holds in memory.
CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class _Columns:
    """The extra columns of a compaction's rows, as one frame of all of them would have
    them: in the order they first appear, and those some row lacks (or holds None for),
    whose whole numbers pandas would keep as floats."""

    order: list[str]
    sparse: frozenset[str]


@contextlib.contextmanager
def _record_chunks(
    store: str | os.PathLike[str], names: Sequence[str]
) -> Iterator[tuple[Iterator[list[dict[str, Any]]], _Columns]]:
    """The latest record of each item the record files ``names`` hold (a later record of an
    id replacing an earlier one), in chunks of whole parts of about :data:`CHUNK_ROWS` rows,
    and their columns over all chunks (:class:`_Columns`).

    The records are copied once into a local temporary file, and only each record's part,
    place and length are kept (14 bytes a record), so folding 10^6 records holds one chunk
    of rows at a time, not 10^6 dicts."""
    import numpy as np

    fs, _ = _fs(bookkeeping_path(str(store), "records"))
    with tempfile.TemporaryFile() as spill:
        buckets, starts, sizes = array.array("H"), array.array("q"), array.array("I")
        end = 0
        for name in names:
            for line in _record_lines(fs, name):
                if (row := _record(line)) is None:
                    continue
                buckets.append(bucket_of(str(row["id"])))
                starts.append(end)
                sizes.append(len(line))
                end += spill.write(line)
        order = np.argsort(np.frombuffer(buckets, np.uint16), kind="stable")  # file order kept
        places = (spill, order, buckets, starts, sizes)
        columns = _fold_columns(_chunks_of(*places))
        yield (rows for rows, _ in _chunks_of(*places)), columns


def _chunks_of(
    spill: Any, order: Any, buckets: Any, starts: Any, sizes: Any
) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """The rows of :func:`_record_chunks`, read back from ``spill`` a chunk at a time, each
    with the place of its id's first record."""
    first = 0
    while first < len(order):
        last = min(first + CHUNK_ROWS, len(order))
        while last < len(order) and buckets[order[last]] == buckets[order[last - 1]]:
            last += 1  # a part is never split between chunks
        latest: dict[str, dict[str, Any]] = {}
        places: dict[str, int] = {}
        for k in order[first:last]:  # in file order: a later record wins
            spill.seek(starts[k])
            row = json.loads(spill.read(sizes[k]))
            latest[str(row["id"])] = row
            places.setdefault(str(row["id"]), int(k))
        yield list(latest.values()), list(places.values())
        first = last


def _fold_columns(chunks: Iterable[tuple[list[dict[str, Any]], list[int]]]) -> _Columns:
    """The extra columns of every chunk's rows, as :class:`_Columns` says."""
    first: dict[str, tuple[int, int]] = {}  # key -> (its first row's place, place in the row)
    given: dict[str, int] = {}  # key -> rows holding a value
    total = 0
    for rows, places in chunks:
        total += len(rows)
        for row, place in zip(rows, places, strict=True):
            for at, key in enumerate(row):
                first[key] = min(first.get(key, (place, at)), (place, at))
                given[key] = given.get(key, 0) + (row[key] is not None)
    order = [key for key in sorted(first, key=first.__getitem__) if key not in INDEX_COLUMNS]
    return _Columns(order, frozenset(k for k in order if given[k] < total))


def _chunk_frame(rows: Sequence[dict[str, Any]], columns: _Columns) -> pd.DataFrame:
    """One chunk's rows as the frame of every chunk's rows would hold them: each extra
    column in its place (None where the chunk has none of it), whole numbers as floats
    where a row of another chunk lacks them, so each part gets the types one fold gives."""
    frame = pd.DataFrame([_normalise_row(row) for row in rows])
    for name in columns.order:
        if name not in frame.columns:
            frame[name] = pd.Series([None] * len(frame), dtype=object, index=frame.index)
        elif name in columns.sparse and pd.api.types.is_integer_dtype(frame[name].dtype):
            frame[name] = frame[name].astype("float64")
    return _with_core_columns(
        frame[[*[c for c in frame.columns if c in INDEX_COLUMNS], *columns.order]]
    )


def _remove_records(store: str | os.PathLike[str], files: Sequence[tuple[str, Any]]) -> None:
    fs, _ = _fs(bookkeeping_path(str(store), "records"))
    for name, _rows in files:
        try:
            fs.rm_file(name)
        except FileNotFoundError:
            pass


def _modified(info: dict[str, Any]) -> float:
    """A listing entry's modification time in seconds (local mtime, S3 LastModified)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return 0.0


def _join(store: str | os.PathLike[str], name: str) -> str:
    return f"{str(store).rstrip('/')}/{name}"


def _fs(path: str) -> tuple[Any, str]:

    return fresh_fs(path)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: missing numbers become null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def _normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("shape"), tuple | list):
        out["shape"] = str(tuple(int(n) for n in out["shape"]))
    return out


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in INDEX_COLUMNS.items()})


def _with_core_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add missing core columns, cast them to their dtypes, and put them first."""
    frame = frame.copy()
    for name, dtype in INDEX_COLUMNS.items():
        if name not in frame.columns:
            frame[name] = pd.Series([pd.NA] * len(frame), dtype=dtype, index=frame.index)
        else:
            frame[name] = frame[name].astype(dtype)
    extra = [c for c in frame.columns if c not in INDEX_COLUMNS]
    return frame[[*INDEX_COLUMNS, *extra]]

"""The collection's vectors: ``STORE/vectors.parquet/``, one part file per item.

A dataset folder of ``part-ITEM.parquet`` files, each an item's ``vectors.parquet`` with an
``item`` column first, read whole by ``geopandas.read_parquet(STORE + "/vectors.parquet")``
(or ``pyarrow.dataset``; files whose names start with ``_`` or ``.`` are not parts). A run
writes the parts of the items it did only, each from that item's own table: the work is
that of the items, never a rebuild from every item's file. ``_segflow.json`` in the folder
holds the collection's CRS: a GeoParquet column has one, so when an item of another CRS
comes, the folder is removed rather than left to misdescribe it (each item's own table
stays; :func:`segflow.store.vectors.read_vectors` reads them one CRS at a time).

Stores written before kept one ``vectors.parquet`` file rebuilt by every run; their next
run replaces it by the folder (one rebuild) and says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from segflow.store.fs import fresh_fs
from segflow.store.lock import is_local, local_path
from segflow.store.names import VECTORS_NAME

COLLECTION_NAME = VECTORS_NAME
CRS_FILE = "_segflow.json"


def compact_vectors(
    store: str, *, refresh_only: bool = False, items: Sequence[str] | None = None
) -> tuple[str | None, str]:
    """Bring ``STORE/vectors.parquet/`` up to date for ``items`` (the items a run did;
    default every item group): a committed item with a vector table gets its part, any
    other loses it. With ``refresh_only`` (a run without ``output.vectors``) nothing happens
    unless the folder exists. Returns the folder's path (None when there is none) and a
    line for the run's log.

    Raises
    ------
    OSError, pyarrow.ArrowException
        When an item's table cannot be read or a part written; the folder is removed first
        (it would be stale).
    """
    root = str(store).rstrip("/")
    fs, path = fresh_fs(root)
    target = f"{path}/{COLLECTION_NAME}"
    migrating = fs.isfile(target)
    if refresh_only and not fs.exists(target):
        return None, ""
    try:
        if migrating:
            fs.rm(target)
            items = None
        return _update(fs, root, target, items, migrating)
    except Exception:
        if fs.exists(target):
            fs.rm(target, recursive=True)  # better none than stale (the caller says why)
        raise


def _update(
    fs: Any, root: str, target: str, items: Sequence[str] | None, migrating: bool
) -> tuple[str | None, str]:
    from segflow.store.commit import read_commit
    from segflow.store.metadata import item_groups
    from segflow.store.versions import resolve_item

    ids = item_groups(root) if items is None else sorted(set(items))
    folder_crs = _folder_crs(fs, target)
    written = 0
    for item_id in ids:
        table = f"{resolve_item(root, item_id)}/{VECTORS_NAME}"
        if not (read_commit(root, item_id) and fs.exists(fresh_fs(table)[1])):
            _remove_part(fs, target, item_id)
            continue
        crs = _write_part(fs, target, item_id, table, local=is_local(root))
        folder_crs = crs if folder_crs is None else folder_crs
        if crs != folder_crs:
            fs.rm(target, recursive=True)
            return None, (
                f"the items of {root} have different CRSs ({item_id}'s differs): "
                f"{COLLECTION_NAME} removed (read each item's vectors.parquet, or "
                "segflow.store.vectors.read_vectors with item_ids of one CRS)"
            )
        written += 1
    if not _parts(fs, target):
        if fs.exists(target):
            fs.rm(target, recursive=True)
        return None, f"no item of {root} has vectors: {COLLECTION_NAME} not kept"
    fs.pipe_file(f"{target}/{CRS_FILE}", json.dumps({"crs": folder_crs}).encode())
    moved = " (was one file, now a folder of one part per item)" if migrating else ""
    return f"{root}/{COLLECTION_NAME}", (
        f"{COLLECTION_NAME}: the vectors of {written} item(s) written{moved}"
    )


def _folder_crs(fs: Any, target: str) -> Any:
    try:
        return json.loads(fs.cat_file(f"{target}/{CRS_FILE}"))["crs"]
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _parts(fs: Any, target: str) -> list[str]:
    return fs.glob(f"{target}/part-*.parquet") if fs.isdir(target) else []


def _remove_part(fs: Any, target: str, item_id: str) -> None:
    part = f"{target}/part-{item_id}.parquet"
    if fs.exists(part):
        fs.rm(part)


def _write_part(fs: Any, target: str, item_id: str, table_url: str, *, local: bool) -> Any:
    """Write the item's part (its table, ``item`` column first, its ``geo`` metadata
    kept), aside then renamed; return the CRS its GeoParquet metadata names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tfs, tpath = fresh_fs(table_url)
    with tfs.open(tpath, "rb") as handle:
        table = pq.read_table(handle)
    geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
    crs = geo.get("columns", {}).get("geometry", {}).get("crs")
    column = pa.array([item_id] * table.num_rows, pa.string())
    table = table.add_column(0, pa.field("item", pa.string()), column)
    name = f"part-{item_id}.parquet"
    if local:  # ``target`` is the path on ``fs``: a local one here
        os.makedirs(local_path(target), exist_ok=True)
        aside = os.path.join(local_path(target), f".{name}.tmp")
        pq.write_table(table, aside)
        os.replace(aside, os.path.join(local_path(target), name))
    else:
        fs.makedirs(target, exist_ok=True)
        with fs.open(f"{target}/{name}", "wb") as handle:
            pq.write_table(table, handle)
    return crs

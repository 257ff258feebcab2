"""What an export needs to know of a committed item: its grid, CRS and arrays.

Everything comes from the store itself (the item group's attributes and its commit
record), so an export needs neither the config nor the input files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from segflow.errors import StoreError
from segflow.io.base import ItemInfo

# Item ids named in a "not in the store" line before the rest are counted.
IDS_SHOWN = 5


@dataclass(frozen=True)
class StoredItem:
    """One committed item of a store.

    ``transform`` maps pixel corners ``(col, row)`` to the item's CRS (rasterio order
    ``(a, b, c, d, e, f)``); without a CRS it maps to the item's physical coordinates,
    the identity for plain pixel images. ``arrays`` maps each output array to its dtype.
    ``group`` is the item's version group under ``store`` (resolved when the item was
    listed, so an export reads one version whatever commits meanwhile; the item id for
    an older store's item folder).
    """

    store: str
    id: str
    source: str
    shape: tuple[int, ...]
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    arrays: dict[str, str]
    group: str = ""

    def array_path(self, name: str) -> str:
        return f"{self.group or self.id}/{name}"


def stored_items(
    store: str, item_ids: Sequence[str] | None = None, *, as_of: Any = None
) -> list[StoredItem]:
    """The committed items of ``store`` (``item_ids``, or every done item of its index),
    each at the version it has now, or had at ``as_of`` (a tag, run id or name, or time:
    :func:`segflow.open_store`).

    Raises
    ------
    StoreError
        When the store has no committed item (not a segflow store, or never run), a newer
        segflow wrote it or the item, or an item named is not committed there (the line
        names it and some of the store's items).
    """
    from segflow.store.commit import check_store_format, read_commit
    from segflow.store.versions import resolve_item

    root = str(store).rstrip("/")
    check_store_format(root)  # a newer segflow's store: refused in one line
    if as_of is not None:
        return _stored_as_of(root, item_ids, as_of)
    done = _committed_ids(root)
    if not done:
        raise StoreError(f"store '{root}' has no segmented item to export (run segflow first)")
    wanted = list(item_ids) if item_ids else done
    records = {i: read_commit(root, i) for i in wanted}
    missing = [i for i in wanted if records[i] is None]
    if not item_ids:  # an index row without its commit record: a group being rewritten
        wanted = [i for i in wanted if records[i] is not None]
    elif missing:
        shown = ", ".join(done[:IDS_SHOWN]) + (" ..." if len(done) > IDS_SHOWN else "")
        raise StoreError(
            f"--item {', '.join(missing)}: not a committed item of '{root}' "
            f"({len(done)} item(s): {shown})"
        )
    return [_stored_at(resolve_item(root, i), i, records[i] or {}) for i in wanted]


def _stored_at(path: str, item_id: str, record: dict[str, Any]) -> StoredItem:
    """The item ``item_id`` read from the group at ``path`` (its version's folder)."""
    parent, group = path.rsplit("/", 1)
    return replace(_stored_item(parent, group, record), id=item_id)


def _stored_as_of(root: str, item_ids: Sequence[str] | None, as_of: Any) -> list[StoredItem]:
    """The items of ``root`` as they were at ``as_of`` (all of them then, or ``item_ids``)."""
    from segflow.store.commit import read_group_commit
    from segflow.store.opened import open_store

    try:
        opened = open_store(root, as_of=as_of)
    except ValueError as error:
        raise StoreError(f"--as-of: {error}") from None
    then = list(opened)
    missing = [i for i in item_ids or () if i not in then]
    if missing or not then:
        raise StoreError(
            f"store '{root}' kept no version of {', '.join(missing) or 'any item'} "
            f"committed by {opened.as_of}"
        )
    paths = {i: opened.item_path(i) for i in item_ids or then}
    return [_stored_at(p, i, read_group_commit(p, i) or {}) for i, p in paths.items()]


def _committed_ids(root: str) -> list[str]:
    """The done items of the store's index, or (a store written by the engine alone, which
    keeps no index) the item groups that hold a commit record."""
    from segflow.engine.collection import index_rows
    from segflow.store.commit import read_commit
    from segflow.store.fs import fresh_fs

    try:
        rows = index_rows(root)
    except FileNotFoundError:
        rows = []
    done = sorted(str(r["id"]) for r in rows if r.get("status") == "done")
    if done:
        return done
    fs, path = fresh_fs(root)
    if not fs.isdir(path):
        return []
    names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return sorted(n for n in names if not n.startswith(".") and read_commit(root, n))


def _stored_item(root: str, item_id: str, record: dict[str, Any]) -> StoredItem:
    import zarr

    from segflow.store.vectors import item_transform

    group = zarr.open_group(root, path=item_id, mode="r", use_consolidated=False)
    attrs: dict[str, Any] = dict(group.attrs)
    arrays = {str(k): str(v) for k, v in dict(record.get("arrays", {})).items()}
    first = next(iter(arrays), None)
    shape = (
        tuple(zarr.open_array(root, path=f"{item_id}/{first}", mode="r").shape)
        if first
        else tuple(attrs.get("source_shape", ()))
    )
    spatial = tuple(a for a in attrs.get("source_axes", ("y", "x")) if a != "c")
    info = ItemInfo(
        id=item_id,
        path=str(attrs.get("source", "")),
        format=attrs.get("format", "array"),
        shape=shape[-len(spatial) :],
        dtype=str(attrs.get("source_dtype", "uint8")),
        axes=spatial,
        spacing=tuple(attrs.get("spacing") or (1.0,) * len(spatial)),
        origin=tuple(attrs.get("origin") or (0.0,) * len(spatial)),
        crs_wkt=attrs.get("crs"),
        transform=tuple(attrs["transform"]) if attrs.get("transform") else None,
    )
    transform = item_transform(info) if len(spatial) == 2 else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    return StoredItem(
        store=root,
        id=item_id,
        group=item_id,
        source=info.path,
        shape=info.shape,
        crs_wkt=info.crs_wkt,
        transform=transform,
        arrays=arrays,
    )


def open_integer_array(item: StoredItem, array: str, needed_for: str) -> Any:
    """``item``'s 2-D integer ``array`` (labels, a mask, a class map), opened for reading;
    anything else is refused in one line saying what ``needed_for`` takes."""
    import numpy as np
    import zarr

    if array not in item.arrays:
        raise StoreError(
            f"item {item.id!r}: no array {array!r} to export (it has {sorted(item.arrays)})"
        )
    source = zarr.open_array(item.store, path=item.array_path(array), mode="r")
    if source.ndim != 2 or not np.issubdtype(source.dtype, np.integer):
        raise StoreError(
            f"item {item.id!r}: array {array!r} is {source.ndim}-D {source.dtype}; {needed_for}"
        )
    return source

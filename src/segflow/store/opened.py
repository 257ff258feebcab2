"""Reading a store downstream: :func:`open_store`, the catalogue and items opened lazily."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

from segflow.errors import StoreError


class OpenedStore(Mapping[str, Any]):
    """A segflow store opened for reading: a mapping of committed item id -> xarray Dataset.

    Nothing is read until asked: ``store["tile_0042"]`` opens that item's group alone (its
    consolidated metadata: one small file, whatever the number of items; arrays stay lazy
    Dask arrays), :meth:`row` reads the one catalogue part that holds an item's row, and
    :attr:`catalogue` reads the whole catalogue once (a GeoDataFrame, one row per item).
    Iterating or ``len`` go through the catalogue's committed items.

    Each item opens the version committed when it is opened (the target of the link
    ``STORE/ITEM``, on an object store the version its pointer names:
    :mod:`segflow.store.versions`): an open Dataset keeps reading that
    version whatever runs commit meanwhile; open it again to see a later one. With
    ``as_of`` (a time key from :func:`segflow.store.versions.resolve_as_of`) items open as
    they were then, and iterating lists the items that had a version then; the catalogue
    (:attr:`catalogue`, :meth:`row`, :meth:`select`) still describes the latest state.

    Use :func:`open_store` to make one.
    """

    def __init__(self, path: str, *, as_of: str | None = None) -> None:
        self.path = str(path).rstrip("/")
        self.as_of = as_of
        self._catalogue: Any = None

    def __repr__(self) -> str:
        shown = "" if self.as_of is None else f", as_of={self.as_of!r}"
        return f"OpenedStore({self.path!r}{shown})"

    @property
    def catalogue(self) -> Any:
        """The catalogue (:mod:`segflow.store.catalogue`) as a GeoDataFrame, read once.

        Always the latest state, also with ``as_of``: the catalogue keeps one row per item,
        that of its latest commit. A row whose ``version`` differs from the version
        :meth:`item_path` reads describes a commit after ``as_of``."""
        if self._catalogue is None:
            from segflow.store.catalogue import read_catalogue

            self._catalogue = read_catalogue(self.path)
        return self._catalogue

    def select(self, bbox: tuple[float, float, float, float]) -> Any:
        """The catalogue rows of the georeferenced items whose footprint meets ``bbox``
        (west, south, east, north in degrees), read through the parts' bbox column."""
        from segflow.store.catalogue import read_catalogue

        return read_catalogue(self.path, bbox=bbox)

    def row(self, item_id: str) -> Any:
        """The catalogue row of one item (a Series), reading only the part that holds it.

        Raises
        ------
        KeyError
            When the catalogue has no row for ``item_id``.
        """
        from segflow.store.catalogue import bucket_of, read_part

        part = read_part(self.path, bucket_of(item_id))
        found = None if part is None else part[part["id"] == item_id]
        if found is None or found.empty:
            raise KeyError(f"store '{self.path}' has no catalogue row for item '{item_id}'")
        return found.iloc[0]

    def open(self, item_id: str, **kwargs: Any) -> Any:
        """The item's group as a lazy xarray Dataset (``xarray.open_zarr`` of the version
        ``STORE/ITEM`` links to now, or the one of ``as_of``; ``kwargs`` go to it).

        Raises
        ------
        KeyError
            When the store has no committed group ``item_id`` (then, with ``as_of``).
        """
        import xarray as xr

        return xr.open_zarr(self.item_path(item_id), **kwargs)

    def item_path(self, item_id: str) -> str:
        """The path of the item's version this store reads (see :meth:`open`): give it to
        other tools (``zarr.open_group``, a Dask job) to read the same version.

        Raises
        ------
        KeyError
            When the store has no committed group ``item_id`` (then, with ``as_of``).
        """
        from segflow.store.commit import read_group_commit
        from segflow.store.versions import path_as_of, resolve_item

        if self.as_of is not None:
            found = path_as_of(self.path, item_id, self.as_of)
            if found is None:
                raise KeyError(
                    f"store '{self.path}' kept no version of item '{item_id}' committed by "
                    f"{self.as_of} (not segmented then, or pruned)"
                )
            return found
        path = resolve_item(self.path, item_id)
        if read_group_commit(path, item_id) is None:
            raise KeyError(
                f"store '{self.path}' has no committed item '{item_id}' (not segmented, failed "
                "before its first commit, or being rewritten)"
            )
        return path

    def __getitem__(self, item_id: str) -> Any:
        return self.open(item_id)

    def _committed(self) -> list[str]:
        if self.as_of is not None:
            from segflow.store.versions import items_as_of

            return items_as_of(self.path, self.as_of)
        paths = self.catalogue["path"]
        return sorted(str(p) for p in paths[paths.notna()])

    def __iter__(self) -> Iterator[str]:
        return iter(self._committed())

    def __len__(self) -> int:
        return len(self._committed())


def open_store(path: str, *, as_of: str | dt.datetime | None = None) -> OpenedStore:
    """Open the segflow store at ``path`` (a folder or fsspec URL) for reading.

    Each item opened keeps reading the version committed when it was opened. With
    ``as_of`` (a tag, a run id or name, or a time: a ``datetime`` or an ISO string, naive
    meaning UTC) the items read as they were then (local and object stores keep their
    versions: :mod:`segflow.store.versions`); the catalogue still shows the latest state (see
    :attr:`OpenedStore.catalogue`).

    Returns an :class:`OpenedStore`: ``.catalogue`` (a GeoDataFrame, one row per item:
    status, fingerprints, object count, extent, footprint, group path), ``store[ITEM]`` (an
    item as a lazy xarray Dataset), ``.row(ITEM)`` and ``.select(bbox)``.

    Raises
    ------
    StoreError
        When ``path`` is not a segflow store, or a newer segflow wrote it
        (:class:`segflow.store.commit.StoreFormatError`; an item a newer segflow committed
        is refused when opened).
    ValueError
        When ``as_of`` names no tag, run or time of the store.

    Examples
    --------
    >>> import tempfile
    >>> from segflow.store.commit import prepare_store
    >>> path = tempfile.mkdtemp() + "/out.zarr"
    >>> prepare_store(path)
    >>> store = open_store(path)
    >>> len(store), list(store.catalogue.columns[:3])
    (0, ['id', 'source', 'status'])
    """
    from segflow.store.commit import check_store_format, is_segflow_store

    if not is_segflow_store(path):
        raise StoreError(f"'{path}' is not a segflow store (no segflow marker in its zarr.json)")
    check_store_format(path)
    if as_of is None:
        return OpenedStore(path)
    from segflow.store.versions import resolve_as_of

    return OpenedStore(path, as_of=resolve_as_of(path, as_of))

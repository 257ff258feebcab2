"""Zarr mechanics of the output store: item groups, output arrays, region writers.

What the groups and arrays *say* (CF coordinates, grid mapping, class coordinates: what
xarray and rioxarray read) lives in :mod:`segflow.store.cf`; the OME-Zarr view of the same
item in :mod:`segflow.store.ome`.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from segflow.errors import StoreError
from segflow.faults import fault_point
from segflow.io.base import ItemInfo
from segflow.store.cf import array_attributes, item_attributes, write_coordinates


@dataclass(frozen=True)
class ArraySpec:
    """Name, dtype and storage layout of one output array of an item (spatial axes only).

    Parameters
    ----------
    name : str
        Array name inside the item group (``"labels"``, ``"probabilities"``).
    dtype : str
        NumPy dtype name.
    chunks : tuple of int
        Chunk shape, one entry per spatial axis.
    shards : tuple of int, optional
        Shard shape (a multiple of ``chunks`` per axis); unsharded when ``None``.
    fill_value : int or float
        Value of never-written chunks.
    attrs : dict
        Extra array attributes.
    classes : tuple of str
        For a multi-channel array (a probability map): the name of each channel. The array
        then has a leading ``class`` axis, chunked whole (so a block's write still owns
        whole storage units), and the group a ``class`` coordinate with these names.
    categories : tuple of (int, str, str or None)
        For a class map (one channel of class ids): ``(value, name, colour)`` of each
        class. The array's attributes then hold them (CF ``flag_values`` and
        ``flag_meanings``, and ``class_names``, ``class_colors``), and the group has the
        coordinates ``NAME_value`` (the ids) with ``NAME_name`` (and ``NAME_color``) along
        it, which xarray shows with the array.

    Examples
    --------
    >>> ArraySpec("labels", "uint32", chunks=(256, 256), shards=(1024, 1024)).shards
    (1024, 1024)
    """

    name: str
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    fill_value: int | float = 0
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    classes: tuple[str, ...] = ()
    categories: tuple[tuple[int, str, str | None], ...] = ()


def storage_unit(spec: ArraySpec) -> tuple[int, ...]:
    """The shape one writer must own whole: the shard when sharded, else the chunk.

    Examples
    --------
    >>> storage_unit(ArraySpec("labels", "uint8", chunks=(64, 64), shards=(256, 256)))
    (256, 256)
    >>> storage_unit(ArraySpec("labels", "uint8", chunks=(64, 64)))
    (64, 64)
    """
    return spec.shards if spec.shards is not None else spec.chunks


def create_item_group(store: str, info: ItemInfo, *, overwrite: bool = True) -> None:
    """Create group ``STORE/ITEM_ID`` with coordinates and metadata of ``info``.

    The group holds one 1-D coordinate array per spatial axis (pixel/voxel centres,
    ``origin + i * spacing``: CRS units for geo items, physical units for volumes), a 0-d
    ``spatial_ref`` grid-mapping variable with ``crs_wkt``/``spatial_ref``/``GeoTransform`` for
    geo items, and group attributes with the source path, spacing, units, origin, affine, CRS,
    nodata and fingerprint. Any consolidated metadata at the store root (an older store's)
    is dropped, since it would no longer describe the store.

    Parameters
    ----------
    store : str
        Path or URL of the Zarr v3 store (created if missing).
    info : ItemInfo
        The item.
    overwrite : bool
        Replace an existing group (and every array in it); otherwise an existing group is an
        error.

    Raises
    ------
    StoreError
        If the group exists and ``overwrite`` is false, or the store cannot be written.

    Examples
    --------
    >>> from segflow.io import open_item
    >>> info = open_item("tests/data/aerial/RGB.byte.tif").info
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_store.zarr"
    >>> create_item_group(store, info)
    >>> sorted(zarr.open_group(store, path=info.id).array_keys())
    ['spatial_ref', 'x', 'y']
    """
    try:
        _drop_consolidated(store)
        root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
        if not overwrite and info.id in root:
            raise StoreError(
                f"group '{info.id}' already exists in store '{store}'; pass overwrite=True to "
                "replace it"
            )
        group = root.create_group(info.id, overwrite=overwrite, attributes=item_attributes(info))
        write_coordinates(group, info)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"cannot create group '{info.id}' in store '{store}' ({type(exc).__name__}: {exc})"
        ) from exc


def create_output_array(
    store: str, info: ItemInfo, spec: ArraySpec, *, overwrite: bool = True
) -> None:
    """Create the output array ``STORE/ITEM_ID/NAME`` over the item's spatial axes.

    Call after :func:`create_item_group`, at any time (a labels dtype is known only after
    stitching). The array has ``dimension_names`` equal to the spatial axes, so xarray
    attaches the group's coordinate arrays; geo arrays also name ``spatial_ref`` as their
    ``grid_mapping`` and in ``coordinates``, so rioxarray finds the CRS.

    Parameters
    ----------
    store : str
        Path or URL of the Zarr v3 store.
    info : ItemInfo
        The item; its ``spatial_shape`` is the array shape.
    spec : ArraySpec
        Name, dtype, chunks, optional shards, fill value and attributes.
    overwrite : bool
        Replace an existing array of that name; otherwise it is an error.

    Raises
    ------
    StoreError
        If ``spec`` does not fit the item (wrong number of axes, shards not a multiple of
        chunks), the item group is missing, or the array exists and ``overwrite`` is false.

    Examples
    --------
    >>> from segflow.io import open_item
    >>> info = open_item("tests/data/aerial/RGB.byte.tif").info
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_store.zarr"
    >>> create_item_group(store, info)
    >>> spec = ArraySpec("labels", "uint16", chunks=(128, 128), shards=(256, 256))
    >>> create_output_array(store, info, spec)
    >>> zarr.open_array(store, path="RGB.byte/labels").shape
    (718, 791)
    """
    _validate_spec(info, spec)
    try:
        _drop_consolidated(store, info.id)
        root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
        if info.id not in root:
            raise StoreError(
                f"array '{spec.name}': group '{info.id}' does not exist in store '{store}'; "
                "call create_item_group first"
            )
        attrs, dims = array_attributes(root[info.id], info, spec)
        lead = (len(spec.classes),) if spec.classes else ()
        zarr.create_array(
            store,
            name=f"{info.id}/{spec.name}",
            shape=(*lead, *info.spatial_shape),
            dtype=spec.dtype,
            chunks=(*lead, *spec.chunks),
            shards=None if spec.shards is None else (*lead, *spec.shards),
            fill_value=spec.fill_value,
            dimension_names=dims,
            attributes=attrs,
            overwrite=overwrite,
            zarr_format=3,
        )
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"cannot create array '{info.id}/{spec.name}' in store '{store}' "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def consolidate_store(store: str, items: Collection[str] | None = None) -> None:
    """Consolidate the metadata of each item group into its own ``zarr.json``.

    Afterwards ``xarray.open_zarr(f"{store}/{item_id}")`` opens without warnings with one
    metadata read, at any number of items: the root ``zarr.json`` keeps no consolidated
    copy (one an older segflow wrote is removed; :mod:`segflow.store.metadata`). A run's
    commit consolidates each item already; this is for groups written directly
    (notebooks, tests). ``items`` limits it to those groups (default: every item group).
    A committed version (``STORE/ITEM`` a link, :mod:`segflow.store.versions`) is never
    written: its commit consolidated it.
    :func:`create_item_group` and :func:`create_output_array` drop an item's copy when they
    change its group, so a stale copy never hides or misdescribes an array.

    Raises
    ------
    StoreError
        If the store cannot be read or written.

    Examples
    --------
    >>> from segflow.io import ArrayReader
    >>> info = ArrayReader(np.zeros((4, 4)), "demo").info
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_consolidated.zarr"
    >>> create_item_group(store, info)
    >>> consolidate_store(store)
    >>> sorted(zarr.open_consolidated(f"{store}/demo").metadata.consolidated_metadata.metadata)
    ['x', 'y']
    """
    from segflow.store import metadata
    from segflow.store.versions import current_version

    try:
        if metadata.read_node(store) is None:
            raise StoreError(f"'{store}' has no zarr.json: not a Zarr store")
        for item_id in metadata.item_groups(store) if items is None else items:
            if current_version(store, item_id) is not None:
                continue  # a committed version: immutable, consolidated by its commit
            node = metadata.read_node(f"{str(store).rstrip('/')}/{item_id}")
            if node is not None and node.get("node_type") == "group":
                metadata.consolidate_item(store, item_id)
        metadata.mark_migrated(store)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"cannot consolidate store '{store}' ({type(exc).__name__}: {exc})"
        ) from exc


class ZarrRegionWriter:
    """Writes spatial regions of one output array; picklable, opened lazily once per process.

    Every write must cover whole storage units (shards, or chunks when unsharded), except
    where a region ends at the array edge: that is what makes concurrent block writes safe.

    Parameters
    ----------
    store : str
        Path or URL of the Zarr store.
    item_id : str
        Item group name.
    name : str
        Array name inside the group.

    Examples
    --------
    >>> from segflow.io import ArrayReader
    >>> info = ArrayReader(np.zeros((300, 300)), "demo").info
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_writer.zarr"
    >>> create_item_group(store, info)
    >>> create_output_array(store, info, ArraySpec("labels", "uint16", (256, 256)))
    >>> writer = ZarrRegionWriter(store, "demo", "labels")
    >>> writer.write((slice(0, 256), slice(0, 256)), np.ones((256, 256), dtype=np.uint16))
    >>> int(writer.read((slice(0, 2), slice(0, 2))).sum())
    4
    """

    def __init__(self, store: str, item_id: str, name: str) -> None:
        self.store = store
        self.item_id = item_id
        self.name = name
        self._array: Any = None
        self._pid = -1

    def write(self, region: tuple[slice, ...], data: np.ndarray) -> None:
        """Write ``data`` (shaped like ``region``) into ``region`` of the array.

        Raises
        ------
        ValueError
            If ``data`` does not have the region's shape.
        StoreError
            If the region does not cover whole storage units.
        """
        fault_point("block-write")  # in the worker: a worker killed mid-item
        array = self._open()
        if array.ndim == len(region) + 1:  # a class axis, stored whole: every class at once
            region = (slice(None), *region)
        bounded = _bound_region(array.shape, region, self._label)
        expected = tuple(s.stop - s.start for s in bounded)
        if data.shape != expected:
            raise ValueError(
                f"array '{self._label}': `data` shape {data.shape} does not match region "
                f"{_format_region(bounded)} of shape {expected}"
            )
        unit = array.shards if array.shards is not None else array.chunks
        for sl, size, step in zip(bounded, array.shape, unit, strict=True):
            if sl.start % step or (sl.stop % step and sl.stop != size):
                raise StoreError(
                    f"array '{self._label}': region {_format_region(bounded)} does not cover "
                    f"whole storage units {tuple(unit)} of shape {tuple(array.shape)}"
                )
        array[bounded] = data

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` of the array (every class of an array with a class axis)."""
        array = self._open()
        if array.ndim == len(region) + 1:
            region = (slice(None), *region)
        return np.asarray(array[_bound_region(array.shape, region, self._label)])

    @property
    def _label(self) -> str:
        return f"{self.item_id}/{self.name}"

    def _open(self) -> Any:
        if self._array is None or self._pid != os.getpid():
            try:
                # Every storage unit is written, empty or not, so a finished item can be
                # checked for completeness by counting them (store.commit.check_array).
                self._array = zarr.open_array(
                    self.store, path=self._label, mode="r+", zarr_format=3
                ).with_config({"write_empty_chunks": True})
            except Exception as exc:
                raise StoreError(
                    f"cannot open array '{self._label}' in store '{self.store}' "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            self._pid = os.getpid()
        return self._array

    def __getstate__(self) -> dict[str, object]:
        return {"store": self.store, "item_id": self.item_id, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._array = None
        self._pid = -1

    def __repr__(self) -> str:
        return f"ZarrRegionWriter({self.store!r}, {self.item_id!r}, {self.name!r})"


def _validate_spec(info: ItemInfo, spec: ArraySpec) -> None:
    ndim = len(info.spatial_shape)
    label = f"{info.id}/{spec.name}"
    if len(spec.chunks) != ndim or any(c < 1 for c in spec.chunks):
        raise StoreError(
            f"array '{label}': chunks {spec.chunks} must be {ndim} positive sizes, one per "
            f"spatial axis {info.spatial_axes}"
        )
    if spec.shards is None:
        return
    if len(spec.shards) != ndim or any(
        s < 1 or s % c for s, c in zip(spec.shards, spec.chunks, strict=True)
    ):
        raise StoreError(
            f"array '{label}': shards {spec.shards} must be a multiple of chunks {spec.chunks} "
            f"along every spatial axis {info.spatial_axes}"
        )


def _bound_region(
    shape: tuple[int, ...], region: tuple[slice, ...], label: str
) -> tuple[slice, ...]:
    if len(region) != len(shape):
        raise ValueError(
            f"array '{label}': `region` has {len(region)} slices for an array of shape {shape}"
        )
    bounded = []
    for sl, size in zip(region, shape, strict=True):
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"array '{label}': `region` slice {sl} must have step 1")
        bounded.append(slice(start, max(start, stop)))
    return tuple(bounded)


def _format_region(region: tuple[slice, ...]) -> str:
    return "(" + ", ".join(f"{s.start}:{s.stop}" for s in region) + ")"


def _drop_consolidated(store: str, item_id: str | None = None) -> None:
    """Remove consolidated metadata that would go stale as nodes are added: the root's
    (an older store's) and, with ``item_id``, that item group's."""
    from segflow.store.metadata import drop_consolidated

    drop_consolidated(store)
    if item_id is not None:
        drop_consolidated(f"{str(store).rstrip('/')}/{item_id}")

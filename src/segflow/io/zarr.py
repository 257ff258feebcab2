"""Zarr arrays (v3 or v2, local or fsspec URL) and in-memory numpy arrays as items."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from segflow.errors import ItemReadError
from segflow.io._common import (
    check_region,
    fingerprint_tree,
    is_url,
    raise_read_error,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import ItemInfo, LazyHandleReader

# Dimension names read as the channel axis; every other name is spatial.
CHANNEL_NAMES = frozenset({"c", "band", "bands", "channel", "channels"})


class ZarrReader(LazyHandleReader):
    """Windowed reads of a Zarr array as ``(c, (z), y, x)``, slicing the array directly.

    Axes come from the array's ``dimension_names`` (v3), its ``_ARRAY_DIMENSIONS`` attribute
    (v2 written by xarray) or OME-Zarr ``multiscales`` axes. A dimension named ``c``,
    ``band`` or ``channel`` is the channel axis, wherever it sits; the remaining dimensions are
    read as ``(z), y, x`` in their stored order. Without names, 2-D arrays are ``(y, x)`` and
    3-D arrays ``(z, y, x)``. An OME-Zarr group opens its full-resolution level with the
    scale and translation of that level as spacing and origin; anything else has spacing 1.0
    in ``"pixel"`` units.

    The array handle is opened lazily once per process; a pickled reader is its paths and
    :class:`ItemInfo`.

    Parameters
    ----------
    store_path : str
        Local path or fsspec URL of the Zarr store.
    item_id : str, optional
        Item id; defaults to the store's folder name without ``.zarr``.
    array_path : str, optional
        Path of the array (or OME-Zarr group) inside the store; the store root by default.

    Raises
    ------
    ItemReadError
        If the path holds no Zarr array, or its dimensions cannot be mapped to axes.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_reader.zarr"
    >>> _ = zarr.create_array(store, data=np.arange(12).reshape(3, 4),
    ...                       dimension_names=("y", "x"), overwrite=True)
    >>> reader = ZarrReader(store)
    >>> reader.info.id, reader.info.axes
    ('doc_reader', ('y', 'x'))
    >>> reader.read((slice(1, 3), slice(0, 2)))
    array([[[4, 5],
            [8, 9]]])
    """

    info: ItemInfo

    def __init__(
        self, store_path: str, item_id: str | None = None, *, array_path: str | None = None
    ) -> None:
        self.store_path = strip_file_scheme(store_path)
        label = self.store_path if array_path is None else f"{self.store_path}/{array_path}"
        try:
            node = zarr.open(store=self.store_path, path=array_path or "", mode="r")
        except Exception as exc:
            raise_read_error(label, "not a readable Zarr array", exc)
        names, spacing, origin, units = None, None, None, "pixel"
        if isinstance(node, zarr.Group):
            array_path, names, spacing, origin, units = _read_ome_level(node, label, array_path)
            node = zarr.open_array(store=self.store_path, path=array_path, mode="r")
        self.array_path = array_path or ""
        if names is None:
            names = _read_dimension_names(node)
        if item_id is None:
            stem = label.rstrip("/").rsplit("/", 1)[-1]
            item_id = sanitize_id(stem[: -len(".zarr")] if stem.endswith(".zarr") else stem)
        self.info, self._order = _make_array_info(
            item_id,
            label,
            "zarr",
            tuple(int(n) for n in node.shape),
            str(node.dtype),
            names,
            spacing=spacing,
            origin=origin,
            units=units,
            fingerprint=_fingerprint_zarr(label, node),
        )
        self.path = self.store_path

    def open_handle(self) -> Any:
        return zarr.open_array(store=self.store_path, path=self.array_path, mode="r")

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(c, *region_shape)``."""
        bounded = check_region(self.info, region)
        with wrap_read_errors(self.info.path, "cannot read Zarr chunks"):
            return _read_ordered(self.handle(), self._order, self.info, bounded)

    def __repr__(self) -> str:
        return f"ZarrReader({self.store_path!r}, item_id={self.info.id!r})"


class ArrayReader:
    """An in-memory array as an item, for the notebook API.

    Parameters
    ----------
    array : numpy.ndarray
        2-D, 3-D or 4-D array.
    item_id : str
        Item id.
    axes : sequence of str, optional
        Name of every axis, from ``c``, ``z``, ``y``, ``x`` in any order. By default 2-D is
        ``(y, x)`` and 3-D ``(z, y, x)``, or ``(c, ...)`` when ``channel_axis=0``.
    channel_axis : int, optional
        Position of the channel axis when ``axes`` is not given.

    Raises
    ------
    ValueError
        If ``axes`` does not name every dimension, or the array is not 2-D to 4-D.

    Examples
    --------
    >>> import numpy as np
    >>> reader = ArrayReader(np.zeros((3, 5, 6), dtype=np.uint8), "rgb", channel_axis=0)
    >>> reader.info.axes, reader.read((slice(0, 2), slice(0, 2))).shape
    (('c', 'y', 'x'), (3, 2, 2))
    """

    info: ItemInfo

    def __init__(
        self,
        array: np.ndarray,
        item_id: str,
        *,
        axes: Sequence[str] | None = None,
        channel_axis: int | None = None,
    ) -> None:
        self.array = np.asarray(array)
        if axes is not None:
            names: list[str] = [str(a) for a in axes]
            unknown = [a for a in names if a not in ("c", "z", "y", "x")]
            if unknown or len(names) != self.array.ndim or len(set(names)) != len(names):
                raise ValueError(
                    f"`axes` {tuple(names)} must name each of the {self.array.ndim} dimensions "
                    "once, from 'c', 'z', 'y', 'x'"
                )
        elif channel_axis is not None:
            if not -self.array.ndim <= channel_axis < self.array.ndim:
                raise ValueError(
                    f"`channel_axis` ({channel_axis}) is outside an array of {self.array.ndim} "
                    "dimensions"
                )
            spatial = ["z", "y", "x"][4 - self.array.ndim :]
            names = list(spatial)
            names.insert(channel_axis % self.array.ndim, "c")
        else:
            names = ["z", "y", "x"][3 - self.array.ndim :] if self.array.ndim <= 3 else []
        if not 2 <= self.array.ndim <= 4 or not names:
            raise ValueError(
                f"`array` has shape {self.array.shape}: expected 2-D or 3-D spatial data "
                "(plus a channel axis named with `axes` or `channel_axis`)"
            )
        digest = hashlib.sha256(f"{self.array.shape}{self.array.dtype}".encode())
        digest.update(np.ascontiguousarray(self.array).data)
        try:
            self.info, self._order = _make_array_info(
                item_id,
                f"<array {item_id}>",
                "array",
                self.array.shape,
                str(self.array.dtype),
                names,
                fingerprint=digest.hexdigest()[:16],
            )
        except ItemReadError as exc:
            raise ValueError(str(exc)) from None

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(c, *region_shape)`` (a copy)."""
        bounded = check_region(self.info, region)
        return np.array(_read_ordered(self.array, self._order, self.info, bounded))

    def __repr__(self) -> str:
        return f"ArrayReader(<{self.array.shape} {self.array.dtype}>, item_id={self.info.id!r})"


def _read_dimension_names(array: Any) -> list[str] | None:
    names = getattr(array.metadata, "dimension_names", None)
    if names is None:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names is None or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def _read_ome_level(
    group: Any, label: str, group_path: str | None
) -> tuple[str, list[str] | None, tuple[float, ...] | None, tuple[float, ...] | None, str]:
    """Path, axis names, spacing, origin and units of an OME-Zarr group's first level."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in group.arrays())
        raise_read_error(
            label,
            "is a Zarr group, not an array",
            ValueError(f"pass the array path inside it; arrays here: {arrays}"),
        )
    first = multiscales[0]
    dataset = first["datasets"][0]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in first.get("axes", [])] or None
    scale = translation = None
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"]]
        elif transform.get("type") == "translation":
            translation = [float(v) for v in transform["translation"]]
    space_axes = [a for a in first.get("axes", []) if isinstance(a, dict)]
    units_found = {a.get("unit") for a in space_axes if a.get("type") == "space"}
    units = units_found.pop() if len(units_found) == 1 and None not in units_found else "pixel"
    spacing = origin = None
    if names is not None:
        keep = [i for i, n in enumerate(names) if n.lower() in ("z", "y", "x")]
        spacing = tuple(scale[i] for i in keep) if scale else None
        origin = tuple(translation[i] for i in keep) if translation else None
        if spacing is None:
            units = "pixel"
    level = str(dataset["path"])
    path = level if not group_path else f"{group_path.rstrip('/')}/{level}"
    return path, names, spacing, origin, str(units)


def _fingerprint_zarr(label: str, array: Any) -> str:
    if not is_url(label):
        return fingerprint_tree(label)
    # Remote stores: listing every chunk would be slow, so only the metadata counts.
    text = json.dumps(array.metadata.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(f"{label}\0{text}".encode()).hexdigest()[:16]


def _make_array_info(
    item_id: str,
    path: str,
    fmt: Any,
    shape: tuple[int, ...],
    dtype: str,
    names: Sequence[str] | None,
    *,
    spacing: tuple[float, ...] | None = None,
    origin: tuple[float, ...] | None = None,
    units: str = "pixel",
    fingerprint: str = "",
) -> tuple[ItemInfo, tuple[int, ...]]:
    """ItemInfo of an array with dimension ``names`` and the axis order that puts ``c`` first.

    Returns the info and ``order``: array dimension indices in ``(c), (z), y, x`` order.
    """
    ndim = len(shape)
    if names is None:
        if ndim not in (2, 3):
            raise_read_error(
                path,
                f"array of shape {shape} has no dimension names",
                ValueError("only 2-D (y, x) and 3-D (z, y, x) arrays can be read without names"),
            )
        names = ["z", "y", "x"][3 - ndim :]
    if len(names) != ndim:
        raise_read_error(path, f"dimension names {tuple(names)}", ValueError(f"shape {shape}"))
    channel = [i for i, n in enumerate(names) if n.lower() in CHANNEL_NAMES]
    spatial = [i for i, n in enumerate(names) if n.lower() not in CHANNEL_NAMES]
    if len(channel) > 1 or len(spatial) not in (2, 3):
        raise_read_error(
            path,
            f"dimension names {tuple(names)} of shape {shape} are not supported",
            ValueError(
                "expected at most one channel dimension ('c', 'band' or 'channel') "
                "and 2 or 3 spatial dimensions"
            ),
        )
    spatial_axes = ("z", "y", "x")[3 - len(spatial) :]
    order = tuple(channel + spatial)
    axes = (("c",) if channel else ()) + spatial_axes
    return (
        ItemInfo(
            id=item_id,
            path=path,
            format=fmt,
            shape=tuple(shape[i] for i in order),
            dtype=dtype,
            axes=axes,
            spacing=spacing if spacing is not None else (1.0,) * len(spatial),
            origin=origin if origin is not None else (0.0,) * len(spatial),
            units=units,
            fingerprint=fingerprint,
        ),
        order,
    )


def _read_ordered(
    array: Any, order: tuple[int, ...], info: ItemInfo, region: tuple[slice, ...]
) -> np.ndarray:
    """Slice ``array`` (stored in any axis order) and return ``(c, *region_shape)``."""
    index: list[slice] = [slice(None)] * len(order)
    spatial_dims = order[1:] if info.axes[0] == "c" else order
    for dim, sl in zip(spatial_dims, region, strict=True):
        index[dim] = sl
    block = np.asarray(array[tuple(index)])
    block = np.transpose(block, order)
    return block if info.axes[0] == "c" else block[np.newaxis]

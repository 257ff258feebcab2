"""CF conventions of an item group: what xarray and rioxarray read from the output store.

An item group ``STORE/ITEM`` holds one 1-D coordinate array per spatial axis (pixel/voxel
centres ``origin + i * spacing``, in CRS units for geo items and physical units for volumes),
a 0-d ``spatial_ref`` grid-mapping variable for geo items (``crs_wkt``, ``spatial_ref``,
``GeoTransform``: the rioxarray convention), and output arrays whose ``dimension_names`` name
those coordinates, so ``xarray.open_zarr("STORE/ITEM")`` attaches them. Class maps carry
CF ``flag_values``/``flag_meanings`` and class coordinates; probability maps a ``class`` axis.

These functions only say what to write; :mod:`segflow.store.layout` does the Zarr work.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.errors import StoreError
from segflow.io.base import ItemInfo

if TYPE_CHECKING:
    from segflow.store.layout import ArraySpec

# The 0-d CF grid-mapping variable every geo array points at (the rioxarray convention).
GRID_MAPPING = "spatial_ref"

_AXIS_ATTRS: dict[str, dict[str, str]] = {
    "z": {"axis": "Z", "long_name": "z coordinate of voxel centre"},
    "y": {"axis": "Y", "long_name": "y coordinate of pixel centre"},
    "x": {"axis": "X", "long_name": "x coordinate of pixel centre"},
}


def write_coordinates(group: Any, info: ItemInfo) -> None:
    """Write the coordinate arrays of ``info``'s spatial axes (and ``spatial_ref`` for a geo
    item) into the Zarr ``group``."""
    for axis, size, origin, step in zip(
        info.spatial_axes, info.spatial_shape, info.origin, info.spacing, strict=True
    ):
        coord = group.create_array(
            axis,
            shape=(size,),
            dtype="float64",
            chunks=(max(size, 1),),
            dimension_names=(axis,),
            attributes=_coord_attrs(info, axis),
            fill_value=np.nan,
        )
        coord[:] = origin + np.arange(size, dtype=np.float64) * step
    if _is_geo(info):
        ref = group.create_array(
            GRID_MAPPING,
            shape=(),
            dtype="int32",
            dimension_names=(),
            attributes=_grid_mapping_attrs(info),
        )
        ref[...] = 0


def array_attributes(
    group: Any, info: ItemInfo, spec: ArraySpec
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The attributes and ``dimension_names`` of ``spec``'s array in the item ``group``.

    Geo arrays name ``spatial_ref`` as their ``grid_mapping`` and in ``coordinates``; a class
    map's categories and a probability map's class axis get their coordinates written into
    ``group`` here.
    """
    attrs = dict(spec.attrs)
    if _is_geo(info):
        attrs.setdefault("grid_mapping", GRID_MAPPING)
        attrs.setdefault("coordinates", GRID_MAPPING)
    if spec.categories:
        attrs.update(_category_coordinates(group, spec))
        coordinates = [attrs.get("coordinates"), *attrs.pop("category_coordinates")]
        attrs["coordinates"] = " ".join(c for c in coordinates if c)
    dims: tuple[str, ...] = tuple(info.spatial_axes)
    if spec.classes:
        dims = (_class_coordinate(group, spec), *dims)
    return attrs, dims


def _class_coordinate(group: Any, spec: ArraySpec) -> str:
    """The name of the class axis of ``spec``'s array, with its coordinate in ``group``:
    ``class``, or ``NAME_class`` where another array of the item names other classes."""
    names = np.asarray(spec.classes, dtype=str)
    for dim in ("class", f"{spec.name}_class"):
        if dim in group:
            if np.array_equal(np.asarray(group[dim][:], dtype=str), names):
                return dim
            continue
        coord = group.create_array(
            dim,
            shape=(len(names),),
            dtype=str,
            chunks=(len(names),),
            dimension_names=(dim,),
            attributes={"long_name": "class (channel) of the array"},
        )
        coord[:] = names
        return dim
    raise StoreError(f"array '{spec.name}': cannot name its class axis (both names taken)")


def _category_coordinates(group: Any, spec: ArraySpec) -> dict[str, Any]:
    """Write ``NAME_value`` (the class ids, a dimension coordinate) and ``NAME_name`` /
    ``NAME_color`` along it into ``group``; return the array's attributes that name them."""
    values, names, colors = zip(*spec.categories, strict=True)
    dim = f"{spec.name}_value"
    columns: dict[str, tuple[Any, ...]] = {dim: values, f"{spec.name}_name": names}
    if any(c is not None for c in colors):
        columns[f"{spec.name}_color"] = tuple(c or "" for c in colors)
    for key, column in columns.items():
        dtype: Any = spec.dtype if key == dim else str  # str: zarr's variable-length strings
        if key in group:
            del group[key]
        coord = group.create_array(
            key, shape=(len(column),), dtype=dtype, chunks=(len(column),), dimension_names=(dim,)
        )
        coord[:] = np.asarray(column, dtype=spec.dtype if key == dim else str)
    attrs: dict[str, Any] = {
        "flag_values": [int(v) for v in values],
        "flag_meanings": " ".join(n.replace(" ", "_") for n in names),
        "class_names": list(names),
        "category_coordinates": [k for k in columns if k != dim],
    }
    if f"{spec.name}_color" in columns:
        attrs["class_colors"] = list(columns[f"{spec.name}_color"])
    return attrs


def _is_geo(info: ItemInfo) -> bool:
    return info.crs_wkt is not None


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/Infinity: encode them as zarr v3 encodes fill values."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def item_attributes(info: ItemInfo) -> dict[str, Any]:
    """The item group's attributes: source path, spacing, units, origin, affine, CRS, nodata
    and fingerprint of ``info``."""
    attrs: dict[str, Any] = {
        "item_id": info.id,
        "source": info.path,
        "format": info.format,
        "source_shape": list(info.shape),
        "source_axes": list(info.axes),
        "source_dtype": info.dtype,
        "spacing": list(info.spacing),
        "origin": list(info.origin),
        "units": info.units,
        "fingerprint": info.fingerprint,
        "nodata": _json_number(info.nodata),
    }
    if info.crs_wkt is not None:
        attrs["crs"] = info.crs_wkt
    if info.transform is not None:
        attrs["transform"] = list(info.transform)
    if info.affine is not None:
        attrs["affine"] = [list(row) for row in info.affine]
    # What the reader kept besides (orientation code, DICOM series UID, channel names...).
    attrs.update({k: v for k, v in info.attrs.items() if k not in attrs})
    return attrs


def _coord_attrs(info: ItemInfo, axis: str) -> dict[str, Any]:
    attrs = dict(_AXIS_ATTRS[axis])
    attrs["units"] = info.units
    if not _is_geo(info):
        return attrs
    if info.units == "degree":
        if axis == "x":
            attrs.update(standard_name="longitude", units="degrees_east")
        elif axis == "y":
            attrs.update(standard_name="latitude", units="degrees_north")
    else:
        attrs["standard_name"] = f"projection_{axis}_coordinate"
    return attrs


def _grid_mapping_attrs(info: ItemInfo) -> dict[str, Any]:
    attrs: dict[str, Any] = {"crs_wkt": info.crs_wkt, "spatial_ref": info.crs_wkt}
    if info.transform is not None:
        a, b, c, d, e, f = info.transform[:6]
        # GDAL GeoTransform order (c, a, b, f, d, e), space-separated, as rioxarray writes it.
        attrs["GeoTransform"] = " ".join(repr(float(v)) for v in (c, a, b, f, d, e))
    return attrs

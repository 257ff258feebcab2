"""OME-Zarr 0.5 view of an item group: a multiscale pyramid of its output for viewers.

Layout of ``STORE/ITEM`` (one store serves xarray and OME-Zarr readers)::

    ITEM/                  xarray group (segflow.store.cf): x, y (z), spatial_ref, labels, ...
                           attributes: ome = {"version": "0.5", "labels": ["labels_pyramid"]}
    ITEM/labels            full resolution, what xarray opens (dimension_names, coordinates)
    ITEM/labels_pyramid/   OME-Zarr label image: ome.multiscales + ome.image-label
        0, 1, 2, ...       level 0 (a copy of ITEM/labels), then each level halved

Why a separate pyramid group rather than OME metadata on ``ITEM`` pointing at ``ITEM/labels``:
in OME-Zarr the name ``labels`` inside an image group is reserved for the labels group, so an
item group whose full-resolution array is called ``labels`` cannot itself be a valid OME
image (ome-zarr-models refuses it: "expected a group at labels, found an array"), and a
multiscales dataset path cannot point outside its group (``../labels``). Renaming the array
would break every xarray reader of the store. So the item group is an OME-Zarr *labels
group* (its ``ome.labels`` lists the label image), and the label image is a child group with
its own level 0. The price is one copy of the full-resolution output, written blockwise
like the other levels (labels compress well; ``output.ome: false`` drops the whole view).
An output that is not a label image (a float ``probabilities`` or ``image`` map) gets an OME
image group ``ITEM/NAME_pyramid`` (multiscales without ``image-label``), not listed as a label.

Pyramid: each level halves y and x, and z only while the volume is "isotropic enough": an
axis is halved when its spacing is less than twice the finest spacing of that level (so a CT
with 5 mm slices and 0.7 mm pixels keeps all slices until the pixels reach 2.8 mm). Levels
stop once every spatial side of a level fits in one chunk, or at ``max_levels``. Integer
outputs (labels, masks, class maps) are downsampled by nearest neighbour (the first pixel of
each 2x2(x2) window, so ids stay ids and level k equals level 0 sampled every 2**k pixels);
float outputs by the mean of each window, level k from level k - 1. The engine builds the
levels while its blocks write the output (:mod:`segflow.store.pyramid`: each block writes
the levels' storage units it holds whole, a small second step the ones that span blocks);
:func:`write_pyramid` builds the same levels by reading a written array back.

Coordinate transformations: level k has ``scale = |spacing| * factor`` and ``translation`` the
physical centre of its first pixel (``origin`` for nearest, ``origin + (factor - 1) / 2 *
spacing`` for the mean), in the item's units (mapped to OME's unit names: ``m`` ->
``meter``, ``mm`` -> ``millimeter``, ``um`` -> ``micrometer``; pixel or degree units are
omitted). OME-Zarr scales are positive: an axis with negative spacing (a north-up raster's
y) is given as its negation (``-y``, a southing), which keeps sizes and distances right; the
CRS coordinates are the xarray view's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segflow.errors import StoreError
from segflow.io.base import ItemInfo

OME_VERSION = "0.5"
PYRAMID_SUFFIX = "_pyramid"

# Item units (segflow.io readers) -> OME-Zarr 0.5 space units; others are left out.
_OME_UNITS = {
    "m": "meter",
    "metre": "meter",
    "meter": "meter",
    "km": "kilometer",
    "kilometer": "kilometer",
    "cm": "centimeter",
    "centimeter": "centimeter",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "um": "micrometer",
    "µm": "micrometer",
    "micron": "micrometer",
    "micrometer": "micrometer",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "angstrom": "angstrom",
    "ft": "foot",
    "foot": "foot",
}

Method = Literal["nearest", "mean"]


@dataclass(frozen=True)
class PyramidLevel:
    """One level of a pyramid: its path in the pyramid group, shape and factor per axis."""

    path: str
    shape: tuple[int, ...]
    factor: tuple[int, ...]


def plan_levels(
    shape: Sequence[int],
    spacing: Sequence[float],
    chunks: Sequence[int],
    *,
    max_levels: int | None = None,
) -> list[PyramidLevel]:
    """The levels of a pyramid over spatial ``shape``: level 0, then halvings.

    An axis is halved when its spacing is below twice the level's finest spacing and its
    side is above 1; levels stop once every side fits in one chunk, or after ``max_levels``
    levels beyond level 0.

    Examples
    --------
    >>> [lv.shape for lv in plan_levels((718, 791), (1.0, 1.0), (256, 256))]
    [(718, 791), (359, 396), (180, 198)]
    >>> [lv.factor for lv in plan_levels((8, 64, 64), (5.0, 1.0, 1.0), (8, 16, 16))]
    [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    """
    shape = tuple(int(n) for n in shape)
    levels = [PyramidLevel("0", shape, (1,) * len(shape))]
    while max_levels is None or len(levels) <= max_levels:
        last = levels[-1]
        if all(n <= c for n, c in zip(last.shape, chunks, strict=True)):
            break
        step = [abs(s) * f for s, f in zip(spacing, last.factor, strict=True)]
        finest = min(s for s, n in zip(step, last.shape, strict=True) if n > 1)
        halve = [n > 1 and s < 2 * finest for s, n in zip(step, last.shape, strict=True)]
        levels.append(
            PyramidLevel(
                str(len(levels)),
                tuple(-(-n // 2) if h else n for n, h in zip(last.shape, halve, strict=True)),
                tuple(f * 2 if h else f for f, h in zip(last.factor, halve, strict=True)),
            )
        )
    return levels


def downsample(data: np.ndarray, factor: Sequence[int], method: Method) -> np.ndarray:
    """Downsample the trailing ``len(factor)`` axes of ``data`` by ``factor``.

    ``nearest`` keeps the first element of each window; ``mean`` averages each window (a
    window cut by the array edge averages what it has).

    Examples
    --------
    >>> downsample(np.arange(16).reshape(4, 4), (2, 2), "nearest").tolist()
    [[0, 2], [8, 10]]
    >>> downsample(np.arange(6.0).reshape(2, 3), (2, 2), "mean").tolist()
    [[2.0, 3.5]]
    """
    lead = data.ndim - len(factor)
    if method == "nearest":
        keep: tuple[Any, ...] = (Ellipsis, *(slice(None, None, f) for f in factor))
        return data[keep]
    out = data
    for axis, f in enumerate(factor, start=lead):
        if f == 2:
            out = _halve_mean(out, axis)
        elif f != 1:
            out = out.astype(np.float64, copy=False)
            n = out.shape[axis]
            starts = np.arange(0, n, f)
            counts = np.diff(np.append(starts, n)).astype(np.float64)
            out = np.add.reduceat(out, starts, axis=axis)
            out /= counts.reshape([-1 if a == axis else 1 for a in range(out.ndim)])
    return out.astype(data.dtype)


def _halve_mean(data: np.ndarray, axis: int) -> np.ndarray:
    """Mean of each pair along ``axis`` in float64 (a last odd element alone): what
    ``add.reduceat`` over the pairs, divided by the counts, gives bit for bit (``a + b``
    then ``/ 2``; ``c / 1``), without its per-window loop or a float64 copy of ``data``
    (the pairs are added as float64 straight from it)."""
    n = data.shape[axis]

    def take(start: int, stop: int) -> np.ndarray:
        index: list[Any] = [slice(None)] * data.ndim
        index[axis] = slice(start, stop, 2 if stop - start > 1 else 1)
        return data[tuple(index)]

    pairs = np.add(take(0, n - n % 2), take(1, n), dtype=np.float64)
    pairs /= 2.0
    if n % 2:
        return np.concatenate([pairs, take(n - 1, n).astype(np.float64)], axis=axis)
    return pairs


def downsample_method(dtype: Any) -> Method:
    """``nearest`` for integer and boolean outputs (ids stay ids), ``mean`` for floats."""
    return "mean" if np.issubdtype(np.dtype(dtype), np.floating) else "nearest"


def ome_unit(units: str) -> str | None:
    """The OME-Zarr space unit of an item's ``units``, or None (pixel, degree, unknown).

    Examples
    --------
    >>> ome_unit("mm"), ome_unit("m"), ome_unit("pixel")
    ('millimeter', 'meter', None)
    """
    return _OME_UNITS.get(units.strip().lower())


def level_transforms(
    info: ItemInfo, factor: Sequence[int], method: Method, n_lead: int = 0
) -> list[dict[str, Any]]:
    """``coordinateTransformations`` of a level: scale and translation per axis (a leading
    class axis gets scale 1 and translation 0)."""
    scale = [1.0] * n_lead
    translation = [0.0] * n_lead
    for step, origin, f in zip(info.spacing, info.origin, factor, strict=True):
        centre = origin + (step * (f - 1) / 2 if method == "mean" else 0.0)
        scale.append(abs(step) * f)
        translation.append(centre if step >= 0 else -centre)
    return [
        {"type": "scale", "scale": scale},
        {"type": "translation", "translation": translation},
    ]


def ome_axes(info: ItemInfo, lead_names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The OME ``axes`` of an output: channel axes first, then the spatial axes."""
    unit = ome_unit(info.units)
    axes: list[dict[str, Any]] = [{"name": name, "type": "channel"} for name in lead_names]
    for name in info.spatial_axes:
        axis: dict[str, Any] = {"name": name, "type": "space"}
        if unit is not None:
            axis["unit"] = unit
        axes.append(axis)
    return axes


def image_label_metadata(
    kind: str, categories: Sequence[tuple[int, str, str | None]] = ()
) -> dict[str, Any]:
    """The ``image-label`` metadata of an integer output: a colour and a name per class.

    Background 0 is transparent; a mask's foreground and each named class get a colour
    (the class's own, else one from a fixed palette) and a name; instance labels get no
    other colour (viewers pick one per id). Colours and names cover the same values, as
    ome-zarr-models requires.

    Examples
    --------
    >>> image_label_metadata("mask")["colors"][1]
    {'label-value': 1, 'rgba': [255, 200, 0, 255]}
    >>> image_label_metadata("labels")["colors"]
    [{'label-value': 0, 'rgba': [0, 0, 0, 0]}]
    """
    classes: list[tuple[int, str, list[int]]] = [(0, "background", [0, 0, 0, 0])]
    if kind == "mask" and not categories:
        classes.append((1, "foreground", [255, 200, 0, 255]))
    for position, (value, name, color) in enumerate(categories):
        rgba = _rgba(color) or _PALETTE[position % len(_PALETTE)]
        classes = [c for c in classes if c[0] != int(value)] + [(int(value), name, rgba)]
    metadata: dict[str, Any] = {
        "colors": [{"label-value": value, "rgba": rgba} for value, _, rgba in classes]
    }
    if len(classes) > 1:
        metadata["properties"] = [
            {"label-value": value, "name": name} for value, name, _ in classes
        ]
    return metadata


# Colours of classes that name none (RGBA, opaque): distinct on a dark and a light background.
_PALETTE = [
    [31, 119, 180, 255],
    [255, 127, 14, 255],
    [44, 160, 44, 255],
    [214, 39, 40, 255],
    [148, 103, 189, 255],
    [140, 86, 75, 255],
    [227, 119, 194, 255],
    [188, 189, 34, 255],
    [23, 190, 207, 255],
]


def _rgba(color: str | None) -> list[int] | None:
    """``#rrggbb`` or ``#rrggbbaa`` as 0-255 RGBA, else None."""
    if not color or not color.startswith("#") or len(color) not in (7, 9):
        return None
    try:
        values = [int(color[i : i + 2], 16) for i in range(1, len(color), 2)]
    except ValueError:
        return None
    return values + [255] * (4 - len(values))


def _downsample_unit(
    source: Any, target: Any, region: tuple[slice, ...], factor: tuple[int, ...], method: Method
) -> None:
    """One task: read the previous level under ``region`` of the next, write it reduced."""
    src = tuple(slice(s.start * f, s.stop * f) for s, f in zip(region, factor, strict=True))
    target.write(region, downsample(source.read(src), factor, method))


def unit_regions(shape: Sequence[int], unit: Sequence[int]) -> list[tuple[slice, ...]]:
    """The storage units of an array of spatial ``shape``, as regions (the last ones cut by
    the edge), in C order.

    Examples
    --------
    >>> unit_regions((3, 5), (2, 4))[1:3]
    [(slice(0, 2, None), slice(4, 5, None)), (slice(2, 3, None), slice(0, 4, None))]
    """
    grids = [range(0, n, u) for n, u in zip(shape, unit, strict=True)]
    out: list[tuple[slice, ...]] = []
    for starts in np.ndindex(*(len(g) for g in grids)):
        out.append(
            tuple(
                slice(g[i], min(g[i] + u, n))
                for g, i, u, n in zip(grids, starts, unit, shape, strict=True)
            )
        )
    return out


_unit_regions = unit_regions  # the name this module used before


def level_storage(
    chunks: Sequence[int], shards: Sequence[int] | None, shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """A level's spatial chunk and shard (None: unsharded) from the output's: the same
    chunk, clipped to the level; a shard clipped to the chunks that cover the level.

    Examples
    --------
    >>> level_storage((256, 256), (1024, 1024), (359, 396))
    ((256, 256), (512, 512))
    """
    chunk = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))
    if shards is None:
        return chunk, None
    return chunk, tuple(
        min(s, -(-n // c) * c) for s, c, n in zip(shards, chunk, shape, strict=True)
    )


@dataclass(frozen=True)
class BaseArray:
    """What the levels of a pyramid take from the array they are built from."""

    dtype: np.dtype
    fill_value: Any
    lead_shape: tuple[int, ...]  # leading channel axes (a probability map's classes)
    lead_names: tuple[str, ...]
    chunks: tuple[int, ...]  # spatial
    shards: tuple[int, ...] | None  # spatial

    @classmethod
    def of(cls, array: Any, n_spatial: int) -> BaseArray:
        n_lead = array.ndim - n_spatial
        dims: Any = getattr(array.metadata, "dimension_names", None)  # v3 metadata
        return cls(
            dtype=np.dtype(array.dtype),
            fill_value=array.fill_value,
            lead_shape=tuple(array.shape[:n_lead]),
            lead_names=tuple(str(d) for d in dims or ())[:n_lead] or ("c",) * n_lead,
            chunks=tuple(array.chunks[n_lead:]),
            shards=None if array.shards is None else tuple(array.shards[n_lead:]),
        )


def create_level(
    root: str, info: ItemInfo, path: str, base: BaseArray, shape: Sequence[int]
) -> None:
    """Create (or replace) the level array ``ROOT/ITEM/PATH`` of spatial ``shape``."""
    import zarr

    chunk, shard = level_storage(base.chunks, base.shards, shape)
    lead = base.lead_shape
    zarr.create_array(
        root,
        name=f"{info.id}/{path}",
        shape=(*lead, *shape),
        dtype=base.dtype,
        chunks=(*lead, *chunk),
        shards=None if shard is None else (*lead, *shard),
        fill_value=base.fill_value,
        dimension_names=(*base.lead_names, *info.spatial_axes),
        overwrite=True,
        zarr_format=3,
    )


def write_pyramid_metadata(
    root: str,
    info: ItemInfo,
    name: str,
    levels: Sequence[PyramidLevel],
    base: BaseArray,
    *,
    categories: Sequence[tuple[int, str, str | None]] = (),
    kind: str = "labels",
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Write the multiscales (and ``image-label``) metadata of ``ROOT/ITEM/NAME_pyramid``,
    and, for a label image, the item group's ``ome.labels`` entry. Returns every level
    array, as ``path -> (dtype, shape)`` relative to the item group."""
    import zarr

    method = downsample_method(base.dtype)
    n_lead = len(base.lead_shape)
    group_name = f"{name}{PYRAMID_SUFFIX}"
    datasets = [
        {
            "path": level.path,
            "coordinateTransformations": level_transforms(info, level.factor, method, n_lead),
        }
        for level in levels
    ]
    ome: dict[str, Any] = {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": ome_axes(info, base.lead_names),
                "datasets": datasets,
                "type": method,
            }
        ],
    }
    is_label = method == "nearest" and n_lead == 0
    if is_label:
        ome["image-label"] = image_label_metadata(kind, categories)
    group = zarr.open_group(root, path=f"{info.id}/{group_name}", mode="r+", zarr_format=3)
    group.update_attributes({"ome": ome})
    if is_label:
        item = zarr.open_group(root, path=info.id, mode="r+", zarr_format=3)
        current: Any = dict(item.attrs).get("ome") or {}
        names = [n for n in current.get("labels", []) if n != group_name] + [group_name]
        item.update_attributes({"ome": {"version": OME_VERSION, "labels": names}})
    return {
        f"{group_name}/{level.path}": (str(base.dtype), (*base.lead_shape, *level.shape))
        for level in levels
    }


def write_pyramid(
    root: str,
    info: ItemInfo,
    name: str,
    *,
    executor: Any,
    categories: Sequence[tuple[int, str, str | None]] = (),
    kind: str = "labels",
    max_levels: int | None = None,
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Write ``ROOT/ITEM/NAME_pyramid`` (levels and OME metadata) by reading ``ROOT/ITEM/NAME``
    back: a second pass over the item.

    The engine builds the same levels while its blocks write
    (:mod:`segflow.store.pyramid`); this is the way for an array written otherwise, and the
    reference the blockwise pyramid is tested against. Each level is written on
    ``executor`` (one task per storage unit of the level, reading the previous level), then
    the multiscales (and ``image-label``) metadata, then the item group's ``ome.labels``
    entry. Returns every level array written, as ``path -> (dtype, shape)`` relative to the
    item group, for the commit check (:func:`segflow.store.commit.check_array`).

    Raises
    ------
    StoreError
        If ``ROOT/ITEM/NAME`` is missing or a level cannot be written.
    """
    import zarr

    from segflow.store.layout import ZarrRegionWriter

    try:
        array = zarr.open_array(root, path=f"{info.id}/{name}", mode="r", zarr_format=3)
    except Exception as exc:
        raise StoreError(
            f"item '{info.id}': cannot build the OME-Zarr pyramid of '{name}' ({exc})"
        ) from exc
    base = BaseArray.of(array, len(info.spatial_shape))
    method = downsample_method(base.dtype)
    group_name = f"{name}{PYRAMID_SUFFIX}"
    levels = plan_levels(info.spatial_shape, info.spacing, base.chunks, max_levels=max_levels)
    try:
        zarr.open_group(root, mode="a", zarr_format=3).require_group(f"{info.id}/{group_name}")
        source = ZarrRegionWriter(root, info.id, name)
        previous = (1,) * len(base.chunks)
        for level in levels:
            path = f"{group_name}/{level.path}"
            create_level(root, info, path, base, level.shape)
            target = ZarrRegionWriter(root, info.id, path)
            step = tuple(f // p for f, p in zip(level.factor, previous, strict=True))
            chunk, shard = level_storage(base.chunks, base.shards, level.shape)
            regions = unit_regions(level.shape, shard or chunk)
            n = len(regions)
            handles = executor.map(
                _downsample_unit, [source] * n, [target] * n, regions, [step] * n, [method] * n
            )
            executor.gather(handles, label=f"pyramid {level.path}")
            source, previous = target, level.factor
        return write_pyramid_metadata(
            root, info, name, levels, base, categories=categories, kind=kind
        )
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"item '{info.id}': cannot write the OME-Zarr pyramid of '{name}' "
            f"({type(exc).__name__}: {exc})"
        ) from exc


__all__ = [
    "OME_VERSION",
    "PYRAMID_SUFFIX",
    "BaseArray",
    "PyramidLevel",
    "create_level",
    "downsample",
    "downsample_method",
    "image_label_metadata",
    "level_storage",
    "level_transforms",
    "ome_axes",
    "ome_unit",
    "plan_levels",
    "unit_regions",
    "write_pyramid",
    "write_pyramid_metadata",
]

"""Object-level operations: decisions about whole connected components, across blocks.

Each is a ``connectivity`` operation: a block labels its core, measures its objects (sizes,
strong pixels, contact with the item border), and the engine combines the measurements of
objects that span blocks before anything is decided (``segflow.stitch.labels``). Every result
equals the whole-array reference named in the docstring, whatever the block layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage as ndi
from skimage import measure

from segflow.ops.label import (
    Connectivity,
    OptionalConnectivity,
    connectivity_structure,
    resolve_connectivity,
)
from segflow.ops.registry import Done, LowHighParams, OpContext, Operation, OpParams, register
from segflow.stitch.labels import Box, ObjectRule, first_pixels


def _label_mask(mask: np.ndarray, connectivity: int) -> np.ndarray:
    labels, _ = ndi.label(mask, structure=connectivity_structure(connectivity, mask.ndim))
    return labels


def _keep_marked(mark: Callable[[np.ndarray, Box], Any]) -> ObjectRule:
    """Keep the objects that hold a marked pixel anywhere in the item; ``mark(source, box)``
    indexes a block's marked pixels (a mask or coordinates)."""

    def measure(
        source: np.ndarray, labels: np.ndarray, n: int, box: Box, shape: tuple[int, ...]
    ) -> np.ndarray:
        marked = labels[mark(source, box)]
        return np.bincount(marked.ravel(), minlength=n + 1).astype(np.float64)[:, np.newaxis]

    return ObjectRule(
        columns=("marked",),
        reduce=("sum",),
        measure=measure,
        keep=lambda features: features[:, 0] > 0,
    )


def _counts(labels: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)


def _voxel_size(ctx: OpContext) -> float:
    return math.prod(abs(s) for s in ctx.spacing) if ctx.spacing else 1.0


# --- remove_small_objects --------------------------------------------------------------------


class RemoveSmallParams(OpParams):
    max_size: int | None = Field(
        None, ge=0, description="remove objects of this many pixels (voxels) or fewer"
    )
    max_physical_size: float | None = Field(
        None,
        ge=0,
        description="remove objects of this physical size or less (item units^ndim: m^2, mm^3)",
    )
    connectivity: Connectivity = 1

    @model_validator(mode="after")
    def _one_size(self) -> RemoveSmallParams:
        _one_size(self.max_size, self.max_physical_size, "max")
        return self


def _label_foreground(image: np.ndarray, params: OpParams, ctx: OpContext) -> np.ndarray:
    connectivity = int(params.connectivity)  # type: ignore[attr-defined]
    return _label_mask(image[0] != 0, connectivity)[np.newaxis]


def _kept_mask(ids: np.ndarray, source: np.ndarray | None, params: OpParams) -> np.ndarray:
    return ids != 0


def _label_ids(image: np.ndarray, params: OpParams, ctx: OpContext) -> np.ndarray:
    """A mask's connected components, or a label image's ids as local labels ``1..n`` (one
    per distinct id in the block, numbered in scan order of their first pixel): there each id
    is one object wherever it lies, as ``skimage.morphology.remove_small_objects`` measures
    an integer image."""
    values = image[0]
    if values.dtype == np.bool_:
        return _label_foreground(image, params, ctx)
    if values.dtype.kind == "i" and values.size and values.min() < 0:
        raise ValueError(
            f"label ids must not be negative, got {values.min()} (as scikit-image refuses "
            "them); relabel the image, e.g. {op: relabel} after shifting it"
        )
    ids, first, inverse = np.unique(values.ravel(), return_index=True, return_inverse=True)
    foreground = np.flatnonzero(ids != 0)
    order = foreground[np.argsort(first[foreground], kind="stable")]  # by first pixel
    local = np.zeros(len(ids), dtype=np.int32)
    local[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return local[inverse].reshape(values.shape)[np.newaxis]


def _local_ids(source: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray | None:
    """The label image's id of each local label from :func:`_label_ids` (None for masks)."""
    if source.dtype == np.bool_:
        return None
    ids = np.zeros(n + 1, dtype=source.dtype)
    ids[labels.ravel()] = source[0].ravel()  # every pixel of a label holds the same id
    return ids


def _kept_values(ids: np.ndarray, source: np.ndarray | None, params: OpParams) -> np.ndarray:
    """The input's values (a label image's ids, a mask's True) on the kept objects, else 0."""
    assert source is not None
    return np.where(ids != 0, source[0], source.dtype.type(0))


def _integer_or_mask(name: str) -> Callable[[OpParams, np.dtype], np.dtype]:
    def check(params: OpParams, dtype: np.dtype) -> np.dtype:
        dtype = np.dtype(dtype)
        if dtype.kind not in "uib":  # checked at plan time: PlanError, a ValueError
            raise ValueError(
                f"{name} takes a mask or a label image (bool or integer), got {dtype}; "
                "threshold or `label` it first"
            )
        return dtype

    return check


def _sizes_rule(keep: Callable[[np.ndarray], np.ndarray], *, by_id: bool = True) -> ObjectRule:
    """Keep the objects whose whole-item size (pixels) passes ``keep``: connected components
    of a mask, or (``by_id``) a label image's ids."""
    return ObjectRule(
        columns=("size",),
        reduce=("sum",),
        measure=lambda source, labels, n, box, shape: _counts(labels, n)[:, np.newaxis],
        keep=lambda features: keep(features[:, 0]),
        ids=_local_ids if by_id else None,
    )


def _one_size(pixels: int | None, physical: float | None, bound: str) -> None:
    if (pixels is None) == (physical is None):
        raise ValueError(f"give exactly one of `{bound}_size` (pixels) or `{bound}_physical_size`")


def _size_limit(pixels: int | None, physical: float | None, ctx: OpContext) -> tuple[float, float]:
    """The size limit and the size of a pixel in its units (1 for a pixel count)."""
    if pixels is not None:
        return float(pixels), 1.0
    assert physical is not None
    return physical, _voxel_size(ctx)


def _size_rule(params: RemoveSmallParams, ctx: OpContext) -> ObjectRule:
    limit, scale = _size_limit(params.max_size, params.max_physical_size, ctx)
    return _sizes_rule(lambda size: size * scale > limit)


register(
    Operation(
        name="remove_small_objects",
        kind="connectivity",
        params=RemoveSmallParams,
        apply=_label_ids,
        rule=_size_rule,
        finish=_kept_values,
        summary="drop objects of max_size pixels or fewer (or a physical size), sizes counted "
        "over the whole item (skimage.morphology.remove_small_objects): a mask's connected "
        "components, or each id of a label image (ids are kept)",
        halo_rule="0 (object sizes are merged globally)",
        out_dtype=_integer_or_mask("remove_small_objects"),
        needs_single_channel=True,
        by_class=lambda p: True,
        keeps_ids=True,
    )
)


# --- remove_large_objects --------------------------------------------------------------------


class RemoveLargeParams(OpParams):
    min_size: int | None = Field(
        None, ge=1, description="remove objects of this many pixels (voxels) or more"
    )
    min_physical_size: float | None = Field(
        None,
        gt=0,
        description="remove objects of this physical size or more (item units^ndim: m^2, mm^3)",
    )
    connectivity: Connectivity = 1

    @model_validator(mode="after")
    def _one_size(self) -> RemoveLargeParams:
        _one_size(self.min_size, self.min_physical_size, "min")
        return self


def _large_rule(params: RemoveLargeParams, ctx: OpContext) -> ObjectRule:
    limit, scale = _size_limit(params.min_size, params.min_physical_size, ctx)
    return _sizes_rule(lambda size: size * scale < limit)


register(
    Operation(
        name="remove_large_objects",
        kind="connectivity",
        params=RemoveLargeParams,
        apply=_label_ids,
        rule=_large_rule,
        finish=_kept_values,
        summary="drop objects of min_size pixels or more (or a physical size), sizes counted "
        "over the whole item: background, sky, a whole-slide smear; a mask's connected "
        "components, or each id of a label image (ids are kept)",
        halo_rule="0 (object sizes are merged globally)",
        out_dtype=_integer_or_mask("remove_large_objects"),
        needs_single_channel=True,
        by_class=lambda p: True,
        keeps_ids=True,
    )
)


# --- keep_largest ----------------------------------------------------------------------------


class KeepLargestParams(OpParams):
    k: int = Field(1, ge=1, description="how many of the largest objects to keep")
    connectivity: Connectivity = 1


def _largest_rule(params: KeepLargestParams, ctx: OpContext) -> ObjectRule:
    def measure(
        source: np.ndarray, labels: np.ndarray, n: int, box: Box, shape: tuple[int, ...]
    ) -> np.ndarray:
        return np.stack(
            [_counts(labels, n), first_pixels(labels, n, box, shape).astype(np.float64)], axis=1
        )

    return ObjectRule(
        columns=("size", "first_pixel"), reduce=("sum", "min"), measure=measure, top_k=params.k
    )


register(
    Operation(
        name="keep_largest",
        kind="connectivity",
        params=KeepLargestParams,
        apply=_label_foreground,
        rule=_largest_rule,
        finish=_kept_mask,
        summary="keep the k largest connected objects of the item (ties: the object whose "
        "first pixel comes first in scan order)",
        halo_rule="0 (object sizes are merged globally)",
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- fill_holes ------------------------------------------------------------------------------


class FillHolesParams(OpParams):
    connectivity: Connectivity = Field(
        1, description="connectivity of the background: 1 = faces, ndim = all"
    )
    max_size: int | None = Field(
        None, ge=0, description="fill only holes of this many pixels or fewer (default: all)"
    )


def _label_background(image: np.ndarray, params: FillHolesParams, ctx: OpContext) -> np.ndarray:
    return _label_mask(image[0] == 0, params.connectivity)[np.newaxis]


def _border_labels(
    labels: np.ndarray, n: int, box: Box, shape: tuple[int, ...], width: int = 1
) -> np.ndarray:
    """1 for labels with a pixel within ``width`` pixels of the item's border, else 0."""
    touches = np.zeros(n + 1)
    for axis, (s, size) in enumerate(zip(box, shape, strict=True)):
        if s.start < width:
            touches[np.take(labels, range(width - s.start), axis=axis, mode="clip")] = 1
        if s.stop > size - width:
            last = s.stop - s.start
            near = range(max(size - width - s.start, 0), last)
            touches[np.take(labels, near, axis=axis)] = 1
    return touches


def _holes_rule(params: FillHolesParams, ctx: OpContext) -> ObjectRule:
    def measure(
        source: np.ndarray, labels: np.ndarray, n: int, box: Box, shape: tuple[int, ...]
    ) -> np.ndarray:
        return np.stack([_border_labels(labels, n, box, shape), _counts(labels, n)], axis=1)

    limit = np.inf if params.max_size is None else params.max_size
    return ObjectRule(
        columns=("on_border", "size"),
        reduce=("max", "sum"),
        measure=measure,
        keep=lambda features: (features[:, 0] == 0) & (features[:, 1] <= limit),
    )


def _fill(ids: np.ndarray, source: np.ndarray | None, params: OpParams) -> np.ndarray:
    assert source is not None
    return (source[0] != 0) | (ids != 0)


register(
    Operation(
        name="fill_holes",
        kind="connectivity",
        params=FillHolesParams,
        apply=_label_background,
        rule=_holes_rule,
        finish=_fill,
        summary="fill background regions that do not touch the item border "
        "(scipy.ndimage.binary_fill_holes), optionally only those of max_size pixels or "
        "fewer (a small region at the border stays open: remove_small_holes fills those)",
        halo_rule="0 (border contact is merged globally)",
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- remove_small_holes -----------------------------------------------------------------------


class RemoveSmallHolesParams(OpParams):
    max_size: int = Field(
        64, ge=0, description="fill background regions of this many pixels (voxels) or fewer"
    )
    connectivity: Connectivity = Field(
        1, description="connectivity of the background: 1 = faces, ndim = all"
    )


def _small_holes_rule(params: RemoveSmallHolesParams, ctx: OpContext) -> ObjectRule:
    return _sizes_rule(lambda size: size <= params.max_size, by_id=False)


def _holes_filled(params: OpParams, dtype: np.dtype) -> np.dtype:
    _integer_or_mask("remove_small_holes")(params, dtype)
    return np.dtype(bool)


register(
    Operation(
        name="remove_small_holes",
        kind="connectivity",
        params=RemoveSmallHolesParams,
        apply=_label_background,
        rule=_small_holes_rule,
        finish=_fill,
        summary="fill background regions of max_size pixels or fewer, wherever they lie "
        "(also at the item border), sizes counted over the whole item "
        "(skimage.morphology.remove_small_holes; a label image counts as its mask)",
        halo_rule="0 (region sizes are merged globally)",
        out_dtype=_holes_filled,
        needs_single_channel=True,
    )
)


# --- clear_border ----------------------------------------------------------------------------


class ClearBorderParams(OpParams):
    buffer_size: int = Field(
        0, ge=0, description="also remove objects within this many pixels of the border"
    )
    connectivity: OptionalConnectivity = None


def label_values(image: np.ndarray, connectivity: int) -> np.ndarray:
    """Components of equal non-zero values (a label image's objects, a mask's components),
    numbered in scan order of their first pixel: ``skimage.measure.label(image,
    background=0)``."""
    if image.dtype == np.bool_:
        return _label_mask(image, connectivity)
    return measure.label(image, background=0, connectivity=connectivity)


def _label_objects(image: np.ndarray, params: ClearBorderParams, ctx: OpContext) -> np.ndarray:
    connectivity = resolve_connectivity(params.connectivity, ctx.spatial_ndim)
    return label_values(image[0], connectivity).astype(np.int32, copy=False)[np.newaxis]


def _border_rule(params: ClearBorderParams, ctx: OpContext) -> ObjectRule:
    width = params.buffer_size + 1
    if ctx.shape and any(params.buffer_size >= n for n in ctx.shape):
        raise ValueError(
            f"`buffer_size` ({params.buffer_size}) must be smaller than every side of the "
            f"item {ctx.shape}, as in skimage.segmentation.clear_border"
        )

    def measure_border(
        source: np.ndarray, labels: np.ndarray, n: int, box: Box, shape: tuple[int, ...]
    ) -> np.ndarray:
        return _border_labels(labels, n, box, shape, width)[:, np.newaxis]

    return ObjectRule(
        columns=("on_border",),
        reduce=("max",),
        measure=measure_border,
        keep=lambda features: features[:, 0] == 0,
    )


register(
    Operation(
        name="clear_border",
        kind="connectivity",
        params=ClearBorderParams,
        apply=_label_objects,
        rule=_border_rule,
        finish=_kept_values,
        summary="drop objects that touch the item's border (skimage.segmentation.clear_border "
        "on the whole item: each label's components, connectivity ndim by default), e.g. the "
        "air around a CT body, cells cut by the field of view; ids are kept",
        halo_rule="0 (border contact is merged globally)",
        out_dtype=_integer_or_mask("clear_border"),
        needs_single_channel=True,
        by_class=lambda p: True,
        keeps_ids=True,
    )
)


# --- hysteresis ------------------------------------------------------------------------------


class HysteresisParams(LowHighParams):
    low: float = Field(description="pixels above `low` may belong to an object")
    high: float = Field(description="an object is kept if any of its pixels is above `high`")
    connectivity: Connectivity = 1


def _label_weak(image: np.ndarray, params: HysteresisParams, ctx: OpContext) -> np.ndarray:
    return _label_mask(image[0] > params.low, params.connectivity)[np.newaxis]


def _strong_rule(params: HysteresisParams, ctx: OpContext) -> ObjectRule:
    return _keep_marked(lambda source, box: source[0] > params.high)


register(
    Operation(
        name="hysteresis",
        kind="connectivity",
        params=HysteresisParams,
        apply=_label_weak,
        rule=_strong_rule,
        finish=_kept_mask,
        summary="keep regions above `low` that contain a pixel above `high` anywhere in the "
        "item (skimage.filters.apply_hysteresis_threshold)",
        halo_rule="0 (strong pixels are merged globally)",
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- region_grow -----------------------------------------------------------------------------


class RegionGrowParams(OpParams):
    low: float | None = Field(
        None, description="pixels with value >= low (and <= high) may join a region"
    )
    high: float | None = Field(None, description="upper end of the accepted range")
    tolerance: float | None = Field(
        None,
        ge=0,
        description="instead of low/high: a pixel may join a seed's region when it lies "
        "within tolerance of that seed's own value (needs `seeds`)",
    )
    seeds: list[list[int]] | None = Field(
        None,
        description="seed pixels as item coordinates [[y, x], ...] ((z, y, x) in 3D); "
        "without it, channel 2 of the input is a seed mask (non-zero = seed)",
    )
    connectivity: Connectivity = 1

    @model_validator(mode="after")
    def _one_range(self) -> RegionGrowParams:
        if self.tolerance is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either `tolerance` or `low`/`high`, not both")
            if not self.seeds:
                raise ValueError(
                    "`tolerance` needs seed points (`seeds`); with a seed-mask channel, "
                    "give the accepted range as `low`/`high`"
                )
            return self
        if self.low is None or self.high is None:
            raise ValueError("give the accepted range as `low` and `high`, or a `tolerance`")
        if self.low > self.high:
            raise ValueError(f"`low` ({self.low}) must not exceed `high` ({self.high})")
        return self


def _accepted(image: np.ndarray, params: RegionGrowParams) -> np.ndarray:
    values = image[0]
    return (values >= params.low) & (values <= params.high)


def _label_accepted(image: np.ndarray, params: RegionGrowParams, ctx: OpContext) -> np.ndarray:
    return _label_mask(_accepted(image, params), params.connectivity)[np.newaxis]


def _points_in(points: np.ndarray, box: Box) -> tuple[np.ndarray, ...]:
    """Block-local index arrays of the ``(n, ndim)`` item ``points`` inside ``box``."""
    inside = np.ones(len(points), dtype=bool)
    for axis, s in enumerate(box):
        inside &= (points[:, axis] >= s.start) & (points[:, axis] < s.stop)
    local = points[inside] - np.array([s.start for s in box])
    return tuple(local.T)


def _seeds_in(
    params: RegionGrowParams, source: np.ndarray, box: Box
) -> tuple[np.ndarray, ...] | np.ndarray:
    """This block's seed pixels: the points inside its core, or its seed-mask channel."""
    if params.seeds is None:
        return source[1] != 0
    return _points_in(np.asarray(params.seeds, dtype=np.int64).reshape(-1, len(box)), box)


def _grow_rule(params: RegionGrowParams, ctx: OpContext) -> ObjectRule:
    return _keep_marked(lambda source, box: _seeds_in(params, source, box))


def _check_flood_dtype(params: OpParams, dtype: np.dtype) -> np.dtype:
    """skimage.segmentation.flood's refusal: float16 images (cast to float32 first)."""
    if np.dtype(dtype) == np.float16:
        raise ValueError(
            "float16 images are not supported (as skimage.segmentation.flood); convert to "
            "float32 first, e.g. {op: combine_bands, weights: [1]}"
        )
    return np.dtype(dtype)


def _grown_mask(params: OpParams, dtype: np.dtype) -> np.dtype:
    _check_flood_dtype(params, dtype)
    return np.dtype(bool)


def _check_seed_channels(params: RegionGrowParams, channels: int) -> str | None:
    if params.seeds is None and channels != 2:
        return (
            f"without `seeds`, region_grow needs 2 channels (intensity, seed mask), got {channels}"
        )
    if params.seeds is not None and channels != 1:
        return f"with `seeds`, region_grow needs a single-channel image, got {channels}"
    return None


def _seeds_halo(seeds: list[list[int]] | None, ndim: int) -> tuple[int, ...]:
    """Halo 0 (seeds are merged globally), once every seed has ``ndim`` coordinates."""
    if seeds is not None and any(len(p) != ndim for p in seeds):
        raise ValueError(f"every seed needs {ndim} coordinates, got {seeds}")
    return (0,) * ndim


def _grow_parts(params: RegionGrowParams) -> list[tuple[str, str, OpParams]]:
    """With a ``tolerance``, each seed accepts a range of its own: one flood per seed.

    Seed ``k`` becomes two passes over the item: ``_seed_range`` reads the seed's value (a
    global statistic) and marks the pixels within tolerance of it; ``_grow_seed`` keeps the
    component of that mask holding the seed (stitched across blocks) and adds it to a union
    channel carried beside the image. ``_grow_start``/``_grow_end`` add and return the union.
    """
    if params.tolerance is None or params.seeds is None:
        return []
    parts: list[tuple[str, str, OpParams]] = [("start", "_grow_start", OpParams())]
    seeds = list(dict.fromkeys(tuple(p) for p in params.seeds))  # each seed once, in order
    for k, seed in enumerate(seeds):
        point, tolerance, connectivity = list(seed), params.tolerance, params.connectivity
        parts.append((f"seed{k}", "_seed_range", SeedParams(seed=point, tolerance=tolerance)))
        parts.append(
            (f"grow{k}", "_grow_seed", GrowSeedParams(seed=point, connectivity=connectivity))
        )
    parts.append(("end", "_grow_end", OpParams()))
    return parts


register(
    Operation(
        name="region_grow",
        kind="connectivity",
        params=RegionGrowParams,
        apply=_label_accepted,
        rule=_grow_rule,
        finish=_kept_mask,
        summary="grow regions from seed points (or a seed-mask channel) through connected "
        "pixels within [low, high] (skimage.segmentation.flood on the in-range mask, for "
        "every seed), or within `tolerance` of each seed's own value (skimage.segmentation."
        "flood(image, seed, tolerance=...), OR-ed over the seeds; two passes per seed), "
        "across blocks",
        halo=lambda p, ndim: _seeds_halo(p.seeds, ndim),
        halo_rule="0 (seeds are merged globally)",
        out_dtype=_grown_mask,
        out_channels=lambda p, channels: 1,
        check_channels=_check_seed_channels,
        expand=_grow_parts,
    )
)


# The parts of region_grow with a tolerance (not for configs: their names start with "_").
# Channels between them: (image, union[, in-range mask]), all in the image's dtype.


class SeedParams(OpParams):
    seed: list[int]
    tolerance: float = Field(ge=0)


class SeedValue:
    """The image value at one seed point (positional: only the block holding it answers)."""

    positional = True

    def __init__(self, seed: list[int]) -> None:
        self.seed = np.asarray(seed, dtype=np.int64).reshape(1, -1)

    def start(self) -> Any:
        return None

    def map(
        self, core: np.ndarray, state: Any, *, box: Box = (), shape: tuple[int, ...] = ()
    ) -> Any:
        if np.any(self.seed[0] < 0) or np.any(self.seed[0] >= np.asarray(shape)):
            return f"seed {self.seed[0].tolist()} lies outside the item of shape {shape}"
        index = _points_in(self.seed, box)
        return core[(0, *index)][0] if index[0].size else None

    def combine(self, partials: Sequence[Any], state: Any) -> Done:
        for found in partials:
            if isinstance(found, str):
                raise ValueError(f"region_grow: {found}")
            if found is not None:
                return Done(found)
        raise AssertionError("a seed inside the item lies in some block")


def _within_tolerance(image: np.ndarray, params: SeedParams, ctx: OpContext) -> np.ndarray:
    """Append the mask of pixels within ``tolerance`` of the seed's value, with the bounds
    clipped to the dtype and cast to it as ``skimage.segmentation.flood`` does."""
    value, dtype = ctx.stat, image.dtype
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    low = np.array(max(float(info.min), float(value) - params.tolerance)).astype(dtype)
    high = np.array(min(float(info.max), float(value) + params.tolerance)).astype(dtype)
    inside = (image[0] >= low) & (image[0] <= high)
    return np.concatenate([image, inside.astype(dtype)[np.newaxis]])


class GrowSeedParams(OpParams):
    seed: list[int]
    connectivity: Connectivity = 1


def _label_within(image: np.ndarray, params: GrowSeedParams, ctx: OpContext) -> np.ndarray:
    return _label_mask(image[2] != 0, params.connectivity)[np.newaxis]


def _seed_rule(params: GrowSeedParams, ctx: OpContext) -> ObjectRule:
    point = np.asarray(params.seed, dtype=np.int64).reshape(1, -1)
    return _keep_marked(lambda source, box: _points_in(point, box))


def _add_grown(ids: np.ndarray, source: np.ndarray | None, params: OpParams) -> np.ndarray:
    assert source is not None
    union = np.maximum(source[1], (ids != 0).astype(source.dtype))
    return np.stack([source[0], union])


register(
    Operation(
        name="_grow_start",
        kind="pointwise",
        params=OpParams,
        apply=lambda image, p, ctx: np.concatenate([image, np.zeros_like(image)]),
        summary="region_grow: add an empty union channel",
        out_channels=lambda p, channels: 2,
        out_dtype=_check_flood_dtype,
        needs_single_channel=True,
    )
)
register(
    Operation(
        name="_seed_range",
        kind="global",
        params=SeedParams,
        apply=_within_tolerance,
        statistic=lambda p: SeedValue(p.seed),
        summary="region_grow: mark the pixels within tolerance of one seed's value",
        halo=lambda p, ndim: _seeds_halo([p.seed], ndim),
        out_channels=lambda p, channels: 3,
    )
)
register(
    Operation(
        name="_grow_seed",
        kind="connectivity",
        params=GrowSeedParams,
        apply=_label_within,
        rule=_seed_rule,
        finish=_add_grown,
        summary="region_grow: add the marked component holding one seed to the union",
        out_channels=lambda p, channels: 2,
    )
)
register(
    Operation(
        name="_grow_end",
        kind="pointwise",
        params=OpParams,
        apply=lambda image, p, ctx: image[1:2] != 0,
        summary="region_grow: the union of the grown regions",
        out_channels=lambda p, channels: 1,
        out_dtype=lambda p, dtype: np.dtype(bool),
    )
)

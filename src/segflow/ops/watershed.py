"""Watershed splitting of touching objects, blockwise-exact within a stated object size.

Strategy (a halo bound, checked at run time): the watershed of a foreground region depends
only on that region — its distance transform, its distance peaks and the flooding all stay
inside the connected component. Ties need care: scikit-image floods equal values in heap
insertion order, which depends on everything else in the array, so the flooding priority
here is the distance with ties broken by item scan order (:func:`flooding_order`), a total
order that any window containing the region agrees on. So where every foreground component
that touches a block's core lies inside the block's window (core + ``max_object_size``), the
block computes exactly what the whole-array pipeline computes there. A block that finds such
a component touching its window edge raises an error naming the position instead of writing
a wrong answer: raise ``max_object_size`` (the halo) then.

Each region is named by its marker's item position, so blocks agree on it without talking;
a following ``{op: label, classes: true}`` turns these names into consecutive instance ids
stitched across blocks.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed as _watershed

from segflow.ops.label import Connectivity, connectivity_structure
from segflow.ops.registry import OpContext, Operation, OpParams, register


class WatershedParams(OpParams):
    min_distance: int = Field(
        3, ge=1, description="minimum pixels between two markers (distance-transform peaks)"
    )
    max_object_size: int = Field(
        64,
        ge=1,
        description="largest extent of a foreground region in pixels along any axis (the "
        "halo); a larger region stops the item with an error",
    )
    connectivity: Connectivity = 1


def split_touching(mask: np.ndarray, params: WatershedParams, ctx: OpContext) -> np.ndarray:
    """Split touching objects: markers at the peaks of the distance to the background
    (``skimage.feature.peak_local_max`` per connected region, ``min_distance``, borders
    included), then ``skimage.segmentation.watershed`` from those markers within the mask,
    flooding by decreasing distance (ties in item scan order, see :func:`flooding_order`).

    Returns, for every foreground pixel, ``1 +`` the item-wide linear index of its region's
    marker (int64; 0 = background).
    """
    foreground = mask[0] != 0
    if not ctx.box or not ctx.shape:
        raise ValueError("watershed needs the block's position in the item")
    structure = connectivity_structure(params.connectivity, ctx.spatial_ndim)
    regions, n = ndi.label(foreground, structure=structure)
    _check_window(regions, params, ctx)
    if n == 0:
        return np.zeros((1, *foreground.shape), dtype=np.int64)
    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(
        distance, min_distance=params.min_distance, labels=regions, exclude_border=False
    )
    markers = np.zeros(foreground.shape, dtype=np.int64)
    item = np.ravel_multi_index(
        tuple(p + s.start for p, s in zip(peaks.T, ctx.box, strict=True)), ctx.shape
    )
    markers[tuple(peaks.T)] = item + 1
    flooded = _watershed(
        flooding_order(distance), markers, mask=foreground, connectivity=params.connectivity
    )
    return flooded.astype(np.int64, copy=False)[np.newaxis]


def flooding_order(distance: np.ndarray) -> np.ndarray:
    """Flooding priority: larger distance first, ties in scan order; all values distinct.

    ``(D - d^2) * size + flat index`` with ``d^2`` the exact squared distance (an integer
    for unit pixels): for any two pixels it orders them as the whole array would, since
    scan order within a window is scan order in the item. Exact in float64 while
    ``D * size < 2^53`` (far beyond a block).
    """
    squared = np.rint(distance * distance).astype(np.int64)
    top = int(squared.max()) + 1
    index = np.arange(distance.size, dtype=np.int64).reshape(distance.shape)
    return ((top - squared) * distance.size + index).astype(np.float64)


def _check_window(regions: np.ndarray, params: WatershedParams, ctx: OpContext) -> None:
    """Refuse when a region that reaches the block's core also reaches the window's edge
    inside the item: it may continue beyond what the block sees."""
    halo = params.max_object_size + 1
    core = tuple(
        slice(halo if s.start > 0 else 0, n - halo if s.stop < size else n)
        for s, size, n in zip(ctx.box, ctx.shape, regions.shape, strict=True)
    )
    inner = np.unique(regions[core])
    for axis, (s, size) in enumerate(zip(ctx.box, ctx.shape, strict=True)):
        for side, interior in ((0, s.start > 0), (-1, s.stop < size)):
            if not interior:
                continue
            edge = np.take(regions, side, axis=axis)
            crossing = np.isin(edge, inner[inner != 0])
            if crossing.any():
                where = list(np.argwhere(crossing)[0])
                where.insert(axis, side % regions.shape[axis])
                position = tuple(int(i) + b.start for i, b in zip(where, ctx.box, strict=True))
                raise ValueError(
                    f"watershed: the foreground region at {position} reaches past the block's "
                    f"window; `max_object_size` ({params.max_object_size}) must exceed the "
                    "largest region's extent in pixels (the result would not be exact)"
                )


register(
    Operation(
        name="watershed",
        kind="local",
        params=WatershedParams,
        apply=split_touching,
        summary="split touching objects by a watershed from distance-transform peaks; exact "
        "when every foreground region is at most max_object_size pixels across (checked)",
        halo=lambda p, ndim: (p.max_object_size + 1,) * ndim,
        halo_rule="max_object_size + 1",
        out_dtype=lambda dtype, p: np.dtype(np.int64),
        needs_single_channel=True,
    )
)

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
from skimage.filters import sobel
from skimage.segmentation import watershed as _watershed

from segflow.ops.label import Connectivity, connectivity_structure
from segflow.ops.registry import LowHighParams, OpContext, Operation, OpParams, register


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
    _check_window(regions, params.max_object_size, ctx)
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


def _check_window(
    regions: np.ndarray,
    size_limit: int,
    ctx: OpContext,
    *,
    margin: int = 1,
    what: str = "foreground region",
    name: str = "max_object_size",
) -> None:
    """Refuse when a region that reaches the block's core also comes within ``margin``
    pixels of the window's edge inside the item: it may continue beyond what the block sees
    (or need values the block cannot compute there)."""
    halo = size_limit + margin
    core = tuple(
        slice(halo if s.start > 0 else 0, n - halo if s.stop < size else n)
        for s, size, n in zip(ctx.box, ctx.shape, regions.shape, strict=True)
    )
    inner = np.unique(regions[core])
    for axis, (s, size) in enumerate(zip(ctx.box, ctx.shape, strict=True)):
        for side, interior in ((0, s.start > 0), (-1, s.stop < size)):
            if not interior:
                continue
            n = regions.shape[axis]
            ring = range(margin) if side == 0 else range(n - margin, n)
            for index in ring:
                if not 0 <= index < n:
                    continue
                edge = np.take(regions, index, axis=axis)
                crossing = np.isin(edge, inner[inner != 0])
                if crossing.any():
                    where = list(np.argwhere(crossing)[0])
                    where.insert(axis, index)
                    position = tuple(int(i) + b.start for i, b in zip(where, ctx.box, strict=True))
                    raise ValueError(
                        f"watershed: the {what} at {position} reaches past the block's "
                        f"window; `{name}` ({size_limit}) must exceed the largest "
                        "region's extent in pixels (the result would not be exact)"
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
        out_dtype=lambda p, dtype: np.dtype(np.int64),
        needs_single_channel=True,
    )
)


# --- marker-controlled watershed on the gradient --------------------------------------------


class MarkerWatershedParams(LowHighParams):
    low: float = Field(description="background markers: pixels below this value")
    high: float = Field(description="object markers: pixels above this value")
    max_region_size: int = Field(
        64,
        ge=1,
        description="largest extent in pixels of a region between the markers (values in "
        "[low, high]) along any axis; the halo. A larger region stops the item with an error",
    )
    connectivity: Connectivity = 1


def rank_order(elevation: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Flooding priority: the rank of each pixel by elevation, ties in scan order. Ranks in a
    window order any two of its pixels as ranks over the whole item would.

    With ``where``, only those pixels are ranked (from 1; the others get 0): the order among
    them is the same.
    """
    flat = elevation.ravel()
    index = np.arange(flat.size) if where is None else np.flatnonzero(where)
    order = index[np.argsort(flat[index], kind="stable")]
    ranks = np.zeros(flat.size, dtype=np.float64)
    ranks[order] = np.arange(1, order.size + 1, dtype=np.float64)
    return ranks.reshape(elevation.shape)


def gradient_markers(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Markers from the intensity: 1 below ``low`` (background), 2 above ``high`` (objects),
    0 in between (to be flooded)."""
    markers = np.zeros(image.shape, dtype=np.int8)
    markers[image < low] = 1
    markers[image > high] = 2
    return markers


def marker_watershed(
    image: np.ndarray, params: MarkerWatershedParams, ctx: OpContext
) -> np.ndarray:
    """Objects by a watershed of the Sobel gradient from intensity markers: background
    below ``low``, objects above ``high``, the pixels in between flooded from both by
    increasing gradient (``skimage.segmentation.watershed(sobel(image), markers) == 2``,
    the classic "elevation map" recipe), as a mask.

    Exact blockwise where every region between the markers is at most ``max_region_size``
    pixels across: such a region is flooded only from the markers around it, in the order
    of its own gradient values, all inside each block's window (checked, with 2 pixels to
    spare for the gradient). Equal gradients are flooded in item scan order
    (:func:`rank_order`); scikit-image breaks such ties by heap insertion order.
    """
    values = image[0]
    if not ctx.box or not ctx.shape:
        raise ValueError("marker_watershed needs the block's position in the item")
    markers = gradient_markers(values, params.low, params.high)
    structure = connectivity_structure(params.connectivity, ctx.spatial_ndim)
    between = markers == 0
    regions, _ = ndi.label(between, structure=structure)
    _check_window(
        regions,
        params.max_region_size,
        ctx,
        margin=2,
        what="region between the markers",
        name="max_region_size",
    )
    elevation = sobel(values.astype(np.float64))
    # Only the pixels between the markers and the marker pixels next to them take part in
    # the flooding (a marker pixel with only marker neighbours labels nothing), so the
    # watershed runs on those alone: the same labels, about half the heap on typical images.
    flooding = ndi.binary_dilation(between, structure=structure)
    flooded = _watershed(
        rank_order(elevation, flooding),
        markers,
        mask=flooding,
        connectivity=params.connectivity,
    )
    return np.where(flooding, flooded == 2, markers == 2)[np.newaxis]


register(
    Operation(
        name="marker_watershed",
        kind="local",
        params=MarkerWatershedParams,
        apply=marker_watershed,
        summary="objects by a watershed of the Sobel gradient from intensity markers (below "
        "low: background, above high: objects); exact when the regions between the markers "
        "are at most max_region_size pixels across (checked)",
        halo=lambda p, ndim: (p.max_region_size + 3,) * ndim,
        halo_rule="max_region_size + 3",
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- instances from a distance head ----------------------------------------------------------


class DistanceWatershedParams(WatershedParams):
    threshold: float = Field(
        0.0,
        description="foreground where the first channel (a logit or probability) is above this "
        "(0: probability 0.5 for a logit)",
    )
    min_peak: float = Field(
        0.3,
        description="markers only at distance peaks above this (the distance head's scale: 1 at "
        "an object's centre)",
    )


def distance_watershed(
    image: np.ndarray, params: DistanceWatershedParams, ctx: OpContext
) -> np.ndarray:
    """Instances from a distance head's output ``(foreground, distance)``: markers at the
    predicted distance's peaks (``peak_local_max`` per foreground region, ``min_distance``,
    above ``min_peak``), flooded by decreasing predicted distance within the foreground (ties
    in item scan order, :func:`rank_order`). Regions named as :func:`split_touching` names
    them (``1 +`` the marker's item-wide index); a foreground region without a peak above
    ``min_peak`` stays background.
    """
    if not ctx.box or not ctx.shape:
        raise ValueError("distance_watershed needs the block's position in the item")
    foreground = image[0] > params.threshold
    distance = np.where(foreground, image[1].astype(np.float64), 0.0)
    structure = connectivity_structure(params.connectivity, ctx.spatial_ndim)
    regions, n = ndi.label(foreground, structure=structure)
    _check_window(regions, params.max_object_size, ctx)
    if n == 0:
        return np.zeros((1, *foreground.shape), dtype=np.int64)
    peaks = peak_local_max(
        distance,
        min_distance=params.min_distance,
        labels=regions,
        threshold_abs=params.min_peak,
        exclude_border=False,
    )
    markers = np.zeros(foreground.shape, dtype=np.int64)
    item = np.ravel_multi_index(
        tuple(p + s.start for p, s in zip(peaks.T, ctx.box, strict=True)), ctx.shape
    )
    markers[tuple(peaks.T)] = item + 1
    flooded = _watershed(
        rank_order(-distance, foreground),
        markers,
        mask=foreground,
        connectivity=params.connectivity,
    )
    return flooded.astype(np.int64, copy=False)[np.newaxis]


def _two_channels(params: DistanceWatershedParams, channels: int) -> str | None:
    if channels != 2:
        return (
            f"needs the 2 channels of a distance head (foreground, distance), got {channels}: "
            "use the model step's `output: raw`"
        )
    return None


register(
    Operation(
        name="distance_watershed",
        kind="local",
        params=DistanceWatershedParams,
        apply=distance_watershed,
        summary="instances from a distance head (foreground, distance): a watershed from the "
        "predicted distance's peaks within the foreground; exact when every foreground region "
        "is at most max_object_size pixels across (checked)",
        halo=lambda p, ndim: (p.max_object_size + 1,) * ndim,
        halo_rule="max_object_size + 1",
        out_channels=lambda p, channels: 1,
        out_dtype=lambda p, dtype: np.dtype(np.int64),
        check_channels=_two_channels,
    )
)

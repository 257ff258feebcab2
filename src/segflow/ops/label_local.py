"""Local operations on label images: grow labels into the background, mark their boundaries.

Both run after a connectivity step; their halo comes from the neighbouring blocks' finished
labels, so they see the same ids as the whole-array reference.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field
from skimage.segmentation import expand_labels as _expand_labels
from skimage.segmentation import find_boundaries

from segflow.ops.distance import pixel_sizes
from segflow.ops.label import Connectivity
from segflow.ops.registry import OpContext, Operation, OpParams, register


class ExpandParams(OpParams):
    distance: float = Field(
        1.0, ge=0, description="grow each label by up to this distance (item units)"
    )
    sampling: Literal["item", "pixel"] = Field(
        "item", description="measure with the item's pixel spacing, or in pixels"
    )


def _expand_halo(params: ExpandParams, ndim: int, spacing: tuple[float, ...]) -> tuple[int, ...]:
    # One pixel more than the reach: a pixel's nearest label and its competitors must both be
    # inside the window for ties to break as they do on the whole array.
    sizes = pixel_sizes(params.sampling, ndim, spacing)
    return tuple(math.ceil(params.distance / s) + 1 for s in sizes)


def expand_labels(labels: np.ndarray, params: ExpandParams, ctx: OpContext) -> np.ndarray:
    """``skimage.segmentation.expand_labels``: background pixels within ``distance`` of a
    label take the nearest label's id; labels never overlap."""
    sizes = pixel_sizes(params.sampling, ctx.spatial_ndim, ctx.spacing)
    return _expand_labels(labels[0], distance=params.distance, spacing=sizes)[np.newaxis]


register(
    Operation(
        name="expand_labels",
        kind="local",
        params=ExpandParams,
        apply=expand_labels,
        summary="grow labels into the background by a distance without overlap "
        "(skimage.segmentation.expand_labels)",
        halo_rule="ceil(distance / spacing) + 1 per axis",
        halo_spacing=_expand_halo,
        needs_single_channel=True,
    )
)


class BoundaryParams(OpParams):
    mode: Literal["thick", "inner", "outer", "subpixel"] = "thick"
    connectivity: Connectivity = 1


def label_boundaries(labels: np.ndarray, params: BoundaryParams, ctx: OpContext) -> np.ndarray:
    """``skimage.segmentation.find_boundaries``: pixels where the label changes."""
    if params.mode == "subpixel":
        raise ValueError("mode 'subpixel' changes the image shape; use thick, inner or outer")
    found = find_boundaries(labels[0], connectivity=params.connectivity, mode=params.mode)
    return found[np.newaxis]


register(
    Operation(
        name="label_boundaries",
        kind="local",
        params=BoundaryParams,
        apply=label_boundaries,
        summary="mask of the boundaries between labels (skimage.segmentation.find_boundaries)",
        halo=lambda p, ndim: (1,) * ndim,
        halo_rule="1",
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)

"""Binary morphology with a disk (2D) or ball (3D) of a given radius."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi
from skimage.morphology import ball, disk

from segflow.ops.registry import OpContext, Operation, OpParams, register


class MorphologyParams(OpParams):
    radius: int = Field(1, ge=1, description="footprint radius in pixels")
    footprint: Literal["disk", "square"] = "disk"


def make_footprint(radius: int, shape: str, ndim: int) -> np.ndarray:
    """A disk/ball (Euclidean) or square/cube of the given radius, as a bool array."""
    if shape == "square":
        return np.ones((2 * radius + 1,) * ndim, dtype=bool)
    if ndim == 2:
        return disk(radius).astype(bool)
    if ndim == 3:
        return ball(radius).astype(bool)
    raise ValueError(f"a disk footprint needs 2 or 3 spatial axes, got {ndim}")


def _footprint(params: MorphologyParams, ctx: OpContext) -> np.ndarray:
    # A leading axis of length 1: channels never mix.
    return make_footprint(params.radius, params.footprint, ctx.spatial_ndim)[np.newaxis]


def binary_opening(mask: np.ndarray, params: MorphologyParams, ctx: OpContext) -> np.ndarray:
    """Erosion then dilation; equals ``skimage.morphology.binary_opening`` (mode "ignore").

    As in scikit-image, the item border does not erode objects that touch it: outside the
    item counts as foreground for the erosion and as background for the dilation.
    """
    footprint = _footprint(params, ctx)
    eroded = ndi.binary_erosion(mask, footprint, border_value=1)
    return ndi.binary_dilation(eroded, footprint, border_value=0)


def binary_closing(mask: np.ndarray, params: MorphologyParams, ctx: OpContext) -> np.ndarray:
    """Dilation then erosion; equals ``skimage.morphology.binary_closing`` (mode "ignore")."""
    footprint = _footprint(params, ctx)
    dilated = ndi.binary_dilation(mask, footprint, border_value=0)
    return ndi.binary_erosion(dilated, footprint, border_value=1)


for _name, _func, _what in (
    ("binary_opening", binary_opening, "erosion then dilation"),
    ("binary_closing", binary_closing, "dilation then erosion"),
):
    register(
        Operation(
            name=_name,
            kind="local",
            params=MorphologyParams,
            apply=_func,
            summary=f"binary {_what} with a disk/ball or square footprint",
            # Two passes of the footprint: each output pixel sees 2 * radius pixels away.
            halo=lambda p, ndim: (2 * p.radius,) * ndim,
            halo_rule="2 * radius",
            out_dtype=lambda p, dtype: np.dtype(bool),
        )
    )

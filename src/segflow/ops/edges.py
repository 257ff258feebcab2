"""Edges and adaptive thresholds: local operations whose halo follows from their parameters."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator
from skimage.feature import _canny
from skimage.filters import scharr, sobel, threshold_local
from skimage.util.dtype import dtype_limits

from segflow.ops.filters import gaussian_radius
from segflow.ops.registry import LowHighParams, OpContext, Operation, OpParams, register

# --- gradient magnitude -------------------------------------------------------------------------


class GradientParams(OpParams):
    mode: Literal["reflect", "nearest", "mirror", "constant"] = "reflect"


def _gradient(name: str) -> Operation[GradientParams]:
    function = {"sobel": sobel, "scharr": scharr}[name]

    def apply(image: np.ndarray, params: GradientParams, ctx: OpContext) -> np.ndarray:
        return function(image[0], mode=params.mode)[np.newaxis].astype(np.float32)

    apply.__doc__ = f"Gradient magnitude, ``skimage.filters.{name}`` (3x3 kernels, any ndim)."
    return Operation(
        name=name,
        kind="local",
        params=GradientParams,
        apply=apply,
        summary=f"gradient magnitude (skimage.filters.{name})",
        halo=lambda p, ndim: (1,) * ndim,
        halo_rule="1",
        out_dtype=lambda dtype, p: np.dtype(np.float32),
        needs_single_channel=True,
    )


register(_gradient("sobel"))
register(_gradient("scharr"))


# --- adaptive threshold -------------------------------------------------------------------------


class LocalThresholdParams(OpParams):
    block_size: int = Field(description="odd size of the neighbourhood, in pixels")
    method: Literal["gaussian", "mean", "median"] = "gaussian"
    offset: float = Field(0.0, description="subtracted from the local threshold")
    sigma: float | None = Field(None, gt=0, description="gaussian method: default (size-1)/6")
    mode: Literal["reflect", "nearest", "mirror", "constant"] = "reflect"

    @field_validator("block_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value < 1 or value % 2 == 0:
            raise ValueError(f"must be a positive odd number (got {value})")
        return value


def _local_halo(params: LocalThresholdParams, ndim: int) -> tuple[int, ...]:
    if params.method == "gaussian":
        sigma = params.sigma if params.sigma is not None else (params.block_size - 1) / 6.0
        return (gaussian_radius(sigma, 4.0),) * ndim
    return (params.block_size // 2,) * ndim


def local_threshold(image: np.ndarray, params: LocalThresholdParams, ctx: OpContext) -> np.ndarray:
    """Foreground where the pixel exceeds its neighbourhood's threshold:
    ``image > skimage.filters.threshold_local(image, block_size, method, offset)``."""
    values = image[0]
    threshold = threshold_local(
        values,
        params.block_size,
        method=params.method,
        offset=params.offset,
        mode=params.mode,
        param=params.sigma if params.method == "gaussian" else None,
    )
    return (values > threshold)[np.newaxis]


register(
    Operation(
        name="threshold_local",
        kind="local",
        params=LocalThresholdParams,
        apply=local_threshold,
        summary="adaptive threshold: image > local mean/gaussian/median minus offset "
        "(skimage.filters.threshold_local)",
        halo=_local_halo,
        halo_rule="block_size // 2 (mean, median); int(4 * sigma + 0.5) (gaussian)",
        out_dtype=lambda dtype, p: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- Canny ----------------------------------------------------------------------------------------


class CannyParams(LowHighParams):
    sigma: float = Field(1.0, ge=0, description="gaussian smoothing before the gradient")
    low: float = Field(0.1, ge=0, description="low threshold of the gradient magnitude")
    high: float = Field(0.2, ge=0, description="high threshold of the gradient magnitude")


def _canny_halo(params: CannyParams, ndim: int) -> tuple[int, ...]:
    # smoothing radius, then the 3x3 Sobel, then the 3x3 non-maximum suppression
    return (gaussian_radius(params.sigma, 4.0) + 2,) * ndim


def canny_candidates(image: np.ndarray, params: CannyParams, ctx: OpContext) -> np.ndarray:
    """The first half of ``skimage.feature.canny``: 0 off edges, 1 for weak edge pixels (local
    maxima of the gradient at or above ``low``), 2 for strong ones (at or above ``high``).

    Follow it with ``{op: hysteresis, low: 0.5, high: 1.5, connectivity: 2}``: the edge
    tracking is then global, and the result equals ``skimage.feature.canny(image, sigma,
    low, high)`` on the whole item (thresholds are scaled by the dtype's maximum for integer
    images, as there).
    """
    values = image[0]
    scale = dtype_limits(values, clip_negative=False)[1]
    low, high = params.low / scale, params.high / scale
    # scikit-image's own smoothing and non-maximum suppression (private helpers of canny()):
    # the tests compare with skimage.feature.canny, so a change there shows at once.
    smoothed, eroded = _canny._preprocess(values, None, params.sigma, "constant", 0.0)
    jsobel = _canny.ndi.sobel(smoothed, axis=1)
    isobel = _canny.ndi.sobel(smoothed, axis=0)
    magnitude = np.sqrt(isobel * isobel + jsobel * jsobel)
    maxima = _canny._nonmaximum_suppression_bilinear(isobel, jsobel, magnitude, eroded, low)
    out = (maxima > 0).astype(np.uint8)
    out[maxima >= high] = 2
    out[maxima <= 0] = 0
    return out[np.newaxis]


register(
    Operation(
        name="canny",
        kind="local",
        params=CannyParams,
        apply=canny_candidates,
        summary="Canny edge candidates (0 none, 1 weak, 2 strong); follow with "
        "{op: hysteresis, low: 0.5, high: 1.5, connectivity: 2} for skimage.feature.canny",
        halo=_canny_halo,
        halo_rule="int(4 * sigma + 0.5) + 2",
        out_dtype=lambda dtype, p: np.dtype(np.uint8),
        needs_single_channel=True,
        ndims=(2,),
    )
)

"""Edges and adaptive thresholds: local operations whose halo follows from their parameters."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from skimage.feature import _canny
from skimage.filters import scharr, sobel, threshold_local
from skimage.util.dtype import dtype_limits

from segflow.ops.filters import gaussian_radius
from segflow.ops.registry import OpContext, Operation, OpParams, register
from segflow.ops.statistics import Percentiles

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
        out_dtype=lambda p, dtype: np.dtype(np.float32),
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


# scipy.ndimage border modes as numpy.pad names them
_NUMPY_PAD = {
    "reflect": "symmetric",
    "mirror": "reflect",
    "nearest": "edge",
    "constant": "constant",
}


def _window_sums(values: np.ndarray, size: int, axis: int, n: int) -> np.ndarray:
    """Sums of ``size`` consecutive values along ``axis`` (``n`` of them), from sums of
    power-of-two runs: every output is the same few additions in the same order, wherever
    it lies (``size`` = 35 is runs of 32, 2 and 1)."""

    def cut(array: np.ndarray, start: int, length: int) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, start + length)
        return array[tuple(index)]

    runs = {1: values}
    width = 1
    while 2 * width <= size:
        run = runs[width]
        length = run.shape[axis] - width
        runs[2 * width] = cut(run, 0, length) + cut(run, width, length)
        width *= 2
    total, offset = None, 0
    while width:
        if size & width:
            part = cut(runs[width], offset, n)
            total = part.copy() if total is None else np.add(total, part, out=total)
            offset += width
        width //= 2
    assert total is not None
    return total


def local_mean(values: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Mean over a ``size``-wide cube around each pixel, the same arithmetic wherever the
    pixel lies (``scipy.ndimage.uniform_filter`` keeps a running sum from the start of each
    line, so its rounding depends on where a block starts).

    Integer images sum exactly (int64); float images in their float type (at least
    float32), each window from the same power-of-two runs (:func:`_window_sums`).
    """
    padded = np.pad(values, size // 2, mode=_NUMPY_PAD[mode])  # type: ignore[call-overload]
    exact = values.dtype.kind in "uib"
    sums = padded.astype(np.int64 if exact else np.result_type(values.dtype, np.float32))
    for axis in range(values.ndim):
        sums = _window_sums(sums, size, axis, values.shape[axis])
    return sums / float(size**values.ndim)


def local_threshold(image: np.ndarray, params: LocalThresholdParams, ctx: OpContext) -> np.ndarray:
    """Foreground where the pixel exceeds its neighbourhood's threshold:
    ``image > skimage.filters.threshold_local(image, block_size, method, offset)``.

    The gaussian and median methods are scikit-image's, bit for bit. The mean method uses
    :func:`local_mean`, which does not depend on the block layout; it equals scikit-image
    except where a pixel equals its local mean within rounding (flat regions of integer
    images): there scikit-image's running-sum rounding decides, here exact arithmetic does.
    """
    values = image[0]
    if params.method == "mean":
        threshold = local_mean(values, params.block_size, params.mode) - params.offset
        return (values > threshold)[np.newaxis]
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
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- Canny ----------------------------------------------------------------------------------------


#: scikit-image's thresholds where none is given: fractions of the range of the image after
#: its conversion to float (``img_as_float``: 0..1 for unsigned integers), or quantiles.
CANNY_LOW, CANNY_HIGH = 0.1, 0.2


class CannyParams(OpParams):
    sigma: float = Field(1.0, ge=0, description="gaussian smoothing before the gradient")
    low: float | None = Field(
        None,
        ge=0,
        description="low threshold of the gradient magnitude, in the image's units (scaled "
        "by the dtype's maximum for integer images); default: 0.1 of the float-converted "
        "image's range (10 % of the dtype maximum), as skimage.feature.canny",
    )
    high: float | None = Field(
        None,
        ge=0,
        description="high threshold, as `low`; default: 0.2 of the float-converted range "
        "(20 % of the dtype maximum)",
    )
    use_quantiles: bool = Field(
        False,
        description="low/high are quantiles (0..1) of the item's gradient magnitude "
        "(exact, over every block) instead of values; defaults 0.1 and 0.2",
    )

    @model_validator(mode="after")
    def _thresholds(self) -> CannyParams:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"`low` ({self.low}) must not exceed `high` ({self.high})")
        if self.use_quantiles:
            for name, value in (("low", self.low), ("high", self.high)):
                if value is not None and not value <= 1:
                    raise ValueError(f"with `use_quantiles`, low/high are 0..1, got {name}={value}")
        return self


def canny_thresholds(params: CannyParams, dtype: np.dtype) -> tuple[float, float]:
    """``(low, high)`` as the suppression compares them: on the float-converted magnitude
    (value thresholds divided by the dtype's maximum; defaults 0.1 and 0.2 as they are), or
    quantiles. As ``skimage.feature.canny`` computes them."""
    scale = (
        1.0
        if params.use_quantiles
        else float(dtype_limits(np.empty(0, dtype), clip_negative=False)[1])
    )
    low = CANNY_LOW if params.low is None else params.low / scale
    high = CANNY_HIGH if params.high is None else params.high / scale
    return low, high


def _check_canny_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.int64), np.dtype(np.uint64)):
        raise ValueError(
            f"64-bit integer images are not supported (got {dtype}), as in "
            "skimage.feature.canny; convert to float64 or a narrower integer first"
        )
    return dtype


def _check_canny(params: CannyParams, dtype: np.dtype) -> np.dtype:
    """The refusals of ``skimage.feature.canny``, at plan time."""
    dtype = _check_canny_dtype(dtype)
    low, high = canny_thresholds(params, dtype)
    if high < low:
        raise ValueError(
            f"the high threshold ({high:g}) is below the low one ({low:g}) after scaling "
            f"to the {dtype} image's float range; give both `low` and `high`"
        )
    return np.dtype(np.uint8)


def _canny_halo(params: CannyParams, ndim: int) -> tuple[int, ...]:
    # smoothing radius, then the 3x3 Sobel, then the 3x3 non-maximum suppression
    return (gaussian_radius(params.sigma, 4.0) + 2,) * ndim


def _maxima(values: np.ndarray, sigma: float, low: float) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitude and its non-maximum-suppressed maxima at or above ``low``, with
    scikit-image's own smoothing and suppression (private helpers of canny(): the tests
    compare with skimage.feature.canny, so a change there shows at once)."""
    smoothed, eroded = _canny._preprocess(values, None, sigma, "constant", 0.0)
    jsobel = _canny.ndi.sobel(smoothed, axis=1)
    isobel = _canny.ndi.sobel(smoothed, axis=0)
    magnitude = np.sqrt(isobel * isobel + jsobel * jsobel)
    return magnitude, _canny._nonmaximum_suppression_bilinear(
        isobel, jsobel, magnitude, eroded, low
    )


def _weak_strong(maxima: np.ndarray, high: float) -> np.ndarray:
    out = (maxima > 0).astype(np.uint8)
    out[(maxima >= high) & (out > 0)] = 2
    return out


def canny_candidates(image: np.ndarray, params: CannyParams, ctx: OpContext) -> np.ndarray:
    """The first half of ``skimage.feature.canny``: 0 off edges, 1 for weak edge pixels (local
    maxima of the gradient at or above ``low``), 2 for strong ones (at or above ``high``).

    Follow it with ``{op: hysteresis, low: 0.5, high: 1.5, connectivity: 2}``: the edge
    tracking is then global, and the result equals ``skimage.feature.canny(image, sigma,
    low, high, use_quantiles)`` on the whole item: value thresholds are scaled by the
    dtype's maximum for integer images, and without them the defaults are 0.1 and 0.2 of
    the float-converted image's range (10 % and 20 % of an integer dtype's maximum), as
    there. With ``use_quantiles`` the step runs as
    two: the magnitude and its maxima (local), then the exact quantiles of the item's
    magnitude (a global statistic) turn the maxima into weak/strong candidates.
    """
    values = image[0]
    low, high = canny_thresholds(params, values.dtype)
    _, maxima = _maxima(values, params.sigma, low)
    return _weak_strong(maxima, high)[np.newaxis]


def _canny_parts(params: CannyParams) -> list[tuple[str, str, OpParams]]:
    if not params.use_quantiles:
        return []
    return [("maxima", "_canny_maxima", params), ("quantiles", "_canny_quantiles", params)]


def _all_maxima(image: np.ndarray, params: CannyParams, ctx: OpContext) -> np.ndarray:
    """Channels (maxima at or above 0, magnitude): thresholding the first at ``t`` later
    equals suppressing with ``low = t`` (the suppression tests the magnitude first)."""
    magnitude, maxima = _maxima(image[0], params.sigma, 0.0)
    return np.stack([maxima, magnitude])


class _MagnitudeQuantiles(Percentiles):
    """Exact percentiles of the magnitude channel only."""

    def map(self, core: np.ndarray, state: Any) -> Any:
        return super().map(core[1:], state)


def _quantile_candidates(image: np.ndarray, params: CannyParams, ctx: OpContext) -> np.ndarray:
    low, high = ctx.stat
    # scikit-image's suppression takes ``low`` as a C float: it keeps a maximum at or above
    # the quantile rounded to float32, so a pixel whose magnitude is the quantile itself
    # stays or goes with that rounding. ``high`` is compared at full precision.
    maxima = np.where(image[0] >= float(np.float32(low)), image[0], 0)
    return _weak_strong(maxima, high)[np.newaxis]


register(
    Operation(
        name="canny",
        kind="local",
        params=CannyParams,
        apply=canny_candidates,
        summary="Canny edge candidates (0 none, 1 weak, 2 strong); follow with "
        "{op: hysteresis, low: 0.5, high: 1.5, connectivity: 2} for skimage.feature.canny; "
        "default low/high: 10 % / 20 % of the dtype's maximum (0.1 / 0.2 for float images), "
        "as scikit-image",
        halo=_canny_halo,
        halo_rule="int(4 * sigma + 0.5) + 2",
        out_dtype=_check_canny,
        needs_single_channel=True,
        ndims=(2,),
        expand=_canny_parts,
    )
)
register(
    Operation(
        name="_canny_maxima",
        kind="local",
        params=CannyParams,
        apply=_all_maxima,
        summary="canny: gradient magnitude and its maxima",
        halo=_canny_halo,
        out_channels=lambda p, channels: 2,
        out_dtype=lambda p, dtype: np.dtype(
            np.float32 if _check_canny_dtype(dtype) == np.float32 else np.float64
        ),
        needs_single_channel=True,
        ndims=(2,),
    )
)
register(
    Operation(
        name="_canny_quantiles",
        kind="global",
        params=CannyParams,
        apply=_quantile_candidates,
        statistic=lambda p: _MagnitudeQuantiles(
            tuple(100.0 * q for q in canny_thresholds(p, np.dtype(np.float64)))
        ),
        summary="canny: weak/strong candidates from quantiles of the magnitude",
        out_channels=lambda p, channels: 1,
        out_dtype=lambda p, dtype: np.dtype(np.uint8),
    )
)

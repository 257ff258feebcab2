"""Thresholds: fixed values and ranges (pointwise); Otsu, multi-Otsu, Yen, triangle and
percentile thresholds from statistics of the whole item (global), never per block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import Field
from skimage.filters import threshold_multiotsu, threshold_otsu, threshold_yen

from segflow.ops.registry import Done, LowHighParams, OpContext, Operation, OpParams, register
from segflow.ops.statistics import Histogram, Percentiles, nan_pixels, without_nan


class ThresholdParams(OpParams):
    value: float


def threshold_value(image: np.ndarray, params: ThresholdParams, ctx: OpContext) -> np.ndarray:
    """Foreground where ``image > value``."""
    return image > params.value


class RangeParams(LowHighParams):
    pass


def threshold_range(image: np.ndarray, params: RangeParams, ctx: OpContext) -> np.ndarray:
    """Foreground where ``low <= image <= high``."""
    return (image >= params.low) & (image <= params.high)


class OtsuParams(OpParams):
    nbins: int = Field(256, ge=2, description="bins for float images; integers get one per value")


def otsu_threshold(stat: Any) -> Any:
    """The Otsu threshold from a reduced :class:`Histogram` result."""
    if isinstance(stat[0], str):  # ("constant", value): scikit-image returns that value
        return stat[1]
    counts, centers = stat
    return threshold_otsu(hist=(counts, centers))


class OtsuThreshold(Histogram):
    """The item histogram (see :class:`Histogram`), finished into Otsu's threshold."""

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        result = super().combine(partials, state)
        if not isinstance(result, Done):
            return result
        return replace(result, value=otsu_threshold(result.value))


def threshold_otsu_global(image: np.ndarray, params: OtsuParams, ctx: OpContext) -> np.ndarray:
    """Foreground where ``image > t``, ``t`` = Otsu's threshold of the whole item.

    Equals ``image > skimage.filters.threshold_otsu(image, nbins)`` on the whole item: the
    histogram is reduced over all blocks with scikit-image's binning (see
    :class:`segflow.ops.statistics.Histogram`), never estimated per block.
    """
    return image > ctx.stat


register(
    Operation(
        name="threshold",
        kind="pointwise",
        params=ThresholdParams,
        apply=threshold_value,
        summary="mask = image > value",
        out_dtype=lambda p, dtype: np.dtype(bool),
    )
)
register(
    Operation(
        name="threshold_range",
        kind="pointwise",
        params=RangeParams,
        apply=threshold_range,
        summary="mask = low <= image <= high",
        out_dtype=lambda p, dtype: np.dtype(bool),
    )
)
register(
    Operation(
        name="otsu",
        kind="global",
        params=OtsuParams,
        apply=threshold_otsu_global,
        summary="mask = image > Otsu threshold of the whole item (global histogram)",
        statistic=lambda p: OtsuThreshold(nbins=p.nbins),
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- thresholds from the item histogram ---------------------------------------------------------


def triangle_threshold(counts: np.ndarray, centers: np.ndarray) -> float:
    """Zack's triangle threshold from a histogram, as ``skimage.filters.threshold_triangle``.

    A line joins the histogram's peak to the end of its longer tail; the threshold is the bin
    centre whose count lies farthest below that line (first such bin on ties).
    """
    nonzero = np.flatnonzero(counts)
    low, high = int(nonzero[0]), int(nonzero[-1])
    peak = int(np.argmax(counts))
    n = len(counts)
    flip = peak - low < high - peak  # the left tail is shorter: look right instead
    values = counts[::-1] if flip else counts
    if flip:
        low, peak = n - high - 1, n - peak - 1
    width = peak - low
    x = np.arange(width)
    y = values[x + low]
    norm = np.sqrt(float(values[peak]) ** 2 + width**2)
    distance = (values[peak] / norm) * x - (width / norm) * y
    level = int(np.argmax(distance)) + low
    return float(centers[n - level - 1 if flip else level])


_FINISHERS = {
    "otsu": lambda counts, centers, p: threshold_otsu(hist=(counts, centers)),
    "yen": lambda counts, centers, p: threshold_yen(hist=(counts, centers)),
    "triangle": lambda counts, centers, p: triangle_threshold(counts, centers),
    # scikit-image normalises the histogram it computes from an image (not one it is given)
    # before its float32 search: normalise the same way, or near-ties can break differently.
    "multi_otsu": lambda counts, centers, p: threshold_multiotsu(
        hist=(counts / np.sum(counts), centers), classes=p
    ),
}


@dataclass(frozen=True)
class HistogramThreshold(Histogram):
    """The item histogram (see :class:`Histogram`), finished by a named method.

    ``method`` is ``"yen"``, ``"triangle"`` or ``"multi_otsu"`` (``classes - 1``
    thresholds); a constant item gives its value (Yen and triangle), or is refused by
    multi-Otsu, as scikit-image refuses an image with fewer distinct values than classes.
    """

    method: str = "yen"
    classes: int = 3

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        result = super().combine(partials, state)
        if not isinstance(result, Done):
            return result
        if isinstance(result.value[0], str):  # ("constant", value)
            value = result.value[1]
            if self.method == "multi_otsu":  # scikit-image refuses, as for too few values
                raise ValueError(
                    f"the item has only 1 distinct value ({value}): it cannot be "
                    f"thresholded in {self.classes} classes"
                )
            return Done(value)
        counts, centers = result.value
        return replace(result, value=_FINISHERS[self.method](counts, centers, self.classes))


class HistogramThresholdParams(OpParams):
    nbins: int = Field(256, ge=2, description="bins for float images; integers get one per value")


def _above(image: np.ndarray, params: OpParams, ctx: OpContext) -> np.ndarray:
    return image > ctx.stat


def _yen(params: HistogramThresholdParams) -> HistogramThreshold:
    return HistogramThreshold(nbins=params.nbins, method="yen")


def _triangle(params: HistogramThresholdParams) -> HistogramThreshold:
    return HistogramThreshold(nbins=params.nbins, method="triangle")


for _name, _statistic in (("yen", _yen), ("triangle", _triangle)):
    register(
        Operation(
            name=_name,
            kind="global",
            params=HistogramThresholdParams,
            apply=_above,
            summary=f"mask = image > the {_name} threshold of the whole item "
            f"(skimage.filters.threshold_{_name} on a global histogram)",
            statistic=_statistic,
            out_dtype=lambda p, dtype: np.dtype(bool),
            needs_single_channel=True,
        )
    )


class MultiOtsuParams(OpParams):
    classes: int = Field(3, ge=2, le=254, description="number of classes (thresholds + 1)")
    nbins: int = Field(256, ge=2, description="bins for float images; integers get one per value")


def multi_otsu_classes(image: np.ndarray, params: MultiOtsuParams, ctx: OpContext) -> np.ndarray:
    """Class ``1..classes`` of each pixel between the item's multi-Otsu thresholds.

    ``numpy.digitize(image, skimage.filters.threshold_multiotsu(image, classes)) + 1`` on the
    whole item (``+ 1``: class 0 stays free for "no class", as with ``classify``, and is
    given to NaN pixels).
    """
    classes = (np.digitize(image, np.asarray(ctx.stat)) + 1).astype(np.uint8)
    missing = nan_pixels(image)
    if missing is not None:
        classes[:, missing] = 0
    return classes


register(
    Operation(
        name="multi_otsu",
        kind="global",
        params=MultiOtsuParams,
        apply=multi_otsu_classes,
        summary="classes 1..k between the multi-Otsu thresholds of the whole item",
        statistic=lambda p: HistogramThreshold(p.nbins, method="multi_otsu", classes=p.classes),
        out_dtype=lambda p, dtype: np.dtype(np.uint8),
        needs_single_channel=True,
    )
)


class PercentileThresholdParams(OpParams):
    q: float = Field(ge=0, le=100, description="percentile of the whole item, 0..100")


class _PercentileValue(Percentiles):
    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        result = super().combine(partials, state)
        return Done(result.value[0]) if isinstance(result, Done) else result


register(
    Operation(
        name="threshold_percentile",
        kind="global",
        params=PercentileThresholdParams,
        apply=_above,
        summary="mask = image > the q-th percentile of the whole item (exact, numpy.percentile)",
        statistic=lambda p: _PercentileValue(q=(p.q,)),
        out_dtype=lambda p, dtype: np.dtype(bool),
        needs_single_channel=True,
    )
)


# --- Li's minimum cross-entropy threshold ---------------------------------------------------------


class LiParams(OpParams):
    tolerance: float | None = Field(
        None,
        gt=0,
        description="stop when the threshold moves less than this; default 0.5 for integer "
        "images (as scikit-image); required for float images",
    )


@dataclass(frozen=True)
class _LiPass:
    low: Any  # the item's minimum (a value of the image dtype): Li works on image - min
    t: float  # split the pixels at t (in image - min units)
    passes: int = 1  # passes over the item so far, the first (the mean) included


#: Li's iteration stops with an error after this many passes over the item. scikit-image has
#: no limit; its float iteration usually settles in a few dozen passes (the threshold stops
#: moving), so a limit is reached only by a tolerance below the rounding of the means.
LI_MAX_PASSES = 500


def _li_not_converging(passes: int, moved: float, tolerance: float) -> ValueError:
    return ValueError(
        f"Li's threshold still moved by {moved:.3g} after {passes} passes over the item, more "
        f"than `tolerance` ({tolerance:g}); give a larger `tolerance`"
    )


def _shifted(core: np.ndarray, low: Any) -> np.ndarray:
    """The block's values minus the item's minimum, NaN left out, in the image dtype: the
    array scikit-image iterates on (``image - image.min()``), so every value is >= 0 and no
    sum of them can round below 0."""
    values = without_nan(core.ravel())
    return np.subtract(values, np.asarray(low, dtype=values.dtype), dtype=values.dtype)


@dataclass(frozen=True)
class LiThreshold:
    """Li's iterative minimum cross-entropy threshold of the whole item.

    Integer images: the item histogram (scikit-image's binning), then exactly
    ``skimage.filters.threshold_li``'s histogram iteration. Float images: one pass over the
    blocks per iteration, each adding the sums and counts of ``image - min`` above and below
    the current threshold; the result equals scikit-image's to float64 rounding of those
    means (for float32 images scikit-image averages in float32, so the thresholds agree to
    about 1e-7). Either iteration stops with an error after ``max_passes`` passes.
    """

    tolerance: float | None
    max_passes: int = LI_MAX_PASSES

    def start(self) -> Any:
        return Histogram().start()

    def map(self, core: np.ndarray, state: Any) -> Any:
        if isinstance(state, _LiPass):
            # Sums of (value - low) above and below t, accumulated in float64.
            shifted = _shifted(core, state.low)
            above = shifted > np.float64(state.t)
            n_above = int(np.count_nonzero(above))
            fore = float(np.sum(shifted, where=above, dtype=np.float64))
            back = float(np.sum(shifted, where=~above, dtype=np.float64))
            return fore, n_above, back, shifted.size - n_above
        if not isinstance(state, _LiFloat):
            return Histogram().map(core, state)
        shifted = _shifted(core, state.low)
        return float(np.sum(shifted, dtype=np.float64)), shifted.size

    def merge(self, partials: Sequence[Any], state: Any) -> Any:
        """Several blocks' partials as one (on a worker: a tree reduction)."""
        if isinstance(state, _LiPass | _LiFloat):
            return tuple(np.sum(np.asarray(partials, dtype=np.float64), axis=0))
        return Histogram().merge(partials, state)

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if isinstance(state, _LiPass):
            sums = np.sum(np.asarray(partials, dtype=np.float64), axis=0)
            if sums[1] == 0 or sums[3] == 0:  # one side empty: nothing left to split
                return Done(state.t + float(state.low))
            mean_fore, mean_back = sums[0] / sums[1], sums[2] / sums[3]
            if mean_back == 0:  # log(0): stop, as scikit-image does
                return Done(state.t + float(state.low))
            t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
            tolerance = self._float_tolerance()
            if abs(t_next - state.t) <= tolerance:
                return Done(t_next + float(state.low))
            if state.passes >= self.max_passes:
                raise _li_not_converging(state.passes, abs(t_next - state.t), tolerance)
            return _LiPass(state.low, t_next, state.passes + 1)
        if isinstance(state, _LiFloat):
            total, count = np.sum(np.asarray(partials, dtype=np.float64), axis=0)
            return _LiPass(state.low, total / count)
        result = Histogram().combine(partials, state)
        if not isinstance(result, Done):
            if result.integer:
                return result
            return _LiFloat(result.low)  # floats: iterate over the pixels instead
        if isinstance(result.value[0], str):  # a constant item
            return Done(result.value[1])
        counts, centers = result.value
        return Done(
            li_from_histogram(counts, centers, self.tolerance or 0.5, max_passes=self.max_passes)
        )

    def _float_tolerance(self) -> float:
        if self.tolerance is None:
            raise ValueError("li: give `tolerance` for float images")
        return self.tolerance


@dataclass(frozen=True)
class _LiFloat:
    low: Any


def li_from_histogram(
    counts: np.ndarray, centers: np.ndarray, tolerance: float, *, max_passes: int = LI_MAX_PASSES
) -> float:
    """Li's threshold of an integer image from its histogram (one bin per value); an error
    after ``max_passes`` iterations."""
    low = centers[0]
    bins = centers - low
    weights = counts.astype(np.float32)
    t_next = float(np.sum(bins * counts) / np.sum(counts))
    t_curr = -2 * tolerance
    passes = 0
    while abs(t_next - t_curr) > tolerance:
        if passes >= max_passes:
            raise _li_not_converging(passes, abs(t_next - t_curr), tolerance)
        passes += 1
        t_curr = t_next
        fore = bins > t_curr
        mean_fore = np.average(bins[fore], weights=weights[fore])
        mean_back = np.average(bins[~fore], weights=weights[~fore])
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return float(t_next + low)


def _check_li(params: LiParams, dtype: np.dtype) -> np.dtype:
    if np.dtype(dtype).kind == "f" and params.tolerance is None:
        raise ValueError("give `tolerance` for float images (scikit-image's default needs "
                         "every distinct value of the item)")  # fmt: skip
    return np.dtype(bool)


register(
    Operation(
        name="li",
        kind="global",
        params=LiParams,
        apply=_above,
        summary="mask = image > Li's minimum cross-entropy threshold of the whole item "
        "(skimage.filters.threshold_li)",
        statistic=lambda p: LiThreshold(p.tolerance),
        out_dtype=_check_li,
        needs_single_channel=True,
    )
)

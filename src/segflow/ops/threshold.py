"""Thresholds: fixed values and ranges (pointwise); Otsu, multi-Otsu, Yen, triangle and
percentile thresholds from statistics of the whole item (global), never per block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator
from skimage.filters import threshold_multiotsu, threshold_otsu, threshold_yen

from segflow.ops.registry import Done, OpContext, Operation, OpParams, register
from segflow.ops.statistics import Histogram, Percentiles


class ThresholdParams(OpParams):
    value: float


def threshold_value(image: np.ndarray, params: ThresholdParams, ctx: OpContext) -> np.ndarray:
    """Foreground where ``image > value``."""
    return image > params.value


class RangeParams(OpParams):
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self) -> RangeParams:
        if self.low > self.high:
            raise ValueError(f"`low` ({self.low}) must not exceed `high` ({self.high})")
        return self


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
        return Done(otsu_threshold(result.value)) if isinstance(result, Done) else result


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
        out_dtype=lambda dtype, p: np.dtype(bool),
    )
)
register(
    Operation(
        name="threshold_range",
        kind="pointwise",
        params=RangeParams,
        apply=threshold_range,
        summary="mask = low <= image <= high",
        out_dtype=lambda dtype, p: np.dtype(bool),
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
        out_dtype=lambda dtype, p: np.dtype(bool),
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
    thresholds); a constant item gives its value (every method would).
    """

    method: str = "yen"
    classes: int = 3

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        result = super().combine(partials, state)
        if not isinstance(result, Done):
            return result
        if isinstance(result.value[0], str):  # ("constant", value)
            value = result.value[1]
            return Done(np.full(self.classes - 1, value) if self.method == "multi_otsu" else value)
        counts, centers = result.value
        return Done(_FINISHERS[self.method](counts, centers, self.classes))


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
            out_dtype=lambda dtype, p: np.dtype(bool),
            needs_single_channel=True,
        )
    )


class MultiOtsuParams(OpParams):
    classes: int = Field(3, ge=2, le=254, description="number of classes (thresholds + 1)")
    nbins: int = Field(256, ge=2, description="bins for float images; integers get one per value")


def multi_otsu_classes(image: np.ndarray, params: MultiOtsuParams, ctx: OpContext) -> np.ndarray:
    """Class ``1..classes`` of each pixel between the item's multi-Otsu thresholds.

    ``numpy.digitize(image, skimage.filters.threshold_multiotsu(image, classes)) + 1`` on the
    whole item (``+ 1``: class 0 stays free for "no class", as with ``classify``).
    """
    return (np.digitize(image, np.asarray(ctx.stat)) + 1).astype(np.uint8)


register(
    Operation(
        name="multi_otsu",
        kind="global",
        params=MultiOtsuParams,
        apply=multi_otsu_classes,
        summary="classes 1..k between the multi-Otsu thresholds of the whole item",
        statistic=lambda p: HistogramThreshold(p.nbins, method="multi_otsu", classes=p.classes),
        out_dtype=lambda dtype, p: np.dtype(np.uint8),
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
        out_dtype=lambda dtype, p: np.dtype(bool),
        needs_single_channel=True,
    )
)

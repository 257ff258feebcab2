"""Thresholds: fixed values and ranges (pointwise), Otsu from the item histogram (global)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field, model_validator
from skimage.filters import threshold_otsu

from segflow.ops.registry import Done, OpContext, Operation, OpParams, register
from segflow.ops.statistics import Histogram


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

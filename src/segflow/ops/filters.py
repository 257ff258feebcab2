"""Local smoothing filters. Halos come from the parameters, never guessed."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator
from scipy import ndimage as ndi

from segflow.ops.registry import OpContext, Operation, OpParams, register

# "wrap" is left out on purpose: it reads the opposite side of the item, which no block has.
BorderMode = Literal["reflect", "nearest", "mirror", "constant"]


def _per_axis(value: float | list[float], ndim: int, name: str) -> tuple[float, ...]:
    values = [float(value)] * ndim if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != ndim:
        raise ValueError(f"`{name}` has {len(values)} values for {ndim} spatial axes")
    return tuple(values)


class GaussianParams(OpParams):
    sigma: float | list[float] = Field(description="standard deviation in pixels, per axis or one")
    truncate: float = Field(4.0, gt=0)
    mode: BorderMode = "reflect"
    cval: float = 0.0

    @field_validator("sigma")
    @classmethod
    def _positive(cls, value: float | list[float]) -> float | list[float]:
        values = [value] if isinstance(value, int | float) else value
        if not values or any(v < 0 for v in values):
            raise ValueError(f"must be >= 0 (got {value})")
        return value


def gaussian_radius(sigma: float, truncate: float) -> int:
    """The kernel radius scipy.ndimage uses: ``int(truncate * sigma + 0.5)``."""
    return int(truncate * sigma + 0.5)


def gaussian_halo(params: GaussianParams, ndim: int) -> tuple[int, ...]:
    return tuple(
        gaussian_radius(s, params.truncate) for s in _per_axis(params.sigma, ndim, "sigma")
    )


def gaussian_filter(image: np.ndarray, params: GaussianParams, ctx: OpContext) -> np.ndarray:
    """Gaussian smoothing in float32, equal to ``scipy.ndimage.gaussian_filter`` on the item.

    Channels are smoothed independently. Integer input is converted to float32 first.
    """
    sigma = (0.0, *_per_axis(params.sigma, ctx.spatial_ndim, "sigma"))
    source = image.astype(np.float32, copy=False)
    return ndi.gaussian_filter(
        source, sigma, truncate=params.truncate, mode=params.mode, cval=params.cval
    )


class MedianParams(OpParams):
    size: int = Field(3, ge=1, description="odd window width in pixels")
    mode: BorderMode = "reflect"
    cval: float = 0.0

    @field_validator("size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd so the window is centred (got {value})")
        return value


def median_filter(image: np.ndarray, params: MedianParams, ctx: OpContext) -> np.ndarray:
    """Median over a ``size``-wide cube window, equal to ``scipy.ndimage.median_filter``."""
    size = (1, *([params.size] * ctx.spatial_ndim))
    return ndi.median_filter(image, size=size, mode=params.mode, cval=params.cval)


register(
    Operation(
        name="gaussian",
        kind="local",
        params=GaussianParams,
        apply=gaussian_filter,
        summary="gaussian smoothing (float32), scipy.ndimage.gaussian_filter",
        halo=gaussian_halo,
        halo_rule="int(truncate * sigma + 0.5) per axis",
        out_dtype=lambda p, dtype: np.dtype(np.float32),
    )
)
register(
    Operation(
        name="median",
        kind="local",
        params=MedianParams,
        apply=median_filter,
        summary="median filter over a size^n window, scipy.ndimage.median_filter",
        halo=lambda p, ndim: (p.size // 2,) * ndim,
        halo_rule="size // 2",
    )
)

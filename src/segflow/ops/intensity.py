"""Pointwise intensity operations: clipping, windows, band selection and percentile scaling."""

from __future__ import annotations

import re

import numpy as np
from pydantic import Field, model_validator

from segflow.ops.registry import Categories, OpContext, Operation, OpParams, register
from segflow.ops.statistics import Percentiles, nan_pixels


class ClipParams(OpParams):
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _check(self) -> ClipParams:
        if self.low is None and self.high is None:
            raise ValueError("give `low`, `high` or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"`low` ({self.low}) must not exceed `high` ({self.high})")
        return self


def clip_intensity(image: np.ndarray, params: ClipParams, ctx: OpContext) -> np.ndarray:
    """Clip intensities to ``[low, high]``; the dtype is kept."""
    return np.clip(image, params.low, params.high).astype(image.dtype, copy=False)


class WindowParams(OpParams):
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self) -> WindowParams:
        if self.low >= self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        return self


def window_intensity(image: np.ndarray, params: WindowParams, ctx: OpContext) -> np.ndarray:
    """Map ``[low, high]`` linearly to ``[0, 1]`` (float32), clipping outside: a CT/HU window."""
    scaled = (image.astype(np.float32) - np.float32(params.low)) / np.float32(
        params.high - params.low
    )
    return np.clip(scaled, 0.0, 1.0, out=scaled)


class SelectBandsParams(OpParams):
    bands: list[int] = Field(min_length=1, description="1-based band numbers, as GDAL counts")


def select_bands(image: np.ndarray, params: SelectBandsParams, ctx: OpContext) -> np.ndarray:
    """Keep the listed bands (1-based, like rasterio and GDAL), in the order given."""
    return image[[b - 1 for b in params.bands]]


class CombineBandsParams(OpParams):
    weights: list[float] = Field(min_length=1)


def combine_bands(image: np.ndarray, params: CombineBandsParams, ctx: OpContext) -> np.ndarray:
    """Weighted sum of the bands into one float32 channel.

    For example ``weights: [0.299, 0.587, 0.114]`` turns RGB into luma (ITU-R BT.601).
    """
    weights = np.asarray(params.weights, dtype=np.float32)
    out = np.tensordot(weights, image.astype(np.float32, copy=False), axes=(0, 0))
    return out[np.newaxis].astype(np.float32, copy=False)


#: ITU-R BT.601 luma weights of R, G and B.
LUMA = (0.299, 0.587, 0.114)


class LumaParams(OpParams):
    pass


def to_luma(image: np.ndarray) -> np.ndarray:
    """``(c, ...)`` with 1, 3 (RGB) or 4 (RGBA) channels as one float32 luma channel.

    RGB(A) becomes the ITU-R BT.601 weighted sum of R, G and B (alpha dropped); one channel
    (a fluorescence or greyscale TIFF) is kept as it is, as float32. A model trained on luma
    (``segflow train`` with ``data.channels: luma``) thus sees the same values from a 1-band
    TIFF and from an RGB(A) PNG of the same grey image.

    Examples
    --------
    >>> to_luma(np.array([[[255]], [[0]], [[0]], [[255]]], dtype=np.uint8)).round(3)
    array([[[76.245]]], dtype=float32)
    >>> to_luma(np.array([[[7]]], dtype=np.uint16))
    array([[[7.]]], dtype=float32)
    """
    if image.shape[0] == 1:
        return image.astype(np.float32, copy=False)
    if image.shape[0] not in (3, 4):
        raise ValueError(f"luma needs 1, 3 or 4 channels (RGB(A)), got {image.shape[0]}")
    weights = np.asarray(LUMA, dtype=np.float32)
    out = np.tensordot(weights, image[:3].astype(np.float32, copy=False), axes=(0, 0))
    return out[np.newaxis].astype(np.float32, copy=False)


def luma(image: np.ndarray, params: LumaParams, ctx: OpContext) -> np.ndarray:
    """One channel whatever the input: see :func:`to_luma`."""
    return to_luma(image)


class RgbParams(OpParams):
    pass


def rgb(image: np.ndarray, params: RgbParams, ctx: OpContext) -> np.ndarray:
    """The R, G and B bands of an RGB or RGBA image (alpha dropped), for colour-based steps
    (stain contrast) that have no meaning on one band; planning refuses other band counts."""
    return image[:3]


def _check_rgb(channels: int) -> str | None:
    if channels in (3, 4):
        return None
    return (
        f"the image has {channels} band(s); this step needs colour: an RGB or RGBA image "
        "(3 or 4 bands)"
    )


class ExpectBandsParams(OpParams):
    count: int = Field(ge=1, description="the number of bands the pipeline is made for")


def expect_bands(image: np.ndarray, params: ExpectBandsParams, ctx: OpContext) -> np.ndarray:
    """The image as it is; planning refuses an item with another band count than ``count``,
    naming both (a CT pipeline in Hounsfield units has no meaning on an RGB rendering)."""
    return image


class NormalizedDifferenceParams(OpParams):
    band_a: int = Field(ge=1, description="1-based band number (e.g. near infrared)")
    band_b: int = Field(ge=1, description="1-based band number (e.g. red)")


def normalized_difference(
    image: np.ndarray, params: NormalizedDifferenceParams, ctx: OpContext
) -> np.ndarray:
    """``(a - b) / (a + b)`` as float32, 0 where ``a + b == 0`` (NDVI with a=NIR, b=red)."""
    a = image[params.band_a - 1].astype(np.float32)
    b = image[params.band_b - 1].astype(np.float32)
    total = a + b
    out = np.divide(a - b, total, out=np.zeros_like(a), where=total != 0)
    return out[np.newaxis]


class PercentileParams(OpParams):
    low: float = Field(1.0, ge=0, le=100)
    high: float = Field(99.0, ge=0, le=100)
    clip: bool = True

    @model_validator(mode="after")
    def _check(self) -> PercentileParams:
        if self.low >= self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        return self


def normalize_percentile(image: np.ndarray, params: PercentileParams, ctx: OpContext) -> np.ndarray:
    """Scale so the item's ``low`` and ``high`` percentiles map to 0 and 1 (float32).

    The percentiles are those of the whole item (``numpy.percentile``, linear method),
    reduced exactly over all blocks before this block pass.
    """
    p_low, p_high = ctx.stat
    span = float(p_high) - float(p_low)
    out = image.astype(np.float32) - np.float32(p_low)
    if span > 0:
        out /= np.float32(span)
    if params.clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


class ClassifyParams(OpParams):
    edges: list[float] = Field(min_length=1, description="increasing class boundaries")
    names: list[str] | None = Field(
        None, description="one name per class (stored with the output, shown by xarray)"
    )
    colors: list[str] | None = Field(
        None, description="one colour per class, '#rrggbb' or '#rrggbbaa' (for viewers)"
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifyParams:
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"`edges` {self.edges} must be strictly increasing")
        for key in ("names", "colors"):
            given = getattr(self, key)
            if given is not None and len(given) != len(self.edges) + 1:
                raise ValueError(
                    f"`{key}` has {len(given)} entries, `edges` makes {len(self.edges) + 1} classes"
                )
        hex_colour = r"#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?"
        bad = [c for c in self.colors or [] if not re.fullmatch(hex_colour, c)]
        if bad:
            raise ValueError(f"`colors` {bad} must be '#rrggbb' or '#rrggbbaa'")
        return self


def classify_categories(params: ClassifyParams) -> Categories:
    """``(value, name, colour)`` of each class ``1..n+1``; unnamed classes are called
    ``class_VALUE``; none without names or colours."""
    if params.names is None and params.colors is None:
        return ()
    count = len(params.edges) + 1
    names = params.names or [f"class_{v}" for v in range(1, count + 1)]
    colors: list[str | None] = list(params.colors) if params.colors else [None] * count
    return tuple(
        (value, name, color)
        for value, (name, color) in enumerate(zip(names, colors, strict=True), 1)
    )


def classify_intensity(image: np.ndarray, params: ClassifyParams, ctx: OpContext) -> np.ndarray:
    """Class ids 1..n+1 by intensity range: class k holds ``edges[k-2] <= value < edges[k-1]``.

    For CT in Hounsfield units, ``edges: [-400, 300]`` gives 1 = air/lung, 2 = soft tissue,
    3 = bone. 0 is left free for "no data".
    """
    classes = (np.digitize(image, params.edges) + 1).astype(np.uint8)
    missing = nan_pixels(image)
    if missing is not None:
        classes[:, missing] = 0
    return classes


class MaskNodataParams(OpParams):
    value: float | None = Field(
        None,
        description="the nodata value; by default the item's own (a GeoTIFF's nodata tag)",
    )


def float_for(dtype: np.dtype) -> np.dtype:
    """The float type that holds every value of ``dtype``: the same for floats, float32 for
    integers up to 16 bits, float64 above."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype
    return np.dtype(np.float32 if dtype.itemsize <= 2 else np.float64)


def mask_nodata(image: np.ndarray, params: MaskNodataParams, ctx: OpContext) -> np.ndarray:
    """Each band's nodata pixels become NaN (the image becomes float, see :func:`float_for`),
    so the steps after leave them out: global statistics skip NaN and thresholds make them
    background. Filters spread NaN over their window, as scipy's do."""
    if params.value is None:
        raise ValueError("mask_nodata: no `value` and no item nodata")  # compile fills it
    out = image.astype(float_for(image.dtype))
    out[image == params.value] = np.nan
    return out


def _item_nodata(params: MaskNodataParams, nodata: float | None) -> MaskNodataParams:
    if params.value is not None:
        return params
    if nodata is None:
        raise ValueError("the item has no nodata value in its metadata; give `value`")
    return params.model_copy(update={"value": float(nodata)})  # NaN: already missing


def _check_bands(bands: list[int], channels: int) -> str | None:
    bad = [b for b in bands if not 1 <= b <= channels]
    if bad:
        return f"band(s) {bad} do not exist: the image has bands 1..{channels}"
    return None


register(
    Operation(
        name="mask_nodata",
        kind="pointwise",
        params=MaskNodataParams,
        apply=mask_nodata,
        summary="nodata pixels (the item's nodata value by default) -> NaN, which the "
        "statistics leave out; the image becomes float",
        out_dtype=lambda p, dtype: float_for(dtype),
        item_nodata=_item_nodata,
    )
)
register(
    Operation(
        name="clip",
        kind="pointwise",
        params=ClipParams,
        apply=clip_intensity,
        summary="clip intensities to [low, high]",
    )
)
register(
    Operation(
        name="window",
        kind="pointwise",
        params=WindowParams,
        apply=window_intensity,
        summary="intensity window [low, high] -> [0, 1] float32 (HU windowing)",
        out_dtype=lambda p, dtype: np.dtype(np.float32),
    )
)
register(
    Operation(
        name="select_bands",
        kind="pointwise",
        params=SelectBandsParams,
        apply=select_bands,
        summary="keep the listed 1-based bands",
        out_channels=lambda p, c: len(p.bands),
        check_channels=lambda p, c: _check_bands(p.bands, c),
    )
)
register(
    Operation(
        name="combine_bands",
        kind="pointwise",
        params=CombineBandsParams,
        apply=combine_bands,
        summary="weighted sum of bands into one float32 channel",
        check_channels=lambda p, c: (
            None
            if len(p.weights) == c
            else f"`weights` has {len(p.weights)} values, the image has {c} bands"
        ),
        out_channels=lambda p, c: 1,
        out_dtype=lambda p, dtype: np.dtype(np.float32),
    )
)
register(
    Operation(
        name="luma",
        kind="pointwise",
        params=LumaParams,
        apply=luma,
        summary="one float32 channel: BT.601 luma of RGB(A) (alpha dropped), a single band "
        "as it is",
        check_channels=lambda p, c: (
            None if c in (1, 3, 4) else f"luma needs 1, 3 or 4 bands (RGB(A)), the image has {c}"
        ),
        out_channels=lambda p, c: 1,
        out_dtype=lambda p, dtype: np.dtype(np.float32),
    )
)
register(
    Operation(
        name="rgb",
        kind="pointwise",
        params=RgbParams,
        apply=rgb,
        summary="the R, G, B bands of an RGB(A) image (alpha dropped); other band counts are "
        "refused",
        check_channels=lambda p, c: _check_rgb(c),
        out_channels=lambda p, c: 3,
    )
)
register(
    Operation(
        name="expect_bands",
        kind="pointwise",
        params=ExpectBandsParams,
        apply=expect_bands,
        summary="refuse an item with another number of bands (the image passes unchanged)",
        check_channels=lambda p, c: (
            None if c == p.count else f"the image has {c} band(s), the pipeline expects {p.count}"
        ),
    )
)
register(
    Operation(
        name="normalized_difference",
        kind="pointwise",
        params=NormalizedDifferenceParams,
        apply=normalized_difference,
        summary="(a - b) / (a + b) of two 1-based bands (NDVI-style), float32",
        check_channels=lambda p, c: _check_bands([p.band_a, p.band_b], c),
        out_channels=lambda p, c: 1,
        out_dtype=lambda p, dtype: np.dtype(np.float32),
    )
)
register(
    Operation(
        name="classify",
        kind="pointwise",
        params=ClassifyParams,
        apply=classify_intensity,
        summary="class ids 1..n+1 from increasing intensity edges (uint8); `names` and "
        "`colors` are stored with the output",
        out_dtype=lambda p, dtype: np.dtype(np.uint8),
        needs_single_channel=True,
        categories=classify_categories,
    )
)
register(
    Operation(
        name="normalize_percentile",
        kind="global",
        params=PercentileParams,
        apply=normalize_percentile,
        summary="scale the item's [low, high] percentiles to [0, 1] (exact, global)",
        statistic=lambda p: Percentiles(q=(p.low, p.high)),
        out_dtype=lambda p, dtype: np.dtype(np.float32),
        needs_single_channel=True,
    )
)

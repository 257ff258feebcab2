"""Tiled deep-learning inference as a pipeline step: ``{op: model, path: ...}``.

The step expands into two parts (see DESIGN.md, "Deep-learning inference"):

``_model_statistics`` (global)
    The card's per-channel normalisation numbers of the *whole item* (exact percentiles,
    mean and standard deviation), reduced over every block before the block pass, then the
    normalisation itself. A tile or block normalised on its own statistics would change with
    its neighbourhood and leave seams. Skipped when every channel's normalisation is fixed.
``_model_infer`` (local)
    Every tile of the item's global tile grid that overlaps the block's output, blended
    (:func:`segflow.models.inference.predict_region`). The halo is ``tile - 1`` per axis,
    what any core can need (:attr:`segflow.models.tiling.TileGrid.halo`), so a block's output
    equals the whole item's sliding-window output.

A card with ``crop: nonzero`` (nnU-Net results folders) or a ``mask: nonzero`` channel
(nnU-Net's ``use_mask_for_norm``) adds what :mod:`segflow.ops.model_nonzero` finds before
the block pass: the hole-filled non-zero mask (a ``_model_mask`` part, labelled and merged
across block faces), and the non-zero bounding box with the statistics taken over it or
within the mask (``_model_statistics``). ``_model_infer`` then treats the box as the item
(its tile and resampling grids, its faces the border) and writes background outside it.

Where the step resamples (``resample``; nnU-Net results folders by default), the item's
pixel size (``pixel_size``, filled at planning from the reader's spacing) and the card's
``spacing`` define a model grid over the whole item (:mod:`segflow.models.resampling`):
``_model_infer`` resamples the part of the normalised item its tiles read onto that grid,
runs the tiles there, and brings the blended logits (then the softmax) or probabilities
back to its core; the halo covers a tile in item pixels plus the splines' reach.
``diameter`` (the objects' size in the item's pixels; Cellpose's ``diameter``) does the same
on a grid zoomed by the card's ``diameter`` over it, bilinear both ways as Cellpose: the
network sees objects at its training size, and a flow head's flows come back to the
item's grid with their length kept (unit directions times 5, what ``flow_dynamics`` and its
flow-error check expect; Cellpose scales ``niter`` instead, ``flow_dynamics``' own setting).

Instances come from exact post-processing of the blended map with the usual blockwise-exact
steps (``threshold``, ``distance_transform``, ``watershed``, ``label``), never from merging
per-block model instances across block faces (what distributed Cellpose does, and why its
users report masks cut along the block grid: cellpose issues #1364 and #1148).

The model is loaded once per worker process (cached by path, weights hash and device) and
never travels through the task graph; the step's block tasks hold ``GPU=1`` unless the
device is ``cpu``. The card is derived at planning by the model's source
(:mod:`segflow.models.sources`: segflow checkpoints, TorchScript, ``.pt2``, ONNX graphs, MONAI
bundles, nnU-Net v2 results folders, bioimage.io packages), with the step's overrides
(``tile``, ``overlap``, ``normalization``, ``activation``) where the format lacks them: a
model whose channels or dimensionality do not fit the item is refused before any block
runs, and a network whose output on a dummy batch does not fit its card is refused when a
worker loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from segflow.engine.blocks import Box, intersect, relative, shrink_box
from segflow.ops.model_nonzero import NonzeroMaskParams, NonzeroStatistics
from segflow.ops.registry import Categories, Done, OpContext, Operation, OpParams, register
from segflow.ops.statistics import Percentiles

if TYPE_CHECKING:
    from segflow.models.card import ModelCard, ResamplingCard
    from segflow.models.checkpoint import LoadedModel
    from segflow.models.resampling import ResampleGrid
    from segflow.models.tiling import TileGrid

ModelOutput = Literal["classes", "probabilities", "foreground", "raw"]
Activation = Literal["softmax", "sigmoid", "none", "softmax_after_blending"]  # inference's


class ModelParams(OpParams):
    path: str = Field(
        description="the model: a checkpoint folder (card.json + weights), a .pt2 program or "
        "TorchScript file with a .json card beside it, an ONNX graph, a MONAI bundle folder, "
        "an nnU-Net v2 results folder, a bioimage.io package (folder or .zip) or a Cellpose 4 "
        "checkpoint file "
        "(`segflow models inspect PATH` shows what segflow derives from it)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs (auto: CUDA when the worker has one)"
    )
    batch_size: int = Field(4, ge=1, description="tiles per forward pass")
    output: ModelOutput = Field(
        "classes",
        description="classes: argmax (uint8); probabilities: every class (float16, class "
        "axis); foreground: 1 - P(background) (float32); raw: every output channel as the "
        "network gives it, blended (float32, class axis: flows, distances, logits)",
    )
    tta: bool = Field(False, description="average over flips of each tile's axes")
    tile: tuple[int, ...] | None = Field(
        None,
        description="tile side per axis where the model's format has none (an ONNX graph "
        "with dynamic axes); null: the source's",
    )
    overlap: float | None = Field(
        None, ge=0.0, lt=1.0, description="tile overlap instead of the source's; null: the source's"
    )
    normalization: dict[str, Any] | None = Field(
        None,
        description="every channel's normalisation where the format states none (e.g. "
        "{method: percentile, low: 1, high: 99}); null: the source's",
    )
    activation: Activation | None = Field(
        None, description="softmax, sigmoid or none instead of the source's; null: the source's"
    )
    channels: int | None = Field(
        None,
        ge=1,
        description="input channels where the model takes several counts (a Cellpose network: "
        "1 to 3, as cellpose 4 takes them); null: the source's",
    )
    spacing_tolerance: float | None = Field(
        0.25,
        ge=0,
        description="when not resampling: refuse an item whose pixel size differs from the "
        "card's spacing by more than this fraction on an axis (when both are in physical "
        "units); null: never",
    )
    resample: bool | None = Field(
        None,
        description="resample the item to the card's spacing and the output back "
        "(blockwise; nnU-Net's orders unless the card says others); null: when the card "
        "says how (nnU-Net results folders)",
    )
    pixel_size: tuple[float, ...] | None = Field(
        None,
        description="the item's pixel size per axis, (z), y, x, in the card's units, for "
        "resampling; null: from the item's metadata (NIfTI, DICOM, OME)",
    )
    diameter: float | None = Field(
        None,
        gt=0,
        description="the objects' typical diameter in the item's pixels (Cellpose's "
        "`diameter`): the item is zoomed by the card's `diameter` / this (bilinear), the "
        "network runs there and its output comes back to the item's grid (bilinear; flows "
        "keep their length, as Cellpose's); null: the item's own pixels",
    )

    @field_validator("normalization")
    @classmethod
    def _one_normalization(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from segflow.models.card import Normalization  # imports torch: only when one is set

        if value is None:
            return None
        dumped = Normalization.model_validate(value).model_dump()
        if dumped["mask"] == "none":  # configs written before `mask` keep their hash
            del dumped["mask"]
        return dumped

    @model_serializer(mode="wrap")
    def _unset_overrides_left_out(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Overrides enter the dump (and so the config hash) only when set: configs written
        before they existed keep their hash."""
        data = handler(self)
        if isinstance(data, dict):
            for key in OVERRIDES:
                if data.get(key) is None:
                    data.pop(key, None)
        return data


#: The step parameters that override what a model's format lacks (sources.CardOverrides),
#: and the later ones left out of the dump when unset as well.
OVERRIDES = ("tile", "overlap", "normalization", "activation", "channels", "resample", "pixel_size",
             "diameter")  # fmt: skip


# -- the card, derived once per process and file version by the model's source ---------------


def model_card(path: str) -> ModelCard:
    """The card the source of the model at ``path`` derives (no step overrides).

    Raises :class:`~segflow.errors.ModelError` naming the file when it is missing or invalid.
    """
    from segflow.models.sources import describe_model

    return describe_model(path).card


def step_card(params: ModelParams) -> ModelCard:
    """The card the step runs: the source's, with the step's overrides."""
    from segflow.models.sources import CardOverrides, describe_model

    overrides = CardOverrides(
        params.tile, params.overlap, params.normalization, params.activation, params.channels
    )
    return overrides.apply(describe_model(params.path), params.path)


def model_identity(path: str) -> str:
    """The model hash of ``path`` (its source's, :meth:`ModelSource.identity`), computed
    once per process and file version: what the config hash and the index record."""
    from segflow.models.sources import model_identity as identity

    return identity(path)


def _setup_key(params: ModelParams) -> Hashable:
    from segflow.models.inference import resolve_device

    device = str(resolve_device(params.device))
    resolved = str(Path(params.path).expanduser().resolve())
    card = step_card(params).identity_json()
    return (resolved, model_identity(params.path), card, device, params.batch_size)


def _load(params: ModelParams) -> LoadedModel:
    from segflow.models.sources import load_source

    card = step_card(params)
    return load_source(params.path, card, device=params.device, batch_size=params.batch_size)


def _resources(params: ModelParams) -> dict[str, float]:
    return {} if params.device == "cpu" else {"GPU": 1}


# -- planning checks ----------------------------------------------------------------------------


def _check_layout(params: ModelParams, channels: int, spatial_ndim: int) -> str | None:
    from segflow.models.sources import describe_model

    card = step_card(params)
    where = f"model {params.path!r} ({describe_model(params.path).where})"
    if spatial_ndim != card.spatial_dims:
        return f"{where} is {card.spatial_dims}-D, the item is {spatial_ndim}-D"
    if params.diameter is not None:
        problem = _check_diameter(params, card, where)
        if problem:
            return problem
    if channels != len(card.channels):
        names = ", ".join(c.name for c in card.channels)
        low, high = describe_model(params.path).channel_range or (0, 0)
        fix = f"set the step's `channels: {channels}` or " if low <= channels <= high else ""
        return (
            f"{where} expects {len(card.channels)} channels ({names}), the image has "
            f"{channels} at this step: {fix}add 'select_bands', 'combine_bands' or 'luma' "
            "before it"
        )
    return None


#: The most ``diameter`` may zoom an item in (the card's diameter / the item's): objects of
#: a few pixels, and 64 times the pixels to run.
MAX_ZOOM = 8.0


def _check_diameter(params: ModelParams, card: ModelCard, where: str) -> str | None:
    """A problem with the step's ``diameter`` for this card, in one line naming the value."""
    value = f"`diameter` {params.diameter:g}"
    assert params.diameter is not None
    if card.diameter is None:
        return (
            f"{value}: {where} states no training diameter (the card's `diameter`, the "
            "objects' typical size in its training images); add it to the card or leave "
            "diameter unset"
        )
    if card.head == "foreground_distance":
        return f"{value}: {where} has a distance head, whose values are in its own pixels"
    if _resampling(params) is not None:
        return (
            f"{value}: {where} is resampled to its card's spacing (resample); the two scales "
            "cannot both apply: set resample: false or leave diameter unset"
        )
    zoom = card.diameter / params.diameter
    if zoom > MAX_ZOOM:
        return (
            f"{value} would zoom the item {zoom:.3g} times (the card's diameter "
            f"{card.diameter:g} / {params.diameter:g}), more than {MAX_ZOOM:g}: give the "
            "objects' diameter in the item's pixels"
        )
    return None


#: Metres per unit, for the units item metadata and model cards use.
_METRES = {"m": 1.0, "metre": 1.0, "meter": 1.0, "cm": 1e-2, "mm": 1e-3, "um": 1e-6,
           "µm": 1e-6, "micron": 1e-6, "micrometer": 1e-6, "nm": 1e-9}  # fmt: skip


def _check_spacing(params: ModelParams, spacing: tuple[float, ...], units: str) -> str | None:
    """A problem when the item's pixel size is off the card's by more than the tolerance
    (when not resampling); nothing when either side has no physical units (pixels, or a
    card without spacing)."""
    card = step_card(params)
    if params.diameter is not None:  # the objects' size sets the scale, not the pixel size
        return None
    if _resampling(params) is not None:
        return _check_pixel_size(params, card, units)
    if params.spacing_tolerance is None or card.spacing is None or card.units is None:
        return None
    if units not in _METRES or card.units not in _METRES or len(spacing) != len(card.spacing):
        return None
    scale = _METRES[units] / _METRES[card.units]
    item = tuple(s * scale for s in spacing)
    tolerance = params.spacing_tolerance
    if all(abs(i / c - 1) <= tolerance for i, c in zip(item, card.spacing, strict=True)):
        return None
    shown = ", ".join(f"{i:.4g}" for i in item)
    wanted = ", ".join(f"{c:.4g}" for c in card.spacing)
    return (
        f"model {params.path!r} was trained at a pixel size of ({wanted}) {card.units}, the "
        f"item's is ({shown}) {card.units}, off by more than spacing_tolerance "
        f"{params.spacing_tolerance}: resample the item (resample: true), train at this "
        "size, or set spacing_tolerance: null to run it anyway"
    )


def _check_pixel_size(params: ModelParams, card: ModelCard, units: str) -> str | None:
    if card.head == "flows":
        return "resample: a flow head's vectors are in its own pixels; it cannot be resampled"
    size = params.pixel_size
    if size is not None and (len(size) != card.spatial_dims or min(size) <= 0):
        return (
            f"`pixel_size` {size} must give {card.spatial_dims} positive sizes, (z), y, x, "
            f"in {card.units or 'the card units'}"
        )
    if size is None and params.resample:
        return (
            f"resample: true, but the item's pixel size is in {units!r}, not a length the "
            f"model's card ({card.units}) can be compared with: set pixel_size"
        )
    return None


def _item_spacing(params: ModelParams, spacing: tuple[float, ...], units: str) -> ModelParams:
    """``pixel_size`` from the item's metadata, in the card's units, where the step
    resamples and the user left it unset."""
    card = step_card(params)
    if params.pixel_size is not None or not spacing or _resampling(params) is None:
        return params
    if units not in _METRES or card.units not in _METRES:
        return params
    scale = _METRES[units] / _METRES[str(card.units)]
    return params.model_copy(update={"pixel_size": tuple(abs(s) * scale for s in spacing)})


def _resampling(params: ModelParams) -> ResamplingCard | None:
    """How the step resamples (None: it does not): the card's way, nnU-Net's defaults
    where the step asks for it and the card has a spacing but no way."""
    from segflow.models.card import ResamplingCard

    card = step_card(params)
    if card.spacing is None or params.resample is False:
        return None
    return card.resampling or (ResamplingCard() if params.resample else None)


def _how(params: ModelParams) -> ResamplingCard | None:
    """How the step resamples, by ``diameter`` or to the card's spacing (None: it does not).
    ``diameter`` zooms bilinearly both ways, as Cellpose's ``resize_image`` (OpenCV's
    ``INTER_LINEAR``: the same pixel centres and edge rule as :mod:`segflow.models.resampling`)."""
    from segflow.models.card import ResamplingCard

    if params.diameter is not None:
        return ResamplingCard(order=1, order_back=1, separate_z=False)
    return _resampling(params)


def _pixel_sizes(
    params: ModelParams, ndim: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The item's pixel size and the model's in one unit (None: no resampling). For
    ``diameter`` their ratio is the zoom, the card's diameter over the item's: an item pixel
    is ``1 / diameter`` of an object, a model pixel ``1 / card diameter``."""
    card = step_card(params)
    if params.diameter is not None:
        if card.diameter is None:
            return None  # refused by _check_diameter
        return (card.diameter,) * ndim, (params.diameter,) * ndim
    size = params.pixel_size
    if _resampling(params) is None or size is None or len(size) != ndim:
        return None
    assert card.spacing is not None  # _resampling says so
    return size, card.spacing


def _resample_grid(params: ModelParams, shape: tuple[int, ...]) -> ResampleGrid | None:
    from segflow.models.resampling import plan_resampling

    how, sizes = _how(params), _pixel_sizes(params, len(shape))
    if how is None or sizes is None:
        return None
    return plan_resampling(
        shape, *sizes, order=how.order, order_back=how.order_back,
        order_z=how.order_z, order_z_back=how.order_z_back, separate_z=how.separate_z,
    )  # fmt: skip


def _halo(params: ModelParams, spatial_ndim: int) -> tuple[int, ...]:
    from segflow.models.resampling import halo

    card = step_card(params)
    if len(card.tile) != spatial_ndim:
        return (0,) * spatial_ndim  # refused by _check_layout with the file's name
    how, sizes = _how(params), _pixel_sizes(params, spatial_ndim)
    if how is None or sizes is None:
        return tuple(t - 1 for t in card.tile)
    splines = max(how.order, how.order_back, how.order_z, how.order_z_back) > 1
    return halo(card.tile, *sizes, prefilter=splines)


def _out_channels(params: ModelParams, channels: int) -> int:
    wide = params.output in ("probabilities", "raw")
    return len(step_card(params).classes) if wide else 1


def _out_dtype(params: ModelParams, dtype: np.dtype) -> np.dtype:
    return np.dtype(
        {
            "classes": np.uint8,
            "probabilities": np.float16,
            "foreground": np.float32,
            "raw": np.float32,
        }[params.output]
    )


def _class_names(params: ModelParams) -> tuple[str, ...]:
    if params.output in ("probabilities", "raw"):
        return tuple(step_card(params).classes)
    return (params.output,)


# -- the whole-item normalisation statistic -----------------------------------------------------


def _needs_statistics(card: ModelCard) -> bool:
    """Whether a statistics pass runs: whole-item numbers or the non-zero box to find."""
    methods = any(c.normalization.method in ("percentile", "zscore") for c in card.channels)
    return methods or card.crop is not None


def _masked(card: ModelCard) -> tuple[bool, ...]:
    """Per channel: normalised within the item's non-zero mask (``mask: nonzero``)."""
    return tuple(c.normalization.mask == "nonzero" for c in card.channels)


@dataclass(frozen=True)
class Moments:
    """Mean and (population) standard deviation of the whole item, NaN left out, merged as
    Chan et al.'s parallel variance (count, mean, M2): no catastrophic cancellation.

    ``nonzero``: over the non-zero values only (``mask: nonzero_elements``); an item without
    one gives ``(0, 1)``, which leaves it as it is (MONAI's ``NormalizeIntensity``)."""

    nonzero: bool = False

    def start(self) -> Any:
        return None

    def map(self, core: np.ndarray, state: Any) -> Any:
        values = np.asarray(core, dtype=np.float64).ravel()
        keep = ~np.isnan(values)
        values = values[keep & (values != 0) if self.nonzero else keep]
        if values.size == 0:
            return (0, 0.0, 0.0)
        mean = float(values.mean())
        return (int(values.size), mean, float(((values - mean) ** 2).sum()))

    def merge(self, partials: Sequence[Any], state: Any) -> Any:
        n, mean, m2 = 0, 0.0, 0.0
        for count, m, s in partials:
            if count == 0:
                continue
            total = n + count
            delta = m - mean
            mean += delta * count / total
            m2 += s + delta * delta * n * count / total
            n = total
        return (n, mean, m2)

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        n, mean, m2 = self.merge(partials, state)
        if n == 0 and self.nonzero:
            return Done((0.0, 1.0))
        if n == 0:
            raise ValueError("mean and standard deviation are undefined: the item has no values")
        return Done((mean, float(np.sqrt(m2 / n))))


@dataclass(frozen=True)
class ChannelStatistics:
    """One statistic per input channel (``None``: the card's fixed numbers), reduced
    together; the result is the list of ``(a, b)`` pairs :func:`normalize_image` takes.

    ``joint`` channels (``Moments`` each) combine all the joint channels' partials into one
    mean and standard deviation (the parallel merge of their counts, means and M2s)."""

    parts: tuple[Any, ...]
    fixed: tuple[tuple[float, float], ...]
    joint: tuple[bool, ...] = ()

    def start(self) -> Any:
        return tuple(None if p is None else ("run", p.start()) for p in self.parts)

    def map(self, core: np.ndarray | Sequence[np.ndarray], state: Any) -> Any:
        """``core``: the block ``(c, ...)``, or each channel's values (a masked pass)."""
        return tuple(
            None
            if s is None or s[0] == "done"
            else p.map(core[c : c + 1] if isinstance(core, np.ndarray) else core[c], s[1])
            for c, (p, s) in enumerate(zip(self.parts, state, strict=True))
        )

    def merge(self, partials: Sequence[Any], state: Any) -> Any:
        return tuple(
            None if s is None or s[0] == "done" else p.merge([part[c] for part in partials], s[1])
            for c, (p, s) in enumerate(zip(self.parts, state, strict=True))
        )

    def _pool(self, c: int) -> list[int]:
        """The channels whose partials make channel ``c``'s statistic."""
        if c < len(self.joint) and self.joint[c]:
            return [j for j, joint in enumerate(self.joint) if joint]
        return [c]

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        new = []
        for c, (p, s) in enumerate(zip(self.parts, state, strict=True)):
            if s is None or s[0] == "done":
                new.append(s)
                continue
            result = p.combine([part[j] for part in partials for j in self._pool(c)], s[1])
            new.append(("done", result.value) if isinstance(result, Done) else ("run", result))
        if all(s is None or s[0] == "done" for s in new):
            stats = []
            for s, fixed in zip(new, self.fixed, strict=True):
                stats.append(fixed if s is None else tuple(float(v) for v in s[1]))
            return Done(tuple(stats))
        return tuple(new)


def _statistic(params: ModelParams) -> ChannelStatistics | NonzeroStatistics:
    card = step_card(params)
    channels = _channel_statistics(card)
    masked = _masked(card)
    if card.crop is None and not any(masked):
        return channels
    axis = _range_axis(params)
    crop = card.crop is not None
    return NonzeroStatistics(
        channels, masked, has_mask=any(masked), crop=crop, ranges=axis is not None,
        axis=None if axis == -1 else axis,
    )  # fmt: skip


def _range_axis(params: ModelParams) -> int | None:
    """Where the resampled image is clipped to its input's range (``clip_to_input``): -1
    for each channel's range, the axis resampled apart (with order 0) for each slice's;
    None for no clip (not resampling, or an axis apart of another order: not the same
    once interpolated)."""
    from segflow.models.resampling import separate_axis

    how, sizes = _how(params), _pixel_sizes(params, step_card(params).spatial_dims)
    if how is None or not how.clip_to_input or sizes is None or params.diameter is not None:
        return None
    axis = separate_axis(*sizes, how.separate_z)
    if axis is not None and how.order_z != 0:
        return None
    return -1 if axis is None else axis


def _channel_statistics(card: ModelCard) -> ChannelStatistics:
    parts: list[Any] = []
    fixed: list[tuple[float, float]] = []
    for channel in card.channels:
        norm = channel.normalization
        if norm.method == "percentile":
            parts.append(Percentiles(q=(norm.low, norm.high)))
        elif norm.method == "zscore":
            parts.append(Moments(nonzero=norm.mask == "nonzero_elements"))
        else:
            parts.append(None)
        fixed.append((norm.low, norm.high) if norm.method == "fixed" else (0.0, 1.0))
    joint = tuple(c.normalization.joint for c in card.channels)
    return ChannelStatistics(tuple(parts), tuple(fixed), joint if any(joint) else ())


def _fixed_stats(card: ModelCard) -> list[tuple[float, float]]:
    return [
        (c.normalization.low, c.normalization.high)
        if c.normalization.method == "fixed"
        else (0.0, 1.0)
        for c in card.channels
    ]


def _normalize(image: np.ndarray, params: ModelParams, ctx: OpContext) -> np.ndarray:
    from segflow.models.card import normalize_image

    card = step_card(params)
    n, mask = len(card.channels), None
    if any(_masked(card)):  # the last channel is the non-zero mask (_model_mask)
        image, mask = image[:n], image[n] != 0
    return normalize_image(image, card.channels, list(ctx.stat)[:n], mask=mask)


def _check_statistics_layout(params: ModelParams, channels: int, spatial_ndim: int) -> str | None:
    masks = int(any(_masked(step_card(params))))
    return _check_layout(params, channels - masks, spatial_ndim)


def _statistics_channels(params: ModelParams, channels: int) -> int:
    return channels - int(any(_masked(step_card(params))))


# -- inference ----------------------------------------------------------------------------------


def _infer(image: np.ndarray, params: ModelParams, ctx: OpContext) -> np.ndarray:
    """Blended model output over the part of ``ctx.box`` whose tiles ``image`` holds,
    on the model's grid and back where the step resamples."""
    from segflow.models.card import normalize_image

    card = step_card(params)
    if not _needs_statistics(card):  # no statistics pass ran: the card's own numbers
        image = normalize_image(image, card.channels, _fixed_stats(card))
    box, shape = ctx.box, ctx.shape
    inner = shrink_box(box, _halo(params, len(shape)), shape)
    if card.crop is None:
        probs = _blended(image, box, inner, shape, params, ctx.resource)
    else:  # the statistics part's value: the channels' pairs, the box, the input's ranges
        n, ndim = len(card.channels), len(shape)
        crop = tuple(slice(int(a), int(b)) for a, b in ctx.stat[n : n + ndim])
        ranges = _scaled_ranges(ctx.stat, card, len(shape))
        probs = _blended_in_box(image, box, inner, crop, params, ctx.resource, ranges)
    return _output(probs, params, box, inner)


def _scaled_ranges(stat: Sequence[Any], card: ModelCard, ndim: int) -> np.ndarray | None:
    """The input's ranges (``clip_to_input``) as the scaled image's: ``(c, slices, 2)``."""
    from segflow.models.card import normalize_image

    n = len(card.channels)
    raw = np.asarray(stat[n + ndim :], dtype=np.float64)
    if raw.size == 0:
        return None
    raw = raw.reshape(n, -1, 2)
    ones = np.ones(raw.shape[1:], dtype=bool)  # the raw ends are values inside the mask
    return normalize_image(raw, card.channels, [tuple(p) for p in stat[:n]], mask=ones)


def _blended(
    image: np.ndarray, box: Box, inner: Box, shape: tuple[int, ...], params: ModelParams,
    loaded: LoadedModel, ranges: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The blended map over ``inner`` of an item of ``shape``; ``image`` holds ``box``;
    ``ranges``: the scaled input's, to clip the resampled image to (``clip_to_input``)."""
    from segflow.models.tiling import plan_tiles

    card = step_card(params)
    grid = _resample_grid(params, shape)
    if grid is None:
        tiles = plan_tiles(shape, tile=card.tile, overlap=card.overlap, rule=card.tile_rule)
        return _predict(image, box, inner, tiles, params, loaded, card.activation)
    return _predict_resampled(image, box, inner, grid, params, loaded, ranges)


def _blended_in_box(
    image: np.ndarray, box: Box, inner: Box, crop: Box, params: ModelParams,
    loaded: LoadedModel, ranges: np.ndarray | None,
) -> np.ndarray:  # fmt: skip
    """The blended map over ``inner`` when the network sees the item's non-zero box ``crop``
    only, as nnU-Net's ``crop_to_nonzero``: the box is the item (its shape sets the tile and
    resampling grids, its faces are the border); outside it the map is background."""
    probs = np.zeros((len(step_card(params).classes), *(s.stop - s.start for s in inner)))
    probs[0] = 1.0
    part = intersect(inner, crop)
    if any(s.stop <= s.start for s in part):
        return probs
    have = intersect(box, crop)
    data = image[(slice(None), *relative(have, box))]

    def moved(b: Box) -> Box:
        return tuple(
            slice(s.start - c.start, s.stop - c.start) for s, c in zip(b, crop, strict=True)
        )

    shape = tuple(c.stop - c.start for c in crop)
    probs[(slice(None), *relative(part, inner))] = _blended(
        data, moved(have), moved(part), shape, params, loaded, ranges
    )
    return probs


def _predict(
    image: np.ndarray, box: Box, region: Box, grid: TileGrid, params: ModelParams,
    loaded: LoadedModel, activation: str,
) -> np.ndarray:  # fmt: skip
    """Blended output over ``region`` of ``grid``; ``image`` holds ``box`` of it."""
    from segflow.models.inference import predict_region

    card = step_card(params)
    return predict_region(
        loaded.module,
        lambda window: image[(slice(None), *relative(window, box))],
        region,
        grid=grid,
        window=card.window,
        batch_size=params.batch_size,
        activation=activation,  # type: ignore[arg-type]
        tta=params.tta,
        device=loaded.input_device or params.device,  # ONNX Runtime places its own work
        flows=card.head == "flows",
    )


def _predict_resampled(
    image: np.ndarray, box: Box, inner: Box, grid: ResampleGrid, params: ModelParams,
    loaded: LoadedModel, ranges: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The output over ``inner``: the item resampled to the model's grid where the tiles
    that ``inner`` needs read it, the network there, the logits (or probabilities) resampled
    back (:mod:`segflow.models.resampling`)."""
    from segflow.models.resampling import read_box, resample_region
    from segflow.models.tiling import plan_tiles

    card, how = step_card(params), _how(params)
    assert how is not None
    back = read_box(inner, grid.model, grid.item, grid.back)
    tiles = plan_tiles(grid.model, tile=card.tile, overlap=card.overlap, rule=card.tile_rule)
    window = tiles.window(back)
    source = read_box(window, grid.item, grid.model, grid.forward)
    if any(s.start < b.start or s.stop > b.stop for s, b in zip(source, box, strict=True)):
        raise AssertionError(f"the model step's halo misses item pixels {source} (has {box})")
    data = _clip(image[(slice(None), *relative(source, box))], how.clip)
    data = resample_region(data, source, grid.item, grid.model, window, grid.forward)
    data = _clip(data, how.clip)
    if ranges is not None:  # the input's range, as the window clipped it
        data = _clip_to_input(data, window, grid, _clip(ranges, how.clip), _range_axis(params))
    data = data.astype(np.float32)
    after = card.activation == "softmax_after_blending"  # nnU-Net: logits go back, then softmax
    out = _predict(data, window, back, tiles, params, loaded, "none" if after else card.activation)
    out = resample_region(out, back, grid.model, grid.item, inner, grid.back)
    return (_softmax(out) if after else out).astype(np.float32)


def _clip(data: np.ndarray, bounds: Sequence[tuple[float, float] | None]) -> np.ndarray:
    if not any(b is not None for b in bounds):
        return data
    data = np.array(data, dtype=np.float64)
    for c, bound in enumerate(bounds):
        if bound is not None:
            np.clip(data[c], bound[0], bound[1], out=data[c])
    return data


def _clip_to_input(
    data: np.ndarray, window: Box, grid: ResampleGrid, ranges: np.ndarray, axis: int | None
) -> np.ndarray:
    """``data`` (``window`` of the model's grid) clipped to the scaled input's ``ranges``:
    each channel's, or, along an ``axis`` resampled apart with order 0, the range of the
    item slice each model slice is the nearest of (skimage's ``resize`` clips each slice
    it resizes in-plane before nnU-Net takes the nearest along that axis)."""
    from segflow.models.resampling import positions

    shape = [1] * data.ndim
    shape[0] = len(ranges)
    if axis is None or axis < 0:
        low, high = ranges[:, 0, 0], ranges[:, 0, 1]
        return np.clip(data, low.reshape(shape), high.reshape(shape))
    w = window[axis]
    nearest = np.floor(positions(w.start, w.stop, grid.item[axis], grid.model[axis]) + 0.5)
    nearest = np.clip(nearest.astype(np.intp), 0, grid.item[axis] - 1)
    shape[axis + 1] = len(nearest)
    low, high = ranges[:, nearest, 0], ranges[:, nearest, 1]
    return np.clip(data, low.reshape(shape), high.reshape(shape))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=0, keepdims=True))


def _output(probs: np.ndarray, params: ModelParams, box: Box, inner: Box) -> np.ndarray:
    """The step's output over ``box`` (zero outside ``inner``) from the blended map."""
    if params.output == "classes":
        result = np.argmax(probs, axis=0).astype(np.uint8)[np.newaxis]
    elif params.output == "foreground":
        result = (1.0 - probs[:1]).astype(np.float32)
    elif params.output == "raw":
        result = probs.astype(np.float32)
    else:
        result = probs.astype(np.float16)
    out = np.zeros((len(result), *(b.stop - b.start for b in box)), dtype=result.dtype)
    out[(slice(None), *relative(inner, box))] = result
    return out


def _categories(params: ModelParams) -> Categories:
    """The class map's values named by the card's classes (``output: classes``)."""
    if params.output != "classes":
        return ()
    return tuple((value, name, None) for value, name in enumerate(step_card(params).classes))


def _parts(params: ModelParams) -> list[tuple[str, str, OpParams]]:
    parts: list[tuple[str, str, OpParams]] = []
    if any(_masked(step_card(params))):
        parts.append(("mask", "_model_mask", NonzeroMaskParams(connectivity=1)))
    if _needs_statistics(step_card(params)):
        parts.append(("statistics", "_model_statistics", params))
    parts.append(("infer", "_model_infer", params))
    return parts


def _unexpanded(image: np.ndarray, params: ModelParams, ctx: OpContext) -> np.ndarray:
    raise AssertionError("the model step always runs as its parts (_model_statistics, infer)")


register(
    Operation(
        name="model",
        kind="local",
        params=ModelParams,
        apply=_unexpanded,
        summary="tiled inference of a model (segflow checkpoint, TorchScript, .pt2, ONNX, "
        "MONAI bundle, nnU-Net v2, bioimage.io; blended global tile grid; whole-item "
        "normalisation; resampled to the model's spacing and back where it says so); "
        "follow with threshold/label/watershed for instances",
        halo=_halo,
        halo_rule="tile - 1 per axis (from the model card)",
        expand=_parts,
    )
)
register(
    Operation(
        name="_model_statistics",
        kind="global",
        params=ModelParams,
        apply=_normalize,
        summary="the model card's normalisation with whole-item statistics",
        statistic=_statistic,
        out_channels=_statistics_channels,
        out_dtype=lambda p, dtype: np.dtype(np.float32),
        check_layout=_check_statistics_layout,
        item_spacing=_item_spacing,  # clip_to_input: the ranges' axis depends on it
    )
)
register(
    Operation(
        name="_model_infer",
        kind="local",
        params=ModelParams,
        apply=_infer,
        summary="tiled, blended model inference",
        halo=_halo,
        halo_rule="tile - 1 per axis (from the model card)",
        out_channels=_out_channels,
        out_dtype=_out_dtype,
        class_names=_class_names,
        categories=_categories,
        check_layout=_check_layout,
        check_spacing=_check_spacing,
        item_spacing=_item_spacing,
        setup=_load,
        setup_key=_setup_key,
        resources=_resources,
        stat_of="statistics",
    )
)


def model_paths(pipeline: Sequence[Any]) -> list[str]:
    """The ``path`` of every ``model`` step of a raw pipeline (for the config hash)."""
    return [
        str(step["path"])
        for step in pipeline
        if isinstance(step, dict) and step.get("op") == "model" and "path" in step
    ]


def models_hash(paths: Sequence[str]) -> str:
    """One hash of the models at ``paths``: the model hash of a single model, a hash of
    the hashes for several, ``""`` for none."""
    if not paths:
        return ""
    if len(paths) == 1:
        return model_identity(os.fspath(paths[0]))
    digest = hashlib.sha256()
    for path in paths:
        digest.update(model_identity(os.fspath(path)).encode())
    return digest.hexdigest()

"""The model card: everything needed to run a network right, stored as JSON next to its weights.

A card names the architecture and its parameters, the input channels and how each is
normalised, the output channels (classes or an instance-friendly head), the tile, overlap and
blending window of tiled inference, the physical spacing the model expects, the training data
(fingerprint, licence) and the metrics it reached. It is data, never code: a pydantic model
with unknown keys refused, read and written as JSON.

Normalisation uses statistics of the whole item (for example its 1st and 99th percentiles),
supplied by the engine's global-statistic pass, never statistics of one tile or block: a tile
normalised on its own would change with its neighbourhood and seams would appear.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from segflow.errors import ModelError
from segflow.models.inference import Activation
from segflow.models.networks import NetworkSpec, check_tile, find_architecture
from segflow.models.tiling import BlendWindow, TileRule

Head = Literal["semantic", "foreground_boundary", "foreground_distance", "flows"]

#: Output channels of the instance-friendly heads (semantic heads name their own classes);
#: ``flows`` (Cellpose's layout: a flow per spatial axis, then the cell probability's logit)
#: in 2-D; see :func:`head_classes`.
HEAD_CLASSES: dict[str, tuple[str, ...]] = {
    "foreground_boundary": ("background", "foreground", "boundary"),
    "foreground_distance": ("foreground", "distance"),
    "flows": ("flow_y", "flow_x", "cellprob"),
}


def head_classes(head: str, spatial_dims: int) -> tuple[str, ...] | None:
    """The output channels of an instance-friendly ``head`` (None for a semantic head).

    Examples
    --------
    >>> head_classes("flows", 3)
    ('flow_z', 'flow_y', 'flow_x', 'cellprob')
    """
    if head == "flows" and spatial_dims == 3:
        return ("flow_z", *HEAD_CLASSES["flows"])
    return HEAD_CLASSES.get(head)


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Card):
    """How one input channel is scaled before the network sees it.

    ``percentile``: ``(x - P_low) / (P_high - P_low)`` with the item's percentiles ``low`` and
    ``high`` (in 0..100); ``fixed``: the same with the values ``low`` and ``high`` themselves
    (a CT window in HU, say); ``zscore``: ``(x - mean) / std`` of the item; ``none``: as is.
    ``clip`` clips the scaled values to [0, 1] (``percentile`` and ``fixed`` only).
    ``mask: nonzero`` (``zscore`` only; nnU-Net's ``use_mask_for_norm``): the mean and
    standard deviation are the item's within its non-zero mask (:func:`nonzero_mask`) and
    the scaled values outside it are 0. ``mask: nonzero_elements`` (``zscore`` only; MONAI's
    ``NormalizeIntensity(nonzero=True)``): the mean and standard deviation are those of the
    channel's own non-zero values, element by element (no union over channels, no hole
    filling), and only those are scaled: its zeros stay 0 (a channel with no non-zero value
    stays as it is). ``joint`` (``zscore`` only; MONAI's ``channel_wise=False``): the mean and
    standard deviation are taken over the values of all the card's ``joint`` channels
    together (each channel's within its own ``mask``), not channel by channel.
    """

    method: Literal["percentile", "fixed", "zscore", "none"] = "percentile"
    low: float = 1.0
    high: float = 99.0
    clip: bool = False
    mask: Literal["none", "nonzero", "nonzero_elements"] = "none"
    joint: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Normalization:
        if self.mask != "none" and self.method != "zscore":
            raise ValueError(f"`mask` ({self.mask!r}) needs method 'zscore', not {self.method!r}")
        if self.joint and self.method != "zscore":
            raise ValueError(f"`joint` needs method 'zscore', not {self.method!r}")
        if self.method in ("percentile", "fixed") and not self.low < self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if self.method == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"percentiles ({self.low}, {self.high}) must lie in [0, 100]")
        return self


class ChannelCard(_Card):
    name: str
    normalization: Normalization = Normalization()


class TrainingCard(_Card):
    data: str = Field(default="", description="what the model was trained on, in words")
    data_fingerprint: str = Field(default="", description="content hash of the training arrays")
    licence: str = Field(
        default="unknown", description="licence of the training data, e.g. CC0-1.0"
    )
    epochs: int = 0
    seed: int | None = None


class WeightsCard(_Card):
    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: Literal["torch"] = "torch"


class ResamplingCard(_Card):
    """How an item is resampled to the card's ``spacing`` and the output back
    (:mod:`segflow.models.resampling`; the defaults are nnU-Net's).

    ``order``: B-spline order of the image (3); ``order_back``: of the output, logits or
    probabilities, on its way back (1); ``order_z`` and ``order_z_back``: the same along the
    out-of-plane axis of an anisotropic spacing (0); ``separate_z``: resample that axis on its own
    (``None``: when the spacing's max / min exceeds 3); ``clip``: per input channel, the
    bounds its scaled values are clipped to before and after resampling (``None``: none);
    ``clip_to_input``: the resampled image is clipped to the range of the scaled image it
    came from, each channel's, or each slice's along an axis resampled on its own with
    order 0, as ``skimage.transform.resize`` (nnU-Net's) clips (needs the card's ``crop``,
    whose statistics pass finds the ranges).
    """

    order: Literal[0, 1, 3] = 3
    order_back: Literal[0, 1, 3] = 1
    order_z: Literal[0, 1, 3] = 0
    order_z_back: Literal[0, 1, 3] = 0
    separate_z: bool | None = None
    clip: tuple[tuple[float, float] | None, ...] = ()
    clip_to_input: bool = False


class ArchitectureCard(_Card):
    name: str
    params: dict[str, Any] = {}


class ModelCard(_Card):
    """A model card (see the module docstring).

    Examples
    --------
    >>> card = ModelCard(
    ...     name="nuclei",
    ...     architecture={"name": "segnet", "params": {"features": [8, 16]}},
    ...     spatial_dims=2,
    ...     channels=[{"name": "dapi"}],
    ...     head="foreground_boundary",
    ...     tile=(64, 64),
    ... )
    >>> card.classes, card.activation
    (('background', 'foreground', 'boundary'), 'softmax')
    >>> ModelCard.model_validate_json(card.model_dump_json()) == card
    True
    """

    format: Literal["segflow-model-card"] = "segflow-model-card"
    version: Literal[1] = 1
    name: str
    architecture: ArchitectureCard
    spatial_dims: Literal[2, 3]
    channels: tuple[ChannelCard, ...] = Field(min_length=1)
    head: Head = "semantic"
    classes: tuple[str, ...] = ()
    tile: tuple[int, ...]
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    window: BlendWindow = "gaussian"
    tile_rule: TileRule = Field(
        default="even",
        description="where the tiles go: even (segflow's grid) or cellpose (cellpose 4's grid, "
        "`overlap` being its tile_overlap), both anchored at the item",
    )
    spacing: tuple[float, ...] | None = None
    units: str | None = Field(
        default=None,
        description="units of `spacing` as item metadata names them (m, mm, um, ...); with "
        "both, the model step refuses items of another pixel size (see its spacing_tolerance)",
    )
    resampling: ResamplingCard | None = Field(
        default=None,
        description="resample items to `spacing` and the output back, as this says (an "
        "nnU-Net source states nnU-Net's); unset: refuse items off `spacing` (see the "
        "model step's resample and spacing_tolerance)",
    )
    diameter: float | None = Field(
        default=None,
        gt=0,
        description="typical object diameter, in pixels, of the images the model was trained "
        "on (Cellpose's diam_mean: 30 for its models): the model step's `diameter` resamples "
        "an item by this / the item's so its objects reach it",
    )
    output_activation: Activation | None = Field(
        default=None,
        description="what turns the network's output into the blended map (softmax, sigmoid "
        "or none); unset: from the head (softmax, none for the distance head)",
    )
    crop: Literal["nonzero"] | None = Field(
        default=None,
        description="nonzero: the network sees only the item's non-zero bounding box (nnU-Net's "
        "crop_to_nonzero: the box of the voxels where any channel is non-zero, as the item "
        "with its own tile grid, statistics and resampling) and the output outside it is "
        "background; unset: the whole item",
    )
    training: TrainingCard = TrainingCard()
    metrics: dict[str, float] = {}
    weights: WeightsCard | None = None

    @model_validator(mode="before")
    @classmethod
    def _head_classes(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("classes") and data.get("head") in HEAD_CLASSES:
            data = {**data, "classes": head_classes(data["head"], data.get("spatial_dims", 2))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        expected = head_classes(self.head, self.spatial_dims)
        if expected is not None and self.classes != expected:
            raise ValueError(f"head {self.head!r} has the classes {expected}, not {self.classes}")
        if self.head == "semantic" and len(self.classes) < 2:
            raise ValueError(
                f"a semantic head needs at least 2 classes (background first), got {self.classes}"
            )
        if len(self.tile) != self.spatial_dims:
            raise ValueError(f"`tile` {self.tile} must have {self.spatial_dims} sides")
        if self.spacing is not None and len(self.spacing) != self.spatial_dims:
            raise ValueError(f"`spacing` {self.spacing} must have {self.spatial_dims} values")
        if self.resampling is not None and self.spacing is None:
            raise ValueError("`resampling` needs the `spacing` to resample to")
        clip = self.resampling.clip if self.resampling is not None else ()
        if clip and len(clip) != len(self.channels):
            raise ValueError(
                f"`resampling.clip` has {len(clip)} entries for {len(self.channels)} channels"
            )
        if self.resampling is not None and self.resampling.clip_to_input and self.crop is None:
            raise ValueError("`resampling.clip_to_input` needs `crop` (its statistics pass)")
        if self.crop is not None and self.head != "semantic":
            raise ValueError(
                f"`crop` ({self.crop!r}) needs a semantic head (background outside the box), "
                f"not {self.head!r}"
            )
        if find_architecture(self.architecture.name) is not None:
            check_tile(self.network_spec(), self.tile)
        return self

    @property
    def activation(self) -> Activation:
        """What turns the network's output into the blended map: softmax over the classes,
        or nothing for the distance and flow heads (their foreground channel is a logit); a
        card derived from another format states its own (``output_activation``)."""
        if self.output_activation is not None:
            return self.output_activation
        return "none" if self.head in ("foreground_distance", "flows") else "softmax"

    def network_spec(self) -> NetworkSpec:
        """The network this card describes (channels from ``channels`` and ``classes``)."""
        return NetworkSpec(
            name=self.architecture.name,
            spatial_dims=self.spatial_dims,
            in_channels=len(self.channels),
            out_channels=len(self.classes),
            params=self.architecture.params,
        )

    def identity_json(self) -> str:
        """Canonical JSON of the card without its ``weights`` entry (which depends on how the
        weights were serialised): the card's part of the model hash. ``output_activation``,
        ``resampling``, ``diameter`` and ``crop`` enter only when set, ``tile_rule`` only
        when not ``even``, a channel's normalisation ``mask`` only when not ``none`` and its
        ``joint`` only when true, so the cards written before they existed keep their hash."""
        data = self.model_dump(mode="json", exclude={"weights"})
        for key in ("output_activation", "resampling", "diameter", "crop"):
            if data[key] is None:
                del data[key]
        for channel in data["channels"]:
            if channel["normalization"]["mask"] == "none":
                del channel["normalization"]["mask"]
            if not channel["normalization"]["joint"]:
                del channel["normalization"]["joint"]
        if "resampling" in data and not data["resampling"]["clip_to_input"]:
            del data["resampling"]["clip_to_input"]
        if data["tile_rule"] == "even":
            del data["tile_rule"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def check_item(card: ModelCard, *, channels: int, spatial_ndim: int, item: str = "") -> None:
    """Refuse an item whose channel count or dimensionality the model cannot take.

    Examples
    --------
    >>> card = ModelCard(name="ct", architecture={"name": "segnet"}, spatial_dims=3,
    ...                  channels=[{"name": "hu"}], classes=["background", "tumour"],
    ...                  tile=(32, 32, 32))
    >>> check_item(card, channels=1, spatial_ndim=3, item="case_01")
    >>> check_item(card, channels=1, spatial_ndim=2, item="slice_7")
    Traceback (most recent call last):
    ...
    segflow.errors.ModelError: item 'slice_7' is 2-D, model 'ct' is 3-D
    """
    if spatial_ndim != card.spatial_dims:
        raise ModelError(
            f"item {item!r} is {spatial_ndim}-D, model {card.name!r} is {card.spatial_dims}-D"
        )
    if channels != len(card.channels):
        names = ", ".join(c.name for c in card.channels)
        raise ModelError(
            f"item {item!r} has {channels} channels, model {card.name!r} expects "
            f"{len(card.channels)} ({names})"
        )


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Where any channel of ``image`` ``(c, ...)`` is non-zero, holes filled: nnU-Net's
    ``create_nonzero_mask`` (``scipy.ndimage.binary_fill_holes``, faces connectivity), the
    mask a ``mask: nonzero`` normalisation is taken within.

    Examples
    --------
    >>> image = np.array([[[0, 0, 0, 0], [0, 3, 0, 2], [0, 1, 5, 0]]])
    >>> nonzero_mask(image).astype(int)
    array([[0, 0, 0, 0],
           [0, 1, 0, 1],
           [0, 1, 1, 0]])
    >>> ring = np.ones((1, 3, 3))
    >>> ring[0, 1, 1] = 0
    >>> int(nonzero_mask(np.pad(ring, ((0, 0), (1, 1), (1, 1)))).sum())  # the hole is filled
    9
    """
    from scipy.ndimage import binary_fill_holes

    return np.asarray(binary_fill_holes((np.asarray(image) != 0).any(axis=0)))


def item_statistics(
    image: np.ndarray, channels: Sequence[ChannelCard]
) -> list[tuple[float, float]]:
    """Per channel, the two numbers its normalisation needs, from the whole item ``(c, ...)``
    (a ``mask: nonzero`` channel's within :func:`nonzero_mask`, a ``mask: nonzero_elements``
    channel's over its own non-zero values, ``joint`` channels' over their values together).

    The engine computes the same numbers with a global-statistic pass over the blocks; this
    in-memory version serves training and small items.

    Examples
    --------
    >>> image = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    >>> item_statistics(image, [ChannelCard(name="x")])
    [(1.0, 99.0)]
    >>> pair = np.array([[[0.0, 2.0]], [[4.0, 0.0]]])
    >>> both = ChannelCard(name="x", normalization={"method": "zscore", "joint": True,
    ...                                             "mask": "nonzero_elements"})
    >>> item_statistics(pair, [both, both])
    [(3.0, 1.0), (3.0, 1.0)]
    """
    masked = any(c.normalization.mask == "nonzero" for c in channels)
    mask = nonzero_mask(image) if masked else None
    if mask is not None and not mask.any():
        raise ModelError("the item is all zero: no non-zero mask to normalise within")
    values = [
        _channel_values(plane, channel.normalization, mask)
        for plane, channel in zip(image, channels, strict=True)
    ]
    joint = [v for v, c in zip(values, channels, strict=True) if c.normalization.joint]
    pooled = np.concatenate(joint) if joint else None
    stats = []
    for own, channel in zip(values, channels, strict=True):
        norm = channel.normalization
        if norm.joint and pooled is not None:
            own = pooled
        if norm.method == "percentile":
            low, high = np.percentile(own, [norm.low, norm.high])
        elif norm.method == "zscore" and own.size == 0:  # nonzero_elements, all zero: as is
            low, high = 0.0, 1.0
        elif norm.method == "zscore":
            low, high = own.mean(), own.std()
        elif norm.method == "fixed":
            low, high = norm.low, norm.high
        else:
            low, high = 0.0, 1.0
        stats.append((float(low), float(high)))
    return stats


def _channel_values(plane: Any, norm: Normalization, mask: np.ndarray | None) -> np.ndarray:
    """The values of one channel its statistics are taken over (float64, flat)."""
    values = np.asarray(plane, dtype=np.float64)
    if norm.mask == "nonzero" and mask is not None:
        return values[mask]
    if norm.mask == "nonzero_elements":
        return values[values != 0]
    return values.ravel()


def normalize_image(
    image: np.ndarray,
    channels: Sequence[ChannelCard],
    stats: Sequence[tuple[float, float]],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``image`` ``(c, ...)`` scaled channel by channel as the card says, float32.

    ``stats`` are the item's numbers from :func:`item_statistics` (or the engine's pass). A
    channel whose two numbers coincide (a constant item) is scaled by 1 rather than divided
    by zero. A ``mask: nonzero`` channel is 0 outside ``mask`` (the item's
    :func:`nonzero_mask` over the same pixels; computed from ``image`` when not given); a
    ``mask: nonzero_elements`` channel is 0 where its own value is 0.

    Examples
    --------
    >>> image = np.array([[[0.0, 5.0, 10.0]]])
    >>> normalize_image(image, [ChannelCard(name="x")], [(0.0, 10.0)])
    array([[[0. , 0.5, 1. ]]], dtype=float32)
    """
    if len(image) != len(channels) or len(stats) != len(channels):
        raise ModelError(
            f"normalisation: image has {len(image)} channels, the card {len(channels)}, "
            f"the statistics {len(stats)}"
        )
    out = np.empty(image.shape, dtype=np.float32)
    for c, (channel, (a, b)) in enumerate(zip(channels, stats, strict=True)):
        norm = channel.normalization
        if norm.method == "none":
            out[c] = image[c]
            continue
        offset, scale = (a, b) if norm.method == "zscore" else (a, b - a)
        scale = scale if scale > 0 else 1.0
        out[c] = (np.asarray(image[c], dtype=np.float32) - np.float32(offset)) / np.float32(scale)
        if norm.clip and norm.method != "zscore":
            np.clip(out[c], 0.0, 1.0, out=out[c])
        if norm.mask == "nonzero":
            mask = nonzero_mask(image) if mask is None else mask
            out[c][~mask] = 0.0
        elif norm.mask == "nonzero_elements":
            out[c][np.asarray(image[c]) == 0] = 0.0
    return out

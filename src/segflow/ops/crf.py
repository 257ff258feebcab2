"""Mean-field CRF refinement of a probability map, guided by the image (DeepLab's CRF, with
ConvCRF's truncated kernels).

The energy is the fully connected CRF of Krähenbühl and Koltun (2011): unaries ``-log P``
from the map, and a Potts pairwise term with two Gaussian kernels between pixels ``i, j``::

    k(i, j) = w_a exp(-|p_i - p_j|^2 / 2 s_a^2 - |I_i - I_j|^2 / 2 s_c^2)   (appearance)
            + w_s exp(-|p_i - p_j|^2 / 2 s_s^2)                             (smoothness)

As in ConvCRF (Teichmann and Cipolla, 2018), the kernels are truncated: only pixels within
``radius`` of each other interact. Each mean-field iteration is then

    Q_i(l) ∝ exp(log P_i(l) + sum_{0 < |p_i - p_j| <= radius} k(i, j) Q_j(l)),

which reads ``radius`` pixels around each pixel, so ``iterations`` of them read
``iterations * radius``: that is the halo, and blockwise equals whole-item. Neighbours
outside the item do not exist (they add nothing).

A map whose classes include a thin one the smoothing would erase (the nuclei U-Net's
1-2 px boundary between touching nuclei) names its foreground channels (``foreground:
[1, 2]``): the updates then run on two labels, background (the other channels' sum) and
foreground (theirs), and each side's refined probability is shared among its channels in
the proportions of the input, so which foreground class wins a pixel does not change,
only whether it is foreground. (A one-channel map is foreground vs background already.)

The guide ``I`` is the image the step's phase started from (``OpContext.source``): the
item's input when no global or connectivity step comes before (a ``model`` step before it
is fine), all of its channels. Distances are in pixels, or in the item's physical units
with ``units: physical`` (``radius`` and the sigmas then too).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
from pydantic import Field

from segflow.ops.registry import OpContext, Operation, OpParams, register

#: How far a map's values may stray from [0, 1] (and its channels' sum from 1) and still
#: be probabilities: float16 maps (a model's ``output: probabilities``) round to 1e-3.
PROBABILITY_SLACK = 1e-2


class CrfParams(OpParams):
    iterations: int = Field(5, ge=1, le=50, description="mean-field iterations")
    radius: float = Field(
        5, gt=0, description="the kernels' truncation: pixels interact within this distance"
    )
    appearance_weight: float = Field(4.0, ge=0, description="w_a, the appearance kernel's weight")
    appearance_sigma: float = Field(
        3.0, gt=0, description="s_a, the appearance kernel's spatial reach"
    )
    colour_sigma: float = Field(
        13.0,
        gt=0,
        description="s_c, the appearance kernel's reach in the guide's values (13 for 8-bit "
        "images, ConvCRF's default; scale it with the image's range)",
    )
    smoothness_weight: float = Field(3.0, ge=0, description="w_s, the smoothness kernel's weight")
    smoothness_sigma: float = Field(1.0, gt=0, description="s_s, the smoothness kernel's reach")
    foreground: list[int] | None = Field(
        None,
        description="channels that are one label together, the foreground (e.g. [1, 2] for "
        "an interior / boundary head): the CRF refines background against their sum, and each "
        "channel keeps its share of its side, so a thin class the smoothing would erase (a "
        "boundary between touching objects) stays; default: every channel is a label",
    )
    units: Literal["pixel", "physical"] = Field(
        "pixel",
        description="units of radius and the spatial sigmas: pixels, or the item's spacing",
    )
    output: Literal["probabilities", "classes"] = Field(
        "probabilities",
        description="probabilities: the refined map (float32); classes: its argmax (uint8; a "
        "one-channel map: 1 where p > 0.5)",
    )


def _steps(params: CrfParams, spacing: tuple[float, ...]) -> tuple[float, ...]:
    """Each axis's pixel size in the units of the parameters."""
    return tuple(abs(s) for s in spacing) if params.units == "physical" else (1.0,) * len(spacing)


def crf_halo(params: CrfParams, ndim: int, spacing: tuple[float, ...]) -> tuple[int, ...]:
    """``iterations`` times the radius in pixels, per axis."""
    sizes = _steps(params, spacing or (1.0,) * ndim)
    return tuple(params.iterations * math.floor(params.radius / s + 1e-9) for s in sizes)


def neighbour_offsets(params: CrfParams, sizes: tuple[float, ...]) -> list[tuple[int, ...]]:
    """The offsets within ``radius`` (in the parameters' units), the centre left out."""
    reach = [math.floor(params.radius / s + 1e-9) for s in sizes]
    offsets = []
    for offset in itertools.product(*(range(-r, r + 1) for r in reach)):
        squared = sum((o * s) ** 2 for o, s in zip(offset, sizes, strict=True))
        if 0 < squared <= params.radius**2 + 1e-9:
            offsets.append(offset)
    return offsets


def check_probabilities(probability: np.ndarray) -> None:
    """Refuse a map that is not probabilities, in one line naming what was found."""
    low, high = float(np.nanmin(probability)), float(np.nanmax(probability))
    if (
        not np.isfinite(probability).all()
        or low < -PROBABILITY_SLACK
        or high > 1 + PROBABILITY_SLACK
    ):
        raise ValueError(
            f"crf needs a probability map (values in [0, 1]), got values from {low:g} to "
            f"{high:g}: use a model step's `output: probabilities` or `foreground`"
        )
    if probability.shape[0] > 1:
        sums = probability.sum(axis=0, dtype=np.float64)
        worst = float(np.abs(sums - 1).max()) if sums.size else 0.0
        if worst > PROBABILITY_SLACK:
            raise ValueError(
                f"crf needs a probability map whose {probability.shape[0]} channels sum to 1, "
                f"some sum to {1 + worst:g} or {1 - worst:g}"
            )


def refine_with_crf(image: np.ndarray, params: CrfParams, ctx: OpContext) -> np.ndarray:
    """The map after ``iterations`` mean-field updates (see the module docstring); a
    one-channel map is the foreground of ``(1 - p, p)`` and stays one channel. With
    ``foreground``, the updates run on background vs the sum of those channels, and the
    refined sides are shared among their channels as the input shares them."""
    if ctx.source is None:
        raise ValueError("crf needs the image its map was made from (the phase's input)")
    check_probabilities(image)
    single = image.shape[0] == 1
    q = np.concatenate([1 - image, image]) if single else image
    q = q.astype(np.float32)
    guide = ctx.source.astype(np.float32)
    sizes = _steps(params, ctx.spacing or (1.0,) * (image.ndim - 1))
    if params.foreground and not single:
        inside = foreground_channels(params.foreground, q.shape[0])
        sides = np.stack([q[~inside].sum(axis=0), q[inside].sum(axis=0)])
        q = share_sides(q, inside, mean_field(sides, guide, params, sizes))
    else:
        q = mean_field(q, guide, params, sizes)
    if params.output == "classes":
        return np.argmax(q, axis=0).astype(np.uint8)[np.newaxis]
    return q[1:] if single else q


def mean_field(
    q: np.ndarray, guide: np.ndarray, params: CrfParams, sizes: tuple[float, ...]
) -> np.ndarray:
    """``params.iterations`` mean-field updates of the label probabilities ``q``."""
    unary = np.log(np.clip(q, 1e-6, 1.0))
    kernels = [_Kernel(offset, sizes, params) for offset in neighbour_offsets(params, sizes)]
    for _ in range(params.iterations):
        message = np.zeros_like(q)
        for kernel in kernels:
            kernel.add_message(message, q, guide)
        q = _softmax(unary + message)
    return q


def foreground_channels(channels: list[int], count: int) -> np.ndarray:
    """A mask of the ``foreground`` channels of a ``count``-channel map.

    Raises
    ------
    ValueError
        When a channel is not in the map, or the channels leave no background.
    """
    wrong = [c for c in channels if not 0 <= c < count]
    if wrong:
        raise ValueError(f"crf `foreground` {channels}: the map has channels 0 to {count - 1}")
    inside = np.zeros(count, bool)
    inside[channels] = True
    if inside.all():
        raise ValueError(f"crf `foreground` {channels}: every channel, no background left")
    return inside


def share_sides(q: np.ndarray, inside: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """``q``'s channels rescaled so that each side (background ``~inside``, foreground
    ``inside``) sums to its refined probability ``sides``, in the proportions of ``q``
    (equal shares where a side had nothing)."""
    out = np.empty_like(q)
    for side, mask in enumerate((~inside, inside)):
        part = q[mask]
        total = part.sum(axis=0, keepdims=True)
        share = np.where(total > 0, part / np.where(total > 0, total, 1), 1 / len(part))
        out[mask] = share * sides[side]
    return out


class _Kernel:
    """One neighbour offset: its spatial weights, and where its neighbours exist."""

    def __init__(self, offset: tuple[int, ...], sizes: tuple[float, ...], params: CrfParams):
        squared = sum((o * s) ** 2 for o, s in zip(offset, sizes, strict=True))
        self.offset = offset
        self.appearance = params.appearance_weight * math.exp(
            -squared / (2 * params.appearance_sigma**2)
        )
        self.smoothness = params.smoothness_weight * math.exp(
            -squared / (2 * params.smoothness_sigma**2)
        )
        self.colour = np.float32(-1 / (2 * params.colour_sigma**2))

    def add_message(self, message: np.ndarray, q: np.ndarray, guide: np.ndarray) -> None:
        """``message[i] += k(i, i + offset) * q[i + offset]`` where ``i + offset`` exists."""
        if any(abs(o) >= n for o, n in zip(self.offset, q.shape[1:], strict=True)):
            return  # no pixel has this neighbour
        here, there = _overlap(self.offset, q.shape[1:])
        difference = guide[(slice(None), *here)] - guide[(slice(None), *there)]
        distance = np.sum(difference * difference, axis=0)
        weight = np.float32(self.appearance) * np.exp(distance * self.colour)
        weight += np.float32(self.smoothness)
        message[(slice(None), *here)] += weight * q[(slice(None), *there)]


def _overlap(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], ...]:
    """Slices ``here`` and ``there = here + offset`` over the pixels whose neighbour exists."""
    here, there = [], []
    for o, n in zip(offset, shape, strict=True):
        here.append(slice(max(0, -o), min(n, n - o)))
        there.append(slice(max(0, o), min(n, n + o)))
    return tuple(here), tuple(there)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    exps = np.exp(shifted)
    return exps / exps.sum(axis=0, keepdims=True)


def _float_map(params: CrfParams, dtype: np.dtype) -> np.dtype:
    if np.dtype(dtype).kind != "f":
        raise ValueError(
            f"crf needs a probability map (floats in [0, 1]), its input is {np.dtype(dtype)}: "
            "put it after a model step with `output: probabilities` or `foreground`"
        )
    return np.dtype(np.float32 if params.output == "probabilities" else np.uint8)


register(
    Operation(
        name="crf",
        kind="local",
        params=CrfParams,
        apply=refine_with_crf,
        summary="mean-field CRF over a probability map, guided by the image (Gaussian "
        "appearance + smoothness kernels truncated at radius, as ConvCRF); exact blockwise",
        halo_spacing=crf_halo,
        halo_rule="iterations x radius (in pixels per axis)",
        out_dtype=_float_map,
        out_channels=lambda p, channels: channels if p.output == "probabilities" else 1,
    )
)

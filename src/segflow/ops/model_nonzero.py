"""The item's non-zero mask and bounding box for a model step (nnU-Net's ``crop_to_nonzero``).

nnU-Net crops every image to the bounding box of its non-zero voxels (where any channel is
not 0) before anything else: the statistics, the resampling grid and the tile grid are the
box's, and the prediction outside the box is background. A channel with
``use_mask_for_norm`` is z-scored with the mean and standard deviation of its values within
the non-zero mask (holes filled, ``binary_fill_holes``) and is 0 outside the mask. Both are
whole-item facts: they are found here before the block pass, so every block layout gives
the whole item's result. The card says ``crop: nonzero`` and, per channel,
``normalization: {method: zscore, mask: nonzero}``.

``_model_mask`` (connectivity; only for a card with a ``mask: nonzero`` channel)
    The background (every channel 0) labelled per block and merged across block faces as
    ``fill_holes`` merges it; its output is the input channels (float32) followed by the
    hole-filled non-zero mask (0 / 1) as one more channel.
:class:`NonzeroStatistics` (the statistic of the model's ``statistics`` part)
    A first pass finds the bounding box (each core's extent of the mask, merged); the next
    ones take each channel's statistic over the box (``crop``) or within the mask, and (for
    ``resampling.clip_to_input``) each channel's range of values in the box, per slice
    along an axis resampled on its own. The value is the channels' ``(a, b)`` pairs, one
    ``(start, stop)`` pair per axis, then the ranges' ``(low, high)`` pairs (channel by
    channel, slice by slice; a masked channel's include its mean where the slice has voxels
    outside the mask, which are 0 once scaled): the model's inference part reads the box and
    the ranges from it (``stat_of``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from segflow.engine.blocks import Box, intersect, relative
from segflow.ops.objects import FillHolesParams, _holes_rule, _label_mask
from segflow.ops.registry import Done, OpContext, Operation, OpParams, register

#: A bounding box while it is reduced: per axis the first index and one past the last.
Extent = tuple[tuple[int, ...], tuple[int, ...]]


class NonzeroMaskParams(OpParams):
    connectivity: Literal[1] = Field(
        1, description="connectivity of the background: faces (binary_fill_holes' default)"
    )


def _label_zero(image: np.ndarray, params: NonzeroMaskParams, ctx: OpContext) -> np.ndarray:
    return _label_mask((image == 0).all(axis=0), params.connectivity)[np.newaxis]


def _with_mask(ids: np.ndarray, source: np.ndarray | None, params: OpParams) -> np.ndarray:
    """The input channels and, last, the non-zero mask with the holes (kept ids) filled."""
    assert source is not None
    mask = (source != 0).any(axis=0) | (ids != 0)
    return np.concatenate([source.astype(np.float32), mask[np.newaxis].astype(np.float32)])


register(
    Operation(
        name="_model_mask",
        kind="connectivity",
        params=NonzeroMaskParams,
        apply=_label_zero,
        rule=lambda params, ctx: _holes_rule(FillHolesParams(connectivity=1, max_size=None), ctx),
        finish=_with_mask,
        summary="the item's non-zero mask (any channel), holes filled, as a last channel",
        halo_rule="0 (border contact is merged globally)",
        out_channels=lambda params, channels: channels + 1,
        out_dtype=lambda params, dtype: np.dtype(np.float32),
    )
)


def _extent(mask: np.ndarray, box: Box) -> Extent | None:
    """Where ``mask`` (covering ``box``) is true, per axis, in item coordinates."""
    if not mask.any():
        return None
    low, high = [], []
    for axis, where in enumerate(box):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        low.append(where.start + int(hit[0]))
        high.append(where.start + int(hit[-1]) + 1)
    return tuple(low), tuple(high)


def _merge_extents(partials: Sequence[Extent | None]) -> Extent | None:
    found = [p for p in partials if p is not None]
    if not found:
        return None
    low = tuple(min(p[0][a] for p in found) for a in range(len(found[0][0])))
    high = tuple(max(p[1][a] for p in found) for a in range(len(found[0][1])))
    return low, high


@dataclass(frozen=True)
class NonzeroStatistics:
    """The non-zero bounding box, then the channels' statistics over it or the mask.

    ``channels`` reduces the per-channel statistics (the model step's ``ChannelStatistics``,
    mapped over a list of each channel's values); ``masked`` says which channels take theirs
    within the mask, ``has_mask`` that the input's last channel is the hole-filled mask
    (``_model_mask``), ``crop`` that the other channels take theirs over the box.
    """

    channels: Any
    masked: tuple[bool, ...]
    has_mask: bool
    crop: bool
    ranges: bool = False
    axis: int | None = None
    positional = True

    def start(self) -> Any:
        return ("box", None, None, None)

    def _mask(self, core: np.ndarray) -> np.ndarray:
        return core[-1] != 0 if self.has_mask else (core != 0).any(axis=0)

    def map(
        self, core: np.ndarray, state: Any, *, box: Box = (), shape: tuple[int, ...] = ()
    ) -> Any:
        if state[0] == "box":
            return _extent(self._mask(core), box)
        planes = core[:-1] if self.has_mask else core
        mask = self._mask(core) if any(self.masked) or self.ranges else None
        crop = tuple(slice(a, b) for a, b in state[1])
        inside = relative(intersect(box, crop), box) if self.crop else (slice(None),) * len(box)
        values = [
            plane[mask] if masked and mask is not None else plane[inside]
            for plane, masked in zip(planes, self.masked, strict=True)
        ]
        ranges = None
        if self.ranges and state[3] is None:  # the first pass over the values finds them
            assert mask is not None
            ranges = _slice_ranges(planes, mask, self.masked, box, crop, self.axis)
        return self.channels.map(values, state[2]), ranges

    def merge(self, partials: Sequence[Any], state: Any) -> Any:
        if state[0] == "box":
            return _merge_extents(partials)
        ranges = [p[1] for p in partials if p[1] is not None]
        return self.channels.merge([p[0] for p in partials], state[2]), _merge_ranges(ranges)

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if state[0] == "box":
            extent = _merge_extents(partials)
            if extent is None:
                raise ValueError(
                    "the item is all zero: the model crops to its non-zero bounding box or "
                    "normalises within its non-zero mask (nnU-Net's crop_to_nonzero, "
                    "use_mask_for_norm), and it has no non-zero voxel"
                )
            pairs = tuple(zip(*extent, strict=True))
            inner = self.channels.start()
            if all(s is None for s in inner) and not self.ranges:  # no pass over the values
                return Done((*self.channels.fixed, *pairs))
            return ("stats", pairs, inner, None)
        result = self.channels.combine([p[0] for p in partials], state[2])
        ranges = state[3]
        if self.ranges and ranges is None:
            ranges = _merge_ranges([p[1] for p in partials if p[1] is not None])
        if isinstance(result, Done):
            return Done((*result.value, *state[1], *self._folded(ranges, result.value)))
        return ("stats", state[1], result, ranges)

    def _folded(self, ranges: Ranges | None, stats: Sequence[Any]) -> list[tuple[float, float]]:
        """The ranges as ``(low, high)`` pairs; where a masked channel's slice has voxels
        outside the mask, its mean joins them (the value that scales to 0)."""
        if ranges is None:
            return []
        low, high, outside = (np.array(r, dtype=np.float64) for r in ranges)
        for c, masked in enumerate(self.masked):
            if masked:
                mean = float(stats[c][0])
                low[c] = np.where(outside[c], np.fmin(low[c], mean), low[c])
                high[c] = np.where(outside[c], np.fmax(high[c], mean), high[c])
        return [(float(a), float(b)) for a, b in zip(low.ravel(), high.ravel(), strict=True)]


#: Per channel and slice: the lowest and highest value, and whether the slice has voxels
#: outside the mask (``(channels, slices)`` arrays each).
Ranges = tuple[np.ndarray, np.ndarray, np.ndarray]


def _slice_ranges(
    planes: np.ndarray, mask: np.ndarray, masked: Sequence[bool], box: Box, crop: Box,
    axis: int | None,
) -> Ranges:  # fmt: skip
    """This core's part of the ranges: over ``crop`` (the box), per slice along ``axis``
    (one slice when ``None``), a masked channel's within ``mask``."""
    n = 1 if axis is None else crop[axis].stop - crop[axis].start
    low = np.full((len(planes), n), np.inf)
    high = np.full((len(planes), n), -np.inf)
    outside = np.zeros((len(planes), n), dtype=bool)
    part = intersect(box, crop)
    if any(s.stop <= s.start for s in part):
        return low, high, outside
    where = relative(part, box)
    lead = 0 if axis is None else axis
    inside = np.moveaxis(mask[where], lead, 0)
    inside = inside.reshape(1 if axis is None else inside.shape[0], -1)
    at = 0 if axis is None else part[axis].start - crop[axis].start
    rows = slice(at, at + inside.shape[0])
    for c, plane in enumerate(planes):
        values = np.moveaxis(np.asarray(plane[where], dtype=np.float64), lead, 0)
        values = values.reshape(inside.shape)
        keep = inside if masked[c] else np.ones_like(inside)
        low[c, rows] = np.fmin.reduce(np.where(keep, values, np.inf), axis=1)
        high[c, rows] = np.fmax.reduce(np.where(keep, values, -np.inf), axis=1)
        outside[c, rows] = masked[c] and (~inside).any(axis=1)
    return low, high, outside


def _merge_ranges(parts: Sequence[Ranges]) -> Ranges | None:
    if not parts:
        return None
    low = np.minimum.reduce([p[0] for p in parts])
    high = np.maximum.reduce([p[1] for p in parts])
    return low, high, np.logical_or.reduce([p[2] for p in parts])

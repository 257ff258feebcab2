"""Cellpose-style flow dynamics: a flow head's output (dY, dX, cellprob) becomes instances.

The mathematics is Cellpose's mask computation (``cellpose.dynamics.compute_masks`` of
cellpose 4): every pixel with ``cellprob > cellprob_threshold`` follows the flows
(``flows * mask / 5``) for ``niter`` Euler steps, sampling them bilinearly in positions
normalised by the whole item's shape and clamped to it; the truncated end points make a
histogram; its 5x5 local maxima with more than 10 end points are seeds, each grown 5 times
by a 3x3 dilation through histogram bins with more than 2 end points (within 5 pixels);
seeds are ranked by their count (ties: scan order), and where grown seeds overlap the
larger rank wins; each pixel takes the seed whose grown region holds its end point. Masks of
more than ``max_size_fraction`` of the item and masks of fewer than ``min_size`` pixels are
removed, sizes counted over the whole item.

Blockwise exactness. Each block follows its points in the item's *global* coordinates, with
the same float32 arithmetic as torch's CPU ``grid_sample`` (2-D: its vectorised AVX2/AVX-512
kernel, whose fused multiply-adds are emulated in float64; 3-D: its scalar kernel), so a
point's path does not depend on the block layout. A pixel whose
path stays within ``max_travel`` pixels of it (checked: a longer path stops the item with an
error naming the pixel) needs flows within ``3 * max_travel + 12`` pixels of the block (its
end, the histogram there, the seeds and their growth); each mask is named by its seed's
item position, and the size rules are decided over the whole item by segflow's label
stitching (``_flow_sizes``, a connectivity step by id).

Input ``(dY, dX, cellprob)`` in 2-D, ``(dZ, dY, dX, cellprob)`` in 3-D. ``flow_threshold``
(2-D) adds Cellpose's flow-error check on whole masks between the two
(:mod:`segflow.ops.flow_error`). Not done: the hole filling of Cellpose's
``fill_holes_and_remove_small_masks`` (``fill_voids`` per mask, in label order): masks keep
their holes.

Examples
--------
Two touching discs whose flows point to their centres, cut into 16 x 16 blocks:

>>> import numpy as np
>>> from segflow import segment
>>> yy, xx = np.mgrid[:40, :60].astype(np.float32)
>>> right = (yy - 20) ** 2 + (xx - 40) ** 2 <= 144
>>> cell = right | ((yy - 20) ** 2 + (xx - 15) ** 2 <= 100)
>>> dy, dx = 20 - yy, np.where(right, 40, 15) - xx
>>> norm = np.hypot(dy, dx) + 1e-3
>>> flows = np.stack([5 * dy / norm * cell, 5 * dx / norm * cell, np.where(cell, 3, -3)])
>>> labels = segment(flows.astype(np.float32), [{"op": "flow_dynamics"}], channel_axis=0,
...                  block_shape=(16, 16))
>>> np.bincount(labels.ravel()).tolist()
[1642, 441, 317]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi

from segflow.ops.flow_error import FlowCheckParams
from segflow.ops.label import Connectivity
from segflow.ops.objects import _counts, _label_ids, _local_ids
from segflow.ops.registry import OpContext, Operation, OpParams, register
from segflow.stitch.labels import Box, ObjectRule

#: The seeds' rules (Cellpose's ``get_masks_torch``): 5x5 local maxima holding more than
#: SEED_COUNT end points, grown GROW_STEPS times through bins with more than GROW_COUNT.
SEED_POOL, SEED_COUNT, GROW_STEPS, GROW_COUNT = 5, 10, 5, 2
#: How far (pixels) a label depends on the histogram beyond its end point: a seed within
#: GROW_STEPS, whose detection reads SEED_POOL // 2 further and growth GROW_STEPS.
SEED_REACH = 2 * GROW_STEPS
#: Steps between two looks for points that cycle (each look keeps two states: cheap).
RETIRE_EVERY = 4


class FlowDynamicsParams(OpParams):
    niter: int = Field(200, ge=0, description="Euler steps each pixel follows the flows")
    cellprob_threshold: float = Field(
        0.0, description="pixels with cellprob above this follow the flows"
    )
    min_size: int = Field(15, description="remove masks of fewer pixels (<= 0: keep all)")
    max_size_fraction: float = Field(
        0.4, gt=0, description="remove masks of more than this fraction of the item's pixels"
    )
    flow_threshold: float | None = Field(
        None,
        ge=0,
        description="Cellpose's flow-error quality check: remove masks whose flows, recomputed "
        "from the mask, differ from the network's by more than this mean squared error "
        "(Cellpose's default 0.4; None or 0: no check; 2-D only)",
    )
    max_travel: int = Field(
        48,
        ge=1,
        description="farthest a pixel's path may reach from it, in pixels along any axis (sets "
        "the halo, 3 * max_travel + 12); a longer path stops the item with an error",
    )

    @property
    def checks_flows(self) -> bool:
        return self.flow_threshold is not None and self.flow_threshold > 0


class FlowSizesParams(OpParams):
    min_size: int = 15
    max_size_fraction: float = 0.4
    connectivity: Connectivity = 1


def flow_halo(params: FlowDynamicsParams, ndim: int) -> tuple[int, ...]:
    """A label needs its end point (``max_travel``), every end point that counts in the
    histogram around it (``max_travel + SEED_REACH``) and their flows (``max_travel``)."""
    return (3 * params.max_travel + SEED_REACH + 2,) * ndim


# --- following the flows ----------------------------------------------------------------------


def _fma(a: np.ndarray, b: np.ndarray | np.floating, c: np.ndarray | np.floating) -> np.ndarray:
    """``a * b + c`` rounded once to float32, as the fused multiply-add of torch's AVX2 and
    AVX-512 grid_sample kernels (the float64 sum is exact but where ``c`` dwarfs ``a * b``;
    there a second rounding can differ on an exact float32 tie, about once in 2^28)."""
    product = a.astype(np.float64) * b
    product += c
    return product.astype(np.float32)


def _normalised(
    flows: np.ndarray, mask: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, ...]:
    """Cellpose's flow images in normalised units: ``flows * mask / 5`` (in the input's
    dtype), as float32 times ``2 / (size - 1)`` (torch multiplies by the float32 scalar)."""
    out = []
    for k, size in enumerate(shape):
        step = (flows[k] * mask / 5.0).astype(np.float32)
        out.append(step * np.float32(2.0 / (size - 1)))
    return tuple(out)


def _start(points: np.ndarray, size: int) -> np.ndarray:
    """Normalised start positions ``points / (size - 1) * 2 - 1`` in float32, as Cellpose."""
    scaled = points.astype(np.float32) / np.float32(size - 1)
    return scaled * np.float32(2) - np.float32(1)


def _end(position: np.ndarray, size: int) -> np.ndarray:
    """Back to pixels and truncated: ``int((p + 1) * 0.5 * (size - 1))``."""
    pixels = (position + np.float32(1)) * np.float32(0.5) * np.float32(size - 1)
    return pixels.astype(np.int64)


class _Window:
    """The block's flows, zero-padded by one pixel, and where they lie in the item."""

    def __init__(self, images: tuple[np.ndarray, ...], box: Box, shape: tuple[int, ...]):
        self.origin = np.array([s.start for s in box]) - 1
        self.images = [np.pad(image, 1).ravel() for image in images]
        padded = tuple(n + 2 for n in images[0].shape)
        self.strides = [int(np.prod(padded[a + 1 :])) for a in range(len(padded))]
        self.shape = shape
        # Reads just outside the item are zeros (grid_sample's zero padding); reads inside
        # the item but outside the window are refused (the halo rules them out).
        self.low = [s.start if s.start > 0 else -1 for s in box]
        self.high = [s.stop - 1 if s.stop < n else n for s, n in zip(box, shape, strict=True)]


def follow_flows(
    window: _Window, points: tuple[np.ndarray, ...], niter: int, max_travel: int
) -> tuple[np.ndarray, ...]:
    """End pixels (item coordinates, truncated) of the points after ``niter`` steps.

    A step samples the flows bilinearly where torch's ``grid_sample(align_corners=False)``
    samples a position normalised by the item's shape (``(p + 1) * size / 2 - 0.5``), adds
    the sample to the position and clamps it to [-1, 1]. A step is a pure function of the
    position, so a point back at its state of two steps before cycles with period 1 or 2
    from then on: its end is known exactly without more steps (checked every
    :data:`RETIRE_EVERY` steps).
    """
    shape = window.shape
    state = [_start(p, n) for p, n in zip(points, shape, strict=True)]
    final = [s.copy() for s in state]
    active = np.arange(len(points[0]))
    # Per active point and axis, the lowest and highest first corner its reads may have:
    # within max_travel of its start, and inside the window (or one pixel past the item).
    limits = [
        (np.maximum(p - max_travel, low), np.minimum(p + max_travel, high) - 1)
        for p, low, high in zip(points, window.low, window.high, strict=True)
    ]
    saved: list[list[np.ndarray]] = []
    for t in range(niter):
        state = _step(window, state, active, limits, points)
        left = niter - 1 - t  # steps still to go after this one
        if t % RETIRE_EVERY in (RETIRE_EVERY - 3, RETIRE_EVERY - 2):
            saved.append([s.copy() for s in state])
        elif t % RETIRE_EVERY == RETIRE_EVERY - 1:
            keep = _retire(state, saved, active, final, left)
            if keep is not None:
                state, active = [s[keep] for s in state], active[keep]
                limits = [(lo[keep], hi[keep]) for lo, hi in limits]
            saved = []
    for k in range(len(shape)):
        final[k][active] = state[k]
    return tuple(_end(f, size) for f, size in zip(final, shape, strict=True))


def _retire(
    state: list[np.ndarray],
    saved: list[list[np.ndarray]],
    active: np.ndarray,
    final: list[np.ndarray],
    left: int,
) -> np.ndarray | None:
    """Retire the points whose state equals their state two steps before (``saved`` holds
    the two states before this one): the end is this state when ``left`` is even, else the
    state before. Returns which active points stay (``None``: all)."""
    two_back, one_back = saved
    same = np.ones(len(active), dtype=bool)
    for now, before in zip(state, two_back, strict=True):
        same &= now == before
    if not same.any():
        return None
    end = state if left % 2 == 0 else one_back
    done = active[same]
    for k in range(len(state)):
        final[k][done] = end[k][same]
    return ~same


def _step(
    window: _Window,
    state: list[np.ndarray],
    active: np.ndarray,
    limits: list[tuple[np.ndarray, np.ndarray]],
    points: tuple[np.ndarray, ...],
) -> list[np.ndarray]:
    """One Euler step of the active points: sample, add, clamp to [-1, 1]."""
    if len(state) == 2:
        lows, weights, order = _bilinear(state, window.shape)
    else:
        lows, weights, order = _trilinear(state, window.shape)
    base = np.zeros(len(active), dtype=np.int64)
    for axis, index in enumerate(lows):
        _check_travel(index, active, limits[axis], axis, points)
        base += (index - window.origin[axis]) * window.strides[axis]
    corners = [
        sum(c * st for c, st in zip(corner, window.strides, strict=True)) for corner in order
    ]
    reads = [base + corner for corner in corners]
    moved = []
    for k, image in enumerate(window.images):
        if len(state) == 2:  # a product, then fused multiply-adds (AVX2/AVX-512 kernel)
            value = image.take(reads[0]) * weights[0]
            for read, weight in zip(reads[1:], weights[1:], strict=True):
                value = _fma(image.take(read), weight, value)
        else:  # plain float32 sums in torch's corner order (its scalar 3-D kernel)
            value = np.zeros(len(active), dtype=np.float32)
            for read, weight in zip(reads, weights, strict=True):
                value = value + image.take(read) * weight
        moved.append(np.clip(state[k] + value, np.float32(-1), np.float32(1)))
    return moved


Weights = tuple[list[np.ndarray], list[Any], list[tuple[int, ...]]]


def _bilinear(state: list[np.ndarray], shape: tuple[int, ...]) -> Weights:
    """torch's vectorised 2-D kernel: ``(g + 1) * (size / 2) - 0.5`` fused, weights as
    products of the distances ``1 - w`` and ``w``; corners nw, ne, sw, se."""
    f32 = np.float32
    y = _fma(state[0] + f32(1), f32(shape[0]) / f32(2), f32(-0.5))
    x = _fma(state[1] + f32(1), f32(shape[1]) / f32(2), f32(-0.5))
    y0, x0 = np.floor(y), np.floor(x)
    n, w = y - y0, x - x0
    s, e = f32(1) - n, f32(1) - w
    weights = [s * e, s * w, n * e, n * w]
    lows = [y0.astype(np.int64), x0.astype(np.int64)]
    return lows, weights, [(0, 0), (0, 1), (1, 0), (1, 1)]


def _trilinear(state: list[np.ndarray], shape: tuple[int, ...]) -> Weights:
    """torch's 3-D CPU kernel: ``((g + 1) * size - 1) / 2``, weights as products (x, y, z
    in that order) of the distances to the far and near corner planes."""
    f32 = np.float32
    coords = [((g + f32(1)) * f32(n) - f32(1)) / f32(2) for g, n in zip(state, shape, strict=True)]
    near = [np.floor(c) for c in coords]
    far = [(lo + f32(1)) - c for lo, c in zip(near, coords, strict=True)]
    past = [c - lo for lo, c in zip(near, coords, strict=True)]
    order: list[tuple[int, ...]] = [(z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    weights = []
    for dz, dy, dx in order:
        wx = past[2] if dx else far[2]
        wy = past[1] if dy else far[1]
        wz = past[0] if dz else far[0]
        weights.append(wx * wy * wz)
    return [lo.astype(np.int64) for lo in near], weights, order


def _check_travel(
    index: np.ndarray,
    active: np.ndarray,
    limits: tuple[np.ndarray, np.ndarray],
    axis: int,
    points: tuple[np.ndarray, ...],
) -> None:
    """Refuse a point that reads a flow farther than ``max_travel`` from its start (the
    halo would not hold it) or outside the block's window (which the halo rules out)."""
    bad = (index < limits[0]) | (index > limits[1])
    if bad.any():
        first = active[np.flatnonzero(bad)[0]]
        where = tuple(int(p[first]) for p in points)
        raise ValueError(
            f"flow_dynamics: the path of the pixel at {where} reaches more than "
            f"`max_travel` pixels from it along axis {axis}; raise `max_travel` (the halo)"
        )


# --- histogram, seeds, masks ----------------------------------------------------------------


def seed_map(counts: np.ndarray, valid: np.ndarray, flat_origin: Any) -> np.ndarray:
    """For each bin, the rank key of the strongest grown seed covering it (0: none).

    ``counts`` is the histogram of end points over the window; ``valid`` marks the bins
    where it is complete and seeds may be taken. A key is ``count * N + item index`` with
    ``flat_origin(local flat indices) -> item flat indices`` and ``N`` the item's size, so
    a larger key is a later seed in Cellpose's ascending sort (ties in scan order).
    """
    peaks = ndi.maximum_filter(counts, size=SEED_POOL, mode="constant", cval=0)
    seeds = np.flatnonzero(((counts == peaks) & (counts > SEED_COUNT) & valid).ravel())
    keys = np.zeros(counts.size, dtype=np.int64)
    if not len(seeds):
        return keys.reshape(counts.shape)
    item_index, size = flat_origin(seeds)
    rank = counts.ravel()[seeds].astype(np.int64) * size + item_index
    grown, pixels = _grow(counts, seeds)
    np.maximum.at(keys, pixels, rank[grown])
    return keys.reshape(counts.shape)


def _grow(counts: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seed regions: GROW_STEPS 3^ndim dilations of each seed through bins with more than
    GROW_COUNT end points, within its (2 * GROW_STEPS + 1)^ndim window. Returns, per grown
    pixel, the seed's number and the pixel's flat index in ``counts``."""
    r, ndim = GROW_STEPS, counts.ndim
    padded = np.pad(counts, r)
    where = np.unravel_index(seeds, counts.shape)
    offsets = np.arange(-r, r + 1)
    index = []
    for axis, coord in enumerate(where):
        shape = [1] * (ndim + 1)
        shape[axis + 1] = 2 * r + 1
        index.append(coord.reshape(-1, *[1] * ndim) + r + offsets.reshape(shape))
    passable = padded[tuple(index)] > GROW_COUNT
    region = np.zeros_like(passable)
    region[(slice(None), *[r] * ndim)] = True
    for _ in range(GROW_STEPS):
        region = _dilate3(region) & passable
    number, *steps = np.nonzero(region)
    pixel = tuple(c[number] + d - r for c, d in zip(where, steps, strict=True))
    return number, np.ravel_multi_index(pixel, counts.shape)


def _dilate3(region: np.ndarray) -> np.ndarray:
    """3^ndim dilation of each seed's window (every axis but the first), not beyond it."""
    out = region
    for axis in range(1, region.ndim):
        grown = out.copy()
        lead = [slice(None)] * region.ndim
        lag = [slice(None)] * region.ndim
        lead[axis], lag[axis] = slice(1, None), slice(None, -1)
        grown[tuple(lead)] |= out[tuple(lag)]
        grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def compute_masks_block(
    image: np.ndarray, params: FlowDynamicsParams, ctx: OpContext
) -> np.ndarray:
    """Each pixel's mask, named ``1 +`` its seed's item flat index (0: no mask), before
    the size rules; see the module docstring. ``image`` is ``(dY, dX, cellprob)``."""
    if not ctx.box or not ctx.shape:
        raise ValueError("flow_dynamics needs the block's position in the item")
    shape, box = ctx.shape, ctx.box
    if any(n < 2 for n in shape):
        raise ValueError(f"flow_dynamics needs at least 2 pixels along every axis, got {shape}")
    ndim = len(shape)
    mask = image[ndim] > params.cellprob_threshold
    window = _Window(_normalised(image[:ndim], mask, shape), box, shape)
    reach = params.max_travel
    follow = _inner(box, shape, reach + 2)  # every point that may end near the core's ends
    local = np.nonzero(mask[follow])
    starts = tuple(i + f.start + b.start for i, f, b in zip(local, follow, box, strict=True))
    ends = follow_flows(window, starts, params.niter, reach)
    window_shape = mask.shape
    counts = np.zeros(window_shape, dtype=np.int64)
    rel = tuple(e - b.start for e, b in zip(ends, box, strict=True))
    np.add.at(counts, rel, 1)
    valid = np.zeros(window_shape, dtype=bool)
    valid[_inner(box, shape, 2 * reach + 7)] = True  # seeds whose growth is complete
    size = int(np.prod(shape))

    def item_index(flat: np.ndarray) -> tuple[np.ndarray, int]:
        local_index = np.unravel_index(flat, window_shape)
        item = tuple(i + b.start for i, b in zip(local_index, box, strict=True))
        return np.ravel_multi_index(item, shape), size

    keys = seed_map(counts, valid, item_index)
    labels = np.zeros(window_shape, dtype=np.int64)
    seed_key = keys[rel]  # only the core's are complete; the engine keeps the core
    seed_index = np.where(seed_key > 0, seed_key % size + 1, 0)
    labels[tuple(s - b.start for s, b in zip(starts, box, strict=True))] = seed_index
    if params.checks_flows:  # the flow check needs the network's flows beside the masks
        return np.concatenate([labels[np.newaxis], image[:ndim]]).astype(np.float64)
    return labels[np.newaxis]


def _inner(box: Box, shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    """The part of the window (block-relative) at least ``margin`` pixels inside its edges
    that lie inside the item (the item's own borders need no margin)."""
    out = []
    for s, n in zip(box, shape, strict=True):
        lo = margin if s.start > 0 else 0
        hi = (s.stop - s.start) - (margin if s.stop < n else 0)
        out.append(slice(lo, max(hi, lo)))
    return tuple(out)


# --- registration ---------------------------------------------------------------------------


def _sizes_rule(params: FlowSizesParams, ctx: OpContext) -> ObjectRule:
    """Cellpose's two size rules, on whole masks (every pixel with the same seed). The
    item's size travels as a feature: the rule is also built where the item is unknown."""
    fraction, small = params.max_size_fraction, params.min_size

    def keep(features: np.ndarray) -> np.ndarray:
        sizes = features[:, 0]
        kept = sizes <= features[:, 1] * fraction
        return kept & (sizes >= small) if small > 0 else kept

    def measure(
        source: np.ndarray, labels: np.ndarray, n: int, box: Box, shape: tuple[int, ...]
    ) -> np.ndarray:
        item = np.full(n + 1, float(np.prod(shape)))
        return np.stack([_counts(labels, n), item], axis=1)

    return ObjectRule(
        columns=("size", "item_size"),
        reduce=("sum", "max"),
        measure=measure,
        keep=keep,
        ids=_local_ids,
    )


def _parts(params: FlowDynamicsParams) -> list[tuple[str, str, OpParams]]:
    sizes = FlowSizesParams(min_size=params.min_size, max_size_fraction=params.max_size_fraction)
    parts: list[tuple[str, str, OpParams]] = [("masks", "_flow_masks", params)]
    if params.checks_flows:
        assert params.flow_threshold is not None
        check = FlowCheckParams(
            flow_threshold=params.flow_threshold,
            max_travel=params.max_travel,
            max_size_fraction=params.max_size_fraction,
        )
        parts.append(("check", "_flow_check", check))
    return [*parts, ("sizes", "_flow_sizes", sizes)]


def _check_flow_channels(params: FlowDynamicsParams, channels: int, ndim: int) -> str | None:
    if channels != ndim + 1:
        names = "dZ, dY, dX, cellprob" if ndim == 3 else "dY, dX, cellprob"
        return f"flow_dynamics needs {ndim + 1} channels ({names}) in {ndim}-D, got {channels}"
    if params.checks_flows and ndim != 2:
        return (
            f"`flow_threshold` ({params.flow_threshold}) works on 2-D items only (Cellpose "
            "skips its flow check in 3-D); use 0 or None"
        )
    return None


def _masks_channels(params: FlowDynamicsParams, channels: int) -> int:
    """One (the masks), or the masks and the flows the flow check compares them with."""
    return channels if params.checks_flows else 1


def _masks_dtype(params: FlowDynamicsParams, dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64 if params.checks_flows else np.int64)


register(
    Operation(
        name="flow_dynamics",
        kind="local",
        params=FlowDynamicsParams,
        apply=compute_masks_block,
        summary="Cellpose flows (dY, dX, cellprob) to instance labels: follow the flows "
        "niter steps, seeds at the end-point histogram's peaks, masks by seed, sizes "
        "(min_size, max_size_fraction) over the whole item, Cellpose's flow-error check "
        "(flow_threshold, 2-D) on whole masks; equals cellpose's compute_masks with "
        "min_size <= 0 (no hole filling); 2-D (dY, dX, cellprob) and 3-D (dZ, dY, dX, "
        "cellprob)",
        halo=flow_halo,
        halo_rule="3 * max_travel + 12, with flow_threshold 4 * (max_travel + 7) + 1 more "
        "(paths longer than max_travel stop the item)",
        out_channels=lambda p, channels: 1,
        out_dtype=lambda p, dtype: np.dtype(np.int64),
        check_layout=_check_flow_channels,
        expand=_parts,
    )
)
register(
    Operation(
        name="_flow_masks",
        kind="local",
        params=FlowDynamicsParams,
        apply=compute_masks_block,
        summary="flow_dynamics: each pixel's mask named by its seed's item position",
        halo=flow_halo,
        out_channels=_masks_channels,
        out_dtype=_masks_dtype,
        check_layout=_check_flow_channels,
    )
)
register(
    Operation(
        name="_flow_sizes",
        kind="connectivity",
        params=FlowSizesParams,
        apply=_label_ids,
        rule=_sizes_rule,
        summary="flow_dynamics: Cellpose's size rules on whole masks, consecutive ids",
        out_dtype=lambda p, dtype: np.dtype(np.uint32),
        needs_single_channel=True,
        by_class=lambda p: True,
    )
)

"""Cellpose's flow-error quality check (``flow_threshold``), exact on any block layout.

Cellpose 4 (``cellpose.dynamics.remove_bad_flow_masks``) recomputes flows from the masks of
``compute_masks`` and removes every mask whose flows disagree with the network's: per mask,
heat is diffused from its centre pixel inside the mask (``masks_to_flows``), the flow of a
pixel is the normalised central difference of the heat around it, and the mask's error is
the mean over its pixels of ``|flow - network flow / 5|^2``; masks with an error above the
threshold go. The same arithmetic here:

- the centre of a mask is the pixel nearest its mean position (rounded half to even in
  coordinates relative to its bounding box; ties to the first pixel in scan order);
- ``n_iter`` Jacobi steps ``T[centre] += 1; T = sum(T of the 9 neighbours in the same
  mask) / 9`` (float64; float32 for items over 4e7 pixels, as Cellpose's torch code), with
  ``n_iter = 2 * max(height + width + 2)`` over *every* mask of the item;
- the central differences read the heat of whatever lies next to a pixel, a touching
  mask's included (0 on the background).

Blockwise. ``n_iter`` is a statistic of the whole item: each block reports the size and
bounding box of the masks in its core, merged by mask id (ids are the seeds' item positions,
:mod:`segflow.ops.flows`). A mask lies within :func:`mask_reach` pixels of its seed (checked:
a mask reaching farther stops the item with an error), so a block that reads
``4 * reach + 1`` pixels around its core holds every mask touching its core whole, and
every mask touching those: it computes each such mask's error with the same pixels in the
same order as the whole item, and every block decides a mask the same way.

Masks of more than ``max_size_fraction`` of the item are removed before the check (they do
not count for ``n_iter`` and lend no heat), ``min_size`` after it, as in ``compute_masks``.
The network's flows are taken in float32, as model steps give them. Cellpose skips the
check in 3-D; so does segflow (refused there).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from segflow.ops.registry import Done, OpContext, Operation, OpParams, register

#: Cellpose's rule for the heat's dtype: float32 above this many pixels (the padded item).
FLOAT32_ABOVE = 4e7
#: The 9 neighbours in the order of Cellpose's masks_to_flows (centre, up, down, left,
#: right, then the diagonals): its sums add them in this order.
NEIGHBOURS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


class FlowCheckParams(OpParams):
    flow_threshold: float = Field(gt=0, description="remove masks whose flow error is above")
    max_travel: int = Field(48, ge=1)
    max_size_fraction: float = Field(0.4, gt=0)


def mask_reach(max_travel: int) -> int:
    """How far (pixels, along any axis) a mask's pixel may lie from its seed: its path
    (``max_travel``, one more for the truncated end) plus the seed's grown region."""
    from segflow.ops.flows import GROW_STEPS

    return max_travel + 2 + GROW_STEPS


def check_halo(params: FlowCheckParams, ndim: int) -> tuple[int, ...]:
    """Every mask touching the core (within ``2 * reach``) and every mask touching one of
    those (``2 * reach + 1`` further)."""
    return (4 * mask_reach(params.max_travel) + 1,) * ndim


# --- n_iter: a statistic of the whole item --------------------------------------------------


@dataclass(frozen=True)
class DiffusionSteps:
    """``n_iter`` of Cellpose's ``masks_to_flows``: twice the largest ``height + width + 2``
    of the masks (big masks left out). A partial is ``(item size, table)`` with one row per
    mask id: ``id, pixels, (low, high) per axis``."""

    max_size_fraction: float
    positional = True

    def start(self) -> None:
        return None

    def map(
        self,
        core: np.ndarray,
        state: Any,
        *,
        box: tuple[slice, ...] = (),
        shape: tuple[int, ...] = (),
    ) -> Any:
        from scipy import ndimage as ndi

        ids = core[0].astype(np.int64)
        values, inverse = np.unique(ids, return_inverse=True)
        dense = inverse.reshape(ids.shape) + (0 if values[0] == 0 else 1)
        values = values[values != 0]
        table = np.zeros((len(values), 2 + 2 * ids.ndim), dtype=np.int64)
        table[:, 0] = values
        table[:, 1] = np.bincount(dense.ravel(), minlength=len(values) + 1)[1:]
        for k, where in enumerate(ndi.find_objects(dense)):
            assert where is not None
            for axis, (s, b) in enumerate(zip(where, box, strict=True)):
                table[k, 2 + 2 * axis] = s.start + b.start
                table[k, 3 + 2 * axis] = s.stop + b.start
        return int(np.prod(shape)), table

    def merge(self, partials: Sequence[tuple[int, np.ndarray]], state: Any) -> tuple[int, Any]:
        tables = [t for _, t in partials]
        size = partials[0][0]
        table = np.concatenate(tables)
        ids, inverse = np.unique(table[:, 0], return_inverse=True)
        merged = np.zeros((len(ids), table.shape[1]), dtype=np.int64)
        merged[:, 0] = ids
        np.add.at(merged[:, 1], inverse, table[:, 1])
        merged[:, 2::2] = np.iinfo(np.int64).max
        np.minimum.at(merged[:, 2::2], inverse, table[:, 2::2])
        np.maximum.at(merged[:, 3::2], inverse, table[:, 3::2])
        return size, merged

    def combine(self, partials: Sequence[tuple[int, np.ndarray]], state: Any) -> Done:
        size, table = self.merge(partials, state)
        kept = table[table[:, 1] <= size * self.max_size_fraction]
        if not len(kept):
            return Done(0)
        extents = (kept[:, 3::2] - kept[:, 2::2]).sum(axis=1) + 2
        return Done(int(2 * extents.max()))


# --- the check on a block -------------------------------------------------------------------


def remove_bad_flows_block(
    image: np.ndarray, params: FlowCheckParams, ctx: OpContext
) -> np.ndarray:
    """The masks (channel 0 of ``(ids, dY, dX)``) with those of too large a flow error, and
    the big ones, set to 0; exact on the part of the window ``check_halo`` inside it."""
    from segflow.ops.flows import _inner

    box, shape = ctx.box, ctx.shape
    ids = image[0].astype(np.int64)
    _check_reach(ids, box, shape, mask_reach(params.max_travel))
    values, counts = np.unique(ids, return_counts=True)
    big = values[(values != 0) & (counts > np.prod(shape) * params.max_size_fraction)]
    ids[np.isin(ids, big)] = 0
    decide = np.unique(ids[_inner(box, shape, check_halo(params, len(shape))[0])])
    decide = decide[decide != 0]
    if len(decide):
        dtype = np.float32 if np.prod([n + 2 for n in shape]) > FLOAT32_ABOVE else np.float64
        flows = image[1:].astype(np.float32)
        errors = flow_errors(ids, flows, decide, int(ctx.stat), dtype)
        ids[np.isin(ids, decide[errors > params.flow_threshold])] = 0
    return ids[np.newaxis]


def _check_reach(
    ids: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], reach: int
) -> None:
    """Refuse a mask with a pixel farther than ``reach`` from its seed (the halo assumes
    none is)."""
    where = np.nonzero(ids)
    if not len(where[0]):
        return
    seeds = np.unravel_index(ids[where] - 1, shape)
    far = np.zeros(len(where[0]), dtype=bool)
    for axis, (w, b) in enumerate(zip(where, box, strict=True)):
        far |= np.abs(w + b.start - seeds[axis]) > reach
    if far.any():
        i = int(np.flatnonzero(far)[0])
        pixel = tuple(int(w[i] + b.start) for w, b in zip(where, box, strict=True))
        seed = tuple(int(s[i]) for s in seeds)
        raise ValueError(
            f"flow_dynamics: the mask of the seed at {seed} reaches the pixel at {pixel}, "
            f"more than {reach} pixels away (max_travel + 7); raise `max_travel` (the halo)"
        )


def flow_errors(
    ids: np.ndarray, flows: np.ndarray, decide: np.ndarray, n_iter: int, dtype: Any
) -> np.ndarray:
    """Cellpose's flow error of each mask in ``decide`` (sorted ids, whole in ``ids``, as
    are the masks touching them); ``flows`` are the network's ``(dY, dX)``."""
    padded = np.pad(ids, 1)
    flat = padded.ravel()
    width = padded.shape[1]
    offsets = np.array([dy * width + dx for dy, dx in NEIGHBOURS])
    inside = np.flatnonzero(np.isin(flat, decide))
    touching = flat[inside[:, np.newaxis] + offsets[1:5]]
    need = np.union1d(decide, touching[touching != 0])
    pixels = np.flatnonzero(np.isin(flat, need))  # scan order
    heat = diffuse(flat, pixels, _centres(flat, pixels, width), offsets, n_iter, dtype)
    # The normalised central differences, then the squared error against flows / 5.
    dy = (heat[inside + width] - heat[inside - width]).astype(np.float64)
    dx = (heat[inside + 1] - heat[inside - 1]).astype(np.float64)
    mu = np.stack([dy, dx])
    mu /= 1e-60 + (mu**2).sum(axis=0) ** 0.5
    y, x = np.divmod(inside, width)
    network = flows[:, y - 1, x - 1] / 5.0
    error = ((mu - network) ** 2).sum(axis=0)
    owner = np.searchsorted(decide, flat[inside])
    order = np.argsort(owner, kind="stable")  # each mask's pixels in scan order
    bounds = np.searchsorted(owner[order], np.arange(len(decide) + 1))
    return np.array([error[order[a:b]].mean() for a, b in itertools.pairwise(bounds)])


def _centres(flat: np.ndarray, pixels: np.ndarray, width: int) -> np.ndarray:
    """Flat index of each mask's centre (masks in id order): Cellpose's ``center_of_mass``,
    the mean position rounded in bounding-box coordinates, else the nearest pixel."""
    owners, k = np.unique(flat[pixels], return_inverse=True)
    y, x = np.divmod(pixels, width)
    count = np.bincount(k)
    centre = []
    for coord in (y, x):
        low = np.full(len(owners), np.iinfo(np.int64).max)
        np.minimum.at(low, k, coord)
        total = np.zeros(len(owners), dtype=np.int64)
        np.add.at(total, k, coord - low[k])
        centre.append(np.round(total / count).astype(np.int64) + low)
    cy, cx = centre
    at = cy * width + cx
    inside = flat[at] == owners
    if not inside.all():  # the nearest pixel, first in scan order among equals
        far = np.flatnonzero(~inside[k])
        d2 = (x[far] - cx[k[far]]) ** 2 + (y[far] - cy[k[far]]) ** 2
        order = np.lexsort((d2, k[far]))
        first = np.unique(k[far][order], return_index=True)
        at[first[0]] = pixels[far[order[first[1]]]]
    return at


def diffuse(
    flat: np.ndarray,
    pixels: np.ndarray,
    centres: np.ndarray,
    offsets: np.ndarray,
    n_iter: int,
    dtype: Any,
) -> np.ndarray:
    """Cellpose's heat: ``n_iter`` times, 1 more at each centre, then every pixel the sum
    (in :data:`NEIGHBOURS` order) of its neighbours in the same mask over 9."""
    heat = np.zeros(len(flat), dtype=dtype)
    around = pixels[np.newaxis, :] + offsets[:, np.newaxis]
    same = flat[around] == flat[pixels]
    for _ in range(n_iter):
        heat[centres] += 1
        heat[pixels] = (heat[around] * same).sum(axis=0) / 9
    return heat


register(
    Operation(
        name="_flow_check",
        kind="global",
        params=FlowCheckParams,
        apply=remove_bad_flows_block,
        summary="flow_dynamics: Cellpose's flow-error check (flow_threshold) on whole masks",
        statistic=lambda p: DiffusionSteps(p.max_size_fraction),
        halo=check_halo,
        halo_rule="4 * (max_travel + 7) + 1",
        out_channels=lambda p, channels: 1,
        out_dtype=lambda p, dtype: np.dtype(np.int64),
        ndims=(2,),
    )
)

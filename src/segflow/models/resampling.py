"""Resampling to a model's pixel size and back, on one global grid, block by block.

nnU-Net resamples every image to its plans' spacing before the network and the network's
logits back to the image's grid after it (``resample_data_or_seg_to_shape``). This module
does the same arithmetic so that any part of the result can be computed on its own:

* the model's grid has ``round(n * spacing / target)`` pixels per axis
  (nnU-Net's ``compute_new_shape``; at least 1); no resampling at all when that is the
  item's shape;
* pixel ``m`` of a grid of ``n_to`` pixels sits at ``(m + 0.5) * n_from / n_to - 0.5`` of the
  grid of ``n_from`` it is read from (``scipy.ndimage.zoom`` with ``grid_mode=True``, what
  ``skimage.transform.resize`` calls): the two grids share the item's outer corners, so the
  scale factor and the origin are global and a block computes only the pixels it needs;
* the interpolation is a tensor-product B-spline, one axis after the other, of order 3 for
  images and 1 for logits (nnU-Net's defaults), ``edge`` (``nearest``) beyond the item, and
  order ``order_z`` (0) along the one out-of-plane axis of an anisotropic spacing (max / min
  above 3: nnU-Net's ``separate_z``);
* order 3 needs spline coefficients, an infinite (recursive) filter: as ``scipy.ndimage``
  does, the line is padded by 12 pixels of its edge value and filtered with ``mode='nearest'``.
  A block filters its input plus :data:`PREFILTER_HALO` pixels of the item on each side;
  a coefficient depends on a pixel ``d`` away by ``|sqrt(3) - 2| ** d``, so what the block
  leaves out changes its values by less than 1e-13 of the image's range.

``skimage.transform.resize`` (nnU-Net's) clips its output to the range of its input (the
whole volume, or each slice when z is resampled separately). This module clips to nothing;
the model step clips to the channel's bounds where the card gives them (nnU-Net's CT
window) and, with the card's ``resampling.clip_to_input`` (nnU-Net results folders), to
the scaled input's range, each channel's or each slice's, found with the item's non-zero
box before the block pass (:mod:`segflow.ops.model_nonzero`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Item pixels a block filters beyond what its spline taps read (see the module docstring).
PREFILTER_HALO = 24
#: Edge pixels ``scipy.ndimage`` pads before its spline filter (``_prepad_for_spline_filter``).
SCIPY_PAD = 12
#: nnU-Net's ``ANISO_THRESHOLD``: a spacing this anisotropic is resampled in-plane first.
ANISOTROPY = 3.0

Box = tuple[slice, ...]


def new_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """The model grid's shape: ``round(n * spacing / target)`` per axis (at least 1).

    Examples
    --------
    >>> new_shape((40, 100, 100), (5.0, 0.8, 0.8), (2.5, 1.5, 1.5))
    (80, 53, 53)
    """
    return tuple(
        max(1, round(float(s) / float(t) * n))
        for n, s, t in zip(shape, spacing, target, strict=True)
    )


def separate_axis(
    current: Sequence[float], new: Sequence[float], force: bool | None = None
) -> int | None:
    """The axis resampled on its own (nnU-Net's ``determine_do_sep_z_and_axis``): the one
    coarsest axis of an anisotropic spacing, the current one's before the new one's."""
    if force is False:
        return None
    candidates = [current] if force else [current, new]
    for spacing in candidates:
        values = np.asarray(spacing, dtype=float)
        if force or values.max() / values.min() > ANISOTROPY:
            axes = np.flatnonzero(values.max() / values == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


@dataclass(frozen=True)
class ResampleGrid:
    """The item's grid and the model's, with the spline order per axis each way."""

    item: tuple[int, ...]
    model: tuple[int, ...]
    forward: tuple[int, ...]  # orders from the item to the model's grid
    back: tuple[int, ...]  # orders from the model's grid to the item


def plan_resampling(
    shape: Sequence[int],
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    order: int = 3,
    order_back: int = 1,
    order_z: int = 0,
    order_z_back: int = 0,
    separate_z: bool | None = None,
) -> ResampleGrid | None:
    """The two grids of an item of ``shape`` at ``spacing`` run at ``target``; ``None``
    when the model's grid is the item's (nnU-Net does not resample then either).

    Examples
    --------
    >>> plan_resampling((40, 100, 100), (5.0, 0.8, 0.8), (2.5, 1.5, 1.5))
    ResampleGrid(item=(40, 100, 100), model=(80, 53, 53), forward=(0, 3, 3), back=(0, 1, 1))
    """
    item = tuple(int(n) for n in shape)
    model = new_shape(item, spacing, target)
    if model == item:
        return None
    ahead = separate_axis(spacing, target, separate_z)
    behind = separate_axis(target, spacing, separate_z)
    forward = tuple(order_z if a == ahead else order for a in range(len(item)))
    back = tuple(order_z_back if a == behind else order_back for a in range(len(item)))
    return ResampleGrid(item, model, forward, back)


def positions(start: int, stop: int, n_from: int, n_to: int) -> np.ndarray:
    """Where pixels ``start .. stop - 1`` of a grid of ``n_to`` lie on one of ``n_from``."""
    return (np.arange(start, stop, dtype=np.float64) + 0.5) * (n_from / n_to) - 0.5


def source_range(start: int, stop: int, n_from: int, n_to: int, order: int) -> tuple[int, int]:
    """The pixels of the ``n_from`` grid that pixels ``start .. stop - 1`` of the ``n_to``
    grid read (spline taps, and the filter's margin for order 2 and above), clipped."""
    first = float(positions(start, start + 1, n_from, n_to)[0])
    last = float(positions(stop - 1, stop, n_from, n_to)[0])
    if order == 0:
        low, high = math.floor(first + 0.5), math.floor(last + 0.5)
    elif order == 1:
        low, high = math.floor(first), math.floor(last) + 1
    else:
        low = math.floor(first) - 1 - PREFILTER_HALO
        high = math.floor(last) + 2 + PREFILTER_HALO
    low = max(0, min(low, n_from - 1))
    return low, max(low + 1, min(n_from, high + 1))


def read_box(region: Box, n_from: Sequence[int], n_to: Sequence[int],
             orders: Sequence[int]) -> Box:  # fmt: skip
    """The box of the ``n_from`` grid that ``region`` of the ``n_to`` grid reads."""
    return tuple(
        slice(*source_range(r.start, r.stop, n, m, order))
        for r, n, m, order in zip(region, n_from, n_to, orders, strict=True)
    )


def _taps(x: np.ndarray, order: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The first tap's index and the weights of the ``order + 1`` taps at ``x``."""
    if order == 0:
        return np.floor(x + 0.5).astype(np.intp), [np.ones_like(x)]
    first = np.floor(x).astype(np.intp)
    t = x - first
    if order == 1:
        return first, [1.0 - t, t]
    if order == 3:
        weights = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6,
                   (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]  # fmt: skip
        return first - 1, weights
    raise ValueError(f"spline `order` ({order}) must be 0, 1 or 3")


def resample_axis(
    data: np.ndarray, axis: int, offset: int, n_from: int, n_to: int, region: slice, order: int
) -> np.ndarray:
    """Pixels ``region`` of the ``n_to`` grid along ``axis`` of ``data``, which holds pixels
    ``offset ..`` of the ``n_from`` grid (every pixel :func:`source_range` names), float64."""
    x = positions(region.start, region.stop, n_from, n_to) - offset
    data = np.asarray(data, dtype=np.float64)
    if order > 1:
        pad = [(0, 0)] * data.ndim
        pad[axis] = (SCIPY_PAD, SCIPY_PAD)
        data = ndi.spline_filter1d(
            np.pad(data, pad, mode="edge"), order, axis=axis, mode="nearest",
            output=np.float64,
        )  # fmt: skip
        x = x + SCIPY_PAD
    first, weights = _taps(x, order)
    shape = [1] * data.ndim
    shape[axis] = len(x)
    out = np.zeros((*data.shape[:axis], len(x), *data.shape[axis + 1 :]), dtype=np.float64)
    for k, weight in enumerate(weights):
        index = np.clip(first + k, 0, data.shape[axis] - 1)
        out += np.take(data, index, axis=axis) * weight.reshape(shape)
    return out


def resample_region(
    data: np.ndarray,
    box: Box,
    n_from: Sequence[int],
    n_to: Sequence[int],
    region: Box,
    orders: Sequence[int],
) -> np.ndarray:
    """``region`` of the ``n_to`` grid from ``data`` ``(c, *box)`` on the ``n_from`` grid,
    axis by axis; ``box`` must hold every pixel :func:`source_range` names for ``region``.

    Examples
    --------
    >>> data = np.arange(8.0).reshape(1, 8)
    >>> resample_region(data, (slice(0, 8),), (8,), (4,), (slice(1, 3),), (1,))
    array([[2.5, 4.5]])
    """
    out = np.asarray(data)
    for axis, (b, n, m, r, order) in enumerate(zip(box, n_from, n_to, region, orders, strict=True)):
        low, high = source_range(r.start, r.stop, n, m, order)
        if low < b.start or high > b.stop:
            raise ValueError(
                f"resampling axis {axis}: pixels {r.start}..{r.stop} of {m} read {low}..{high} "
                f"of {n}, the data holds {b.start}..{b.stop}"
            )
        out = resample_axis(out, axis + 1, b.start, n, m, r, order)
    return out


def halo(
    tile: Sequence[int],
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    prefilter: bool = True,
) -> tuple[int, ...]:
    """Item pixels a block needs beyond its core to resample, run the tiles and resample
    back: ``tile * f`` plus the spline's reach, ``f`` the item pixels per model pixel
    (without ``prefilter``, where no order is above 1, no spline coefficients are filtered).

    A core pixel reads model pixels ``tile - 1`` away through the tiles, which read item
    pixels ``tile * f`` away (the taps of both resamplings included, up to 2 pixels), and the
    prefilter :data:`PREFILTER_HALO` more. ``f`` is ``target / spacing`` up to the rounding of
    the model grid's shape ``m``: at most ``m / (m - 0.5)`` times that, and ``m >= tile`` on
    any item larger than the halo (a smaller one is read whole anyway), so
    ``tile / (tile - 0.5)`` bounds the factor. A block computes only what its core needs,
    whatever its halo.

    Examples
    --------
    >>> halo((8, 16, 16), (3.0, 0.8, 0.8), (2.0, 1.0, 1.0))
    (33, 48, 48)
    >>> halo((256, 256), (17.0, 17.0), (34.0, 34.0), prefilter=False)
    (517, 517)
    """
    reach = PREFILTER_HALO if prefilter else 0
    return tuple(
        math.ceil(t * (g / s) * t / (t - 0.5)) + reach + 3
        for t, s, g in zip(tile, spacing, target, strict=True)
    )

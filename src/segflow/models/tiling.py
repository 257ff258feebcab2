"""The global tile grid of sliding-window inference, its blending weights and its halo.

One grid per item, anchored at the item origin: along each axis the tile starts are spread
evenly from 0 to ``size - tile`` with a step of at most ``tile * (1 - overlap)`` (the rule of
nnU-Net v2), so the first tile starts at the origin and the last one ends flush with the item's
edge. An axis shorter than the tile has one tile, centred: the input is padded around the item
and the output cropped back. Because the grid depends on the item alone, never on the blocks,
every block that runs "the tiles overlapping my core" blends exactly the outputs a whole-item
sliding window would blend (see :mod:`segflow.models.inference`). Cellpose networks use
cellpose's own grid instead (:func:`cellpose_tile_starts`), which depends on the item alone
too.

Axes are spatial only, ordered ``(z), y, x``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Box = tuple[slice, ...]
BlendWindow = Literal["gaussian", "cosine", "constant", "gaussian_nnunet", "taper"]
#: Where the tiles go: ``even`` (segflow's, below) or ``cellpose`` (:func:`cellpose_tile_starts`).
TileRule = Literal["even", "cellpose"]

#: Smallest blending weight, relative to the window's peak. A pixel covered only by the corner of
#: one tile (an item corner, in 3-D) would otherwise get a weight near 1e-11: clamping keeps
#: ``sum(w*p) / sum(w)`` well conditioned in any precision (nnU-Net clamps at its smallest
#: non-zero value for the same reason).
MIN_WEIGHT = 1e-4

#: The Gaussian's sigma as a fraction of the tile side (nnU-Net's choice).
GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0


def tile_starts(size: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Tile start positions along one axis of ``size`` pixels.

    ``n = ceil((size - tile) / max_step) + 1`` tiles with ``max_step = floor(tile * (1 -
    overlap))`` (at least 1), spread evenly from 0 to ``size - tile``. An axis shorter than the
    tile gets one tile starting before the origin, so that the item sits in its middle.

    Examples
    --------
    >>> tile_starts(11, 4, 0.5)
    (0, 2, 4, 5, 7)
    >>> tile_starts(8, 4, 0.0)
    (0, 4)
    >>> tile_starts(3, 8, 0.5)
    (-2,)
    """
    if size <= tile:
        return (-((tile - size) // 2),)
    max_step = max(1, math.floor(tile * (1.0 - overlap)))
    n = math.ceil((size - tile) / max_step) + 1
    step = (size - tile) / (n - 1)
    return tuple(round(i * step) for i in range(n))


def cellpose_tile_starts(size: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Tile starts along one axis as cellpose 4 places them (``core.run_net``), item-relative.

    The axis is padded with zeros (``transforms.get_pad_yx``: to a multiple of 16 plus 8 on
    each side, or around the centre to one tile), then ``ceil((1 + 2 overlap) * padded /
    tile)`` tiles are spread from 0 to ``padded - tile``, truncated to integers
    (``transforms.make_tiles``, ``overlap`` being its ``tile_overlap``, clamped to 0.05..0.5).

    Examples
    --------
    >>> cellpose_tile_starts(100, 256, 0.1)
    (-78,)
    >>> cellpose_tile_starts(300, 256, 0.1)
    (-10, 54)
    """
    div = 16
    pad = div * math.ceil(size / div) - size if size >= tile else max(0, tile - size - div)
    before, padded = div // 2 + pad // 2, size + div + pad
    overlap = min(0.5, max(0.05, overlap))
    n = 1 if padded <= tile else math.ceil((1.0 + 2 * overlap) * padded / tile)
    return tuple(int(s) - before for s in np.linspace(0, padded - tile, n).astype(int))


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one item: ``starts[axis]`` are the tile starts along each spatial axis.

    Build it with :func:`plan_tiles`. Tiles are numbered in C order of their starts; every
    method that lists tiles keeps that order, so blending sums the same terms in the same order
    whatever region asks for them.

    Examples
    --------
    >>> grid = plan_tiles((10, 6), tile=(4, 4), overlap=0.5)
    >>> grid.starts
    ((0, 2, 4, 6), (0, 2))
    >>> grid.n_tiles
    8
    >>> grid.overlapping((slice(0, 2), slice(0, 6)))
    [(0, 0), (0, 2)]
    >>> grid.window((slice(4, 5), slice(0, 1)))
    (slice(2, 8, None), slice(0, 4, None))
    >>> grid.halo
    (3, 3)
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_tiles(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def all_tiles(self) -> Iterator[tuple[int, ...]]:
        """Every tile's start, in C order."""
        return itertools.product(*self.starts)

    def _axis_range(self, axis: int, start: int, stop: int) -> tuple[int, int]:
        """Indices ``[i, j)`` of the starts along ``axis`` whose tiles overlap ``[start, stop)``."""
        starts = np.asarray(self.starts[axis])
        first = int(np.searchsorted(starts + self.tile[axis], start, side="right"))
        last = int(np.searchsorted(starts, stop, side="left"))
        return first, last

    def overlapping(self, region: Box) -> list[tuple[int, ...]]:
        """Starts of the tiles that overlap ``region`` (a box of the item), in C order."""
        region = self._check_region(region)
        per_axis = []
        for axis, r in enumerate(region):
            first, last = self._axis_range(axis, r.start, r.stop)
            per_axis.append(self.starts[axis][first:last])
        return list(itertools.product(*per_axis))

    def window(self, region: Box) -> Box:
        """The input ``region`` needs: the union of its tiles, clipped to the item."""
        region = self._check_region(region)
        out = []
        for axis, r in enumerate(region):
            first, last = self._axis_range(axis, r.start, r.stop)
            lo = self.starts[axis][first]
            hi = self.starts[axis][last - 1] + self.tile[axis]
            out.append(slice(max(lo, 0), min(hi, self.shape[axis])))
        return tuple(out)

    @functools.cached_property
    def halo(self) -> tuple[int, ...]:
        """Per axis, the most input any block core needs beyond itself (either side).

        It is exact for this grid: some one-pixel core needs that much, and a block whose
        ``outer`` box is its core grown by this halo (clipped to the item) always contains
        :meth:`window` of its core. It is at most ``tile - 1``.
        """
        halos = []
        for axis, n in enumerate(self.shape):
            starts = np.asarray(self.starts[axis])
            tile = self.tile[axis]
            pixels = np.arange(n)
            first = starts[np.searchsorted(starts + tile, pixels, side="right")]
            last = starts[np.searchsorted(starts, pixels, side="right") - 1]
            before = pixels - np.maximum(first, 0)
            after = np.minimum(last + tile, n) - (pixels + 1)
            halos.append(int(max(before.max(), after.max())))
        return tuple(halos)

    def _check_region(self, region: Box) -> Box:
        if len(region) != self.ndim:
            raise ValueError(
                f"`region` has {len(region)} axes, the item has {self.ndim} spatial axes "
                f"{self.shape}"
            )
        out = []
        for r, n in zip(region, self.shape, strict=True):
            start, stop, step = r.indices(n)
            if step != 1 or start >= stop:
                raise ValueError(
                    f"`region` {region} must be non-empty boxes of step 1 inside the item "
                    f"{self.shape}"
                )
            out.append(slice(start, stop))
        return tuple(out)


def plan_tiles(
    shape: Sequence[int], *, tile: Sequence[int], overlap: float, rule: TileRule = "even"
) -> TileGrid:
    """The global tile grid of an item of spatial ``shape``.

    Parameters
    ----------
    shape : sequence of int
        The item's spatial shape, ``(z), y, x``.
    tile : sequence of int
        The tile shape, one side per axis (from the model card).
    overlap : float
        Fraction of a tile shared with its neighbour, in ``[0, 1)``: the step between tiles is
        at most ``tile * (1 - overlap)`` (``rule="cellpose"``: cellpose's ``tile_overlap``).
    rule : {'even', 'cellpose'}
        ``even``: :func:`tile_starts`; ``cellpose``: :func:`cellpose_tile_starts` (tiles
        may reach outside the item on both sides, where the input is padded with zeros).

    Returns
    -------
    TileGrid

    Examples
    --------
    >>> plan_tiles((300, 200), tile=(128, 128), overlap=0.5).starts
    ((0, 57, 115, 172), (0, 36, 72))
    """
    shape = tuple(int(n) for n in shape)
    tile = tuple(int(t) for t in tile)
    if len(tile) != len(shape):
        raise ValueError(
            f"`tile` {tile} has {len(tile)} axes, the item has {len(shape)} spatial axes {shape}"
        )
    if any(t < 1 for t in tile) or any(n < 1 for n in shape):
        raise ValueError(f"`tile` {tile} and `shape` {shape} must be positive on every axis")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"`overlap` ({overlap}) must be in [0, 1): e.g. 0.5 for half a tile")
    starts_of = cellpose_tile_starts if rule == "cellpose" else tile_starts
    starts = tuple(starts_of(n, t, overlap) for n, t in zip(shape, tile, strict=True))
    return TileGrid(shape=shape, tile=tile, starts=starts)


def tile_halo(shape: Sequence[int], *, tile: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The halo a block of an item must read for tiled inference (see :attr:`TileGrid.halo`).

    Examples
    --------
    >>> tile_halo((1000, 1000), tile=(256, 256), overlap=0.5)
    (255, 255)
    >>> tile_halo((100,), tile=(256,), overlap=0.5)
    (99,)
    """
    return plan_tiles(shape, tile=tile, overlap=overlap).halo


def _nnunet_gaussian(tile: tuple[int, ...]) -> np.ndarray:
    """nnU-Net v2's ``compute_gaussian``: a unit impulse at ``tile // 2`` through scipy's
    ``gaussian_filter`` (sigma tile / 8, truncated at 4 sigma), peak 1, zeros replaced by the
    smallest non-zero weight; in float32 (nnU-Net keeps it in float16)."""
    per_axis = []
    for t in tile:
        sigma = t * GAUSSIAN_SIGMA_SCALE
        radius = int(4.0 * sigma + 0.5)
        x = np.arange(t) - t // 2
        per_axis.append(np.where(np.abs(x) <= radius, np.exp(-0.5 * (x / sigma) ** 2), 0.0))
    weights = functools.reduce(np.multiply.outer, per_axis)
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def _cellpose_taper(tile: tuple[int, ...]) -> list[np.ndarray]:
    """Cellpose's ``transforms._taper_mask`` per axis: a logistic edge (scale 7.5 pixels)
    20 pixels inside a window of ``max(224, *tile)``, the tile cut from its centre."""
    size = max(224, *tile)
    distance = np.abs(np.arange(size) - (size - 1) / 2.0)
    edge = 1.0 / (1.0 + np.exp((distance - (size / 2 - 20)) / 7.5))
    return [edge[size // 2 - t // 2 : size // 2 + t // 2 + t % 2] for t in tile]


def _axis_weights(t: int, window: str) -> np.ndarray:
    x = np.arange(t, dtype=np.float64)
    if window == "gaussian":
        sigma = t * GAUSSIAN_SIGMA_SCALE
        return np.exp(-0.5 * ((x - (t - 1) / 2.0) / sigma) ** 2)
    if window == "constant":  # every pixel of a tile counts alike (MONAI's default mode)
        return np.ones(t)
    # A Hann window sampled at pixel centres: zero only half a pixel outside the tile.
    return np.sin(np.pi * (x + 0.5) / t) ** 2


@functools.lru_cache(maxsize=16)
def _weights(tile: tuple[int, ...], window: str) -> np.ndarray:
    if window == "gaussian_nnunet":
        weights = _nnunet_gaussian(tile)
        weights.flags.writeable = False
        return weights
    if window == "taper":
        per_axis = _cellpose_taper(tile)
    else:
        per_axis = [_axis_weights(t, window) for t in tile]
    weights = functools.reduce(np.multiply.outer, per_axis)
    weights = np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)
    weights.flags.writeable = False
    return weights


def tile_weights(tile: Sequence[int], *, window: BlendWindow = "gaussian") -> np.ndarray:
    """Blending weights of one tile, float32, peak 1, clamped at :data:`MIN_WEIGHT`.

    ``gaussian`` has sigma = tile / 8 per axis around the tile centre (nnU-Net); ``cosine`` is
    a Hann window. Both favour the tile centre, where the network sees the most context.
    ``constant`` weighs every pixel alike (MONAI's default ``mode="constant"``);
    ``gaussian_nnunet`` is nnU-Net v2's own (centred on ``tile // 2``, truncated at 4 sigma,
    not clamped at :data:`MIN_WEIGHT`), for nnU-Net results folders; ``taper`` is
    Cellpose's (flat to 20 pixels from a 256 tile's edge, then a logistic fall to about
    0.07), for Cellpose networks.
    The returned array is read-only (it is cached).

    Examples
    --------
    >>> w = tile_weights((8,), window="gaussian")
    >>> w.dtype, float(w.max()), bool(w[0] == w[-1])
    (dtype('float32'), 1.0, True)
    >>> tile_weights((4, 4), window="cosine").round(2)[0]
    array([0.03, 0.17, 0.17, 0.03], dtype=float32)
    """
    tile = tuple(int(t) for t in tile)
    if window not in ("gaussian", "cosine", "constant", "gaussian_nnunet", "taper"):
        raise ValueError(
            f"`window` ({window!r}) must be 'gaussian', 'cosine', 'constant', "
            "'gaussian_nnunet' or 'taper'"
        )
    if any(t < 1 for t in tile):
        raise ValueError(f"`tile` {tile} must be positive on every axis")
    return _weights(tile, window)

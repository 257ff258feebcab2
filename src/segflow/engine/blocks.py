"""The block grid: cores aligned to the output storage unit, halos clipped at the border."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from segflow.errors import PlanError

Box = tuple[slice, ...]

#: Default core block side per number of spatial axes: 2048^2 (16 MiB of float32) in 2D,
#: 256^3 (64 MiB) in 3D. Large enough that per-task overhead and halo re-use stay small
#: (measured at 8192^2: 1024^2 blocks spent 1.6 s of scheduler/client CPU, 2048^2 blocks
#: 0.6 s), small enough that a worker holds several blocks and their intermediates.
DEFAULT_BLOCK_SIDE = {1: 65536, 2: 2048, 3: 256}


@dataclass(frozen=True)
class Block:
    """One block of an item: its grid position, its core and the region it reads.

    ``core`` is written by this block alone. ``outer`` is ``core`` grown by the halo and
    clipped to the item, so a block needs nothing from its neighbours.
    """

    index: tuple[int, ...]
    linear: int
    core: Box
    outer: Box

    @property
    def core_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.core)


@dataclass(frozen=True)
class BlockGrid:
    """A regular grid of blocks over an item's spatial axes (``(z), y, x``).

    Examples
    --------
    >>> grid = plan_blocks((10, 7), (4, 4), halo=(1, 1))
    >>> grid.grid_shape
    (3, 2)
    >>> grid.block((2, 1)).core
    (slice(8, 10, None), slice(4, 7, None))
    >>> grid.block((2, 1)).outer
    (slice(7, 10, None), slice(3, 7, None))
    """

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block_shape, strict=True))

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid_shape)

    def block(self, index: Sequence[int]) -> Block:
        core = []
        outer = []
        for i, n, b, h in zip(index, self.shape, self.block_shape, self.halo, strict=True):
            start, stop = i * b, min((i + 1) * b, n)
            core.append(slice(start, stop))
            outer.append(slice(max(start - h, 0), min(stop + h, n)))
        linear = 0
        for i, g in zip(index, self.grid_shape, strict=True):
            linear = linear * g + i
        return Block(tuple(int(i) for i in index), linear, tuple(core), tuple(outer))

    def blocks(self) -> list[Block]:
        """All blocks in C order (the order of their ``linear`` numbers)."""
        return [self.block(index) for index in self.indices()]

    def indices(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(g) for g in self.grid_shape))

    def contains(self, index: Sequence[int]) -> bool:
        return all(0 <= i < g for i, g in zip(index, self.grid_shape, strict=True))

    def overlapping(self, box: Box) -> list[Block]:
        """The blocks whose core intersects ``box``, in C order.

        Examples
        --------
        >>> grid = plan_blocks((10, 7), (4, 4), halo=(1, 1))
        >>> [b.index for b in grid.overlapping(grid.block((1, 0)).outer)]
        [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
        """
        ranges = [
            range(s.start // b, (s.stop - 1) // b + 1) if s.stop > s.start else range(0)
            for s, b in zip(box, self.block_shape, strict=True)
        ]
        return [self.block(index) for index in itertools.product(*ranges)]


def plan_blocks(
    shape: Sequence[int],
    block_shape: Sequence[int] | int | None,
    *,
    halo: Sequence[int] | int = 0,
    storage_unit: Sequence[int] | None = None,
) -> BlockGrid:
    """Plan the block grid of an item.

    Parameters
    ----------
    shape
        Spatial shape of the item, ``(z), y, x``.
    block_shape
        Core block shape (one int for every axis); ``None`` for :func:`default_block_shape`.
        Clipped to the item shape.
    halo
        Pixels each block reads beyond its core on every side, per axis.
    storage_unit
        The output Zarr shard (or chunk) shape. Every block must cover whole storage units,
        so that no two blocks ever write into the same one: with zarr 3.1, writes that do not
        align with shards silently corrupt the array.

    Raises
    ------
    PlanError
        If the shapes do not match the item's axes or blocks do not align with storage units.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    blocks = block_shape_for(block_shape, ndim)
    halos = _per_axis(halo, ndim, "halo")
    if any(b < 1 for b in blocks):
        raise PlanError(f"`blocks.shape` {blocks} must be positive along every axis")
    if any(h < 0 for h in halos):
        raise PlanError(f"`halo` {halos} must not be negative")
    if storage_unit is not None:
        unit = _per_axis(storage_unit, ndim, "storage unit")
        for axis, (b, u, n) in enumerate(zip(blocks, unit, shape, strict=True)):
            if b % u != 0 and b < n:
                raise PlanError(
                    f"`blocks.shape` {blocks} does not align with the output storage unit "
                    f"(shard or chunk) {unit} along axis {axis}: each block must cover whole "
                    "storage units; use a multiple of it"
                )
    blocks = tuple(min(b, n) if n > 0 else b for b, n in zip(blocks, shape, strict=True))
    return BlockGrid(shape=shape, block_shape=blocks, halo=halos)


def default_block_shape(ndim: int) -> tuple[int, ...]:
    """The default core block shape for items with ``ndim`` spatial axes.

    >>> default_block_shape(2), default_block_shape(3)
    ((2048, 2048), (256, 256, 256))
    """
    return (DEFAULT_BLOCK_SIDE.get(ndim, 256),) * ndim


def block_shape_for(value: Sequence[int] | int | None, ndim: int) -> tuple[int, ...]:
    """``blocks.shape`` as one int per axis: ``None`` is the default, one int (or a one-item
    list) applies to every axis."""
    if value is None:
        return default_block_shape(ndim)
    values = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    return values * ndim if len(values) == 1 else _per_axis(values, ndim, "blocks.shape")


def _per_axis(value: Sequence[int] | int, ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    values = tuple(int(v) for v in value)
    if len(values) != ndim:
        raise PlanError(f"`{name}` {values} has {len(values)} axes, the item has {ndim}")
    return values


def shrink_box(box: Box, halo: Sequence[int], shape: Sequence[int]) -> Box:
    """Shrink ``box`` by ``halo`` on every side that is not the item border."""
    out = []
    for s, h, n in zip(box, halo, shape, strict=True):
        start = s.start if s.start == 0 else s.start + h
        stop = s.stop if s.stop == n else s.stop - h
        out.append(slice(start, stop))
    return tuple(out)


def relative(inner: Box, outer: Box) -> Box:
    """``inner`` expressed in the coordinates of an array that covers ``outer``."""
    return tuple(
        slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
    )


def intersect(a: Box, b: Box) -> Box:
    """The intersection of two boxes (empty slices where they do not meet)."""
    return tuple(
        slice(max(x.start, y.start), max(max(x.start, y.start), min(x.stop, y.stop)))
        for x, y in zip(a, b, strict=True)
    )


def grow_box(box: Box, halo: Sequence[int], shape: Sequence[int]) -> Box:
    """Grow ``box`` by ``halo`` on every side, clipped to the item."""
    return tuple(
        slice(max(s.start - h, 0), min(s.stop + h, n))
        for s, h, n in zip(box, halo, shape, strict=True)
    )

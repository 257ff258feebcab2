"""Halo exchange: a block's halo comes from strips its neighbours cut from their cores.

The input is read once: each block reads its core, and the halo comes from strips its
neighbours cut from their cores (a halo read straight from the source would decompress every
neighbouring chunk again; measured on 256^2 Zarr chunks, reading a block with an 8-pixel halo
cost 2.5x the CPU of reading its core). The same exchange gives the halo of a phase that starts
after a connectivity operation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from segflow.engine.blocks import Block, Box, grow_box, intersect, relative
from segflow.io.base import Reader

Strips = Sequence[Mapping[int, tuple[Box, np.ndarray]]]


def read_core(reader: Reader, block: Block) -> np.ndarray:
    return reader.read(block.core)


def cut_strips(
    core: np.ndarray,
    block: Block,
    receivers: Sequence[Block],
    *,
    halo: tuple[int, ...],
    shape: tuple[int, ...],
) -> dict[int, tuple[Box, np.ndarray]]:
    """The parts of this block's core that fall inside each receiver's halo."""
    strips = {}
    for other in receivers:
        box = intersect(grow_box(other.core, halo, shape), block.core)
        strips[other.linear] = (box, core[(slice(None), *relative(box, block.core))].copy())
    return strips


def assemble(core: np.ndarray, block: Block, strips: Strips, outer: Box) -> np.ndarray:
    """The block's ``outer`` region from its core and the strips its neighbours cut for it."""
    shape = tuple(s.stop - s.start for s in outer)
    data = np.empty((core.shape[0], *shape), dtype=core.dtype)
    data[(slice(None), *relative(block.core, outer))] = core
    for sent in strips:
        box, strip = sent[block.linear]
        data[(slice(None), *relative(box, outer))] = strip
    return data

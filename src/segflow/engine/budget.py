"""What an item will cost before anything of it is read or planned: its input bytes (from
the reader's metadata), its block count and the memory this command's bookkeeping of those
blocks takes (block tasks, their futures and, on a local cluster, the scheduler's state).

A header that lies (480 bytes of NIfTI declaring 30000^3 voxels, a sparse GeoTIFF declaring
200000^2 pixels) is refused here with its figures, alone, before it can take the machine
down; the rest of the collection goes on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segflow.engine.blocks import block_shape_for
from segflow.errors import PlanError
from segflow.io import ItemInfo
from segflow.io._common import format_bytes

# This command's memory per block of an item while it runs (task states and futures of
# each phase, the blocks' summaries; the scheduler's too on a local cluster). Measured with
# configs/aerial.yaml's pipeline (regions, OME pyramid) on a 2-worker local cluster, peak
# of the command's process: 350 MB at 1,024 blocks, 600 MB at 4,096 (147 MB before the
# item), about 85 kB a block at the margin; twice that leaves room for larger tables.
BLOCK_BOOKKEEPING = 160 * 1024
# The share of the memory available when an item starts that its bookkeeping may take.
COMMAND_SHARE = 0.5


@dataclass(frozen=True)
class ItemBudget:
    """What one item costs: its decoded input, its blocks and this command's memory."""

    input_bytes: int
    n_blocks: int
    block_shape: tuple[int, ...]
    command_bytes: int


def estimate_item(info: ItemInfo, blocks: Sequence[int] | int | None) -> ItemBudget:
    """The cost of segmenting ``info``'s item in blocks of ``blocks`` (``blocks.shape``),
    from its metadata alone.

    Examples
    --------
    >>> info = ItemInfo(id="big", path="big.tif", format="geotiff", dtype="uint8",
    ...                 shape=(3, 200_000, 200_000), axes=("c", "y", "x"),
    ...                 spacing=(1.0, 1.0), origin=(0.0, 0.0))
    >>> budget = estimate_item(info, 256)
    >>> budget.n_blocks, format_bytes(budget.input_bytes)
    (611524, '111.8 GiB')
    """
    spatial = info.spatial_shape
    shape = block_shape_for(blocks, len(spatial))
    n_blocks = math.prod(-(-n // b) for n, b in zip(spatial, shape, strict=True))
    return ItemBudget(
        input_bytes=math.prod(info.shape) * np.dtype(info.dtype).itemsize,
        n_blocks=n_blocks,
        block_shape=shape,
        command_bytes=n_blocks * BLOCK_BOOKKEEPING,
    )


def check_item_budget(
    info: ItemInfo,
    blocks: Sequence[int] | int | None,
    *,
    max_item_bytes: int,
    command_memory: int | None = None,
) -> ItemBudget:
    """Refuse an item larger than ``max_item_bytes`` (``run.max_item_bytes``), or one whose
    blocks' bookkeeping would take more than ``command_memory`` (default: a share,
    :data:`COMMAND_SHARE`, of the memory available now).

    Raises
    ------
    PlanError
        One line naming the item, its figures, the limit and the setting that changes it.
    """
    budget = estimate_item(info, blocks)
    where = f"item {info.id!r} ({info.path})"
    dims = " x ".join(str(n) for n in info.shape)
    if budget.input_bytes > max_item_bytes:
        raise PlanError(
            f"{where}: its metadata declares {dims} {info.dtype}, "
            f"{format_bytes(budget.input_bytes)} of input, more than run.max_item_bytes "
            f"({format_bytes(max_item_bytes)}): raise it (--set run.max_item_bytes=BYTES) "
            f"to segment this item"
        )
    if command_memory is None:
        command_memory = int(available_memory() * COMMAND_SHARE)
    if budget.command_bytes > command_memory:
        block = "x".join(str(b) for b in budget.block_shape)
        raise PlanError(
            f"{where}: {dims} {info.dtype} in {budget.n_blocks:,} blocks of {block} would "
            f"take about {format_bytes(budget.command_bytes)} of this command's memory "
            f"({format_bytes(BLOCK_BOOKKEEPING)} a block), more than the "
            f"{format_bytes(command_memory)} it may use: choose larger blocks (blocks.shape)"
        )
    return budget


def available_memory() -> int:
    """Bytes of memory available to new allocations on this machine now."""
    import psutil

    return int(psutil.virtual_memory().available)

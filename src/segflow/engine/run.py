"""Run a compiled pipeline over the blocks of one item.

Each phase is one task per block (read or take the kept block, run every step, end with the
phase's partial result). The input is read once: each block reads its core, and the halo comes
from strips its neighbours cut from their cores (a halo read straight from the source would
decompress every neighbouring chunk again; measured on 256^2 Zarr chunks, reading a block
with an 8-pixel halo cost 2.5x the CPU of reading its core). Kept blocks stay where they were
computed; only partial results (histograms, label counts, face pairs) and small summaries come
back to the caller, once per phase. The final phase writes whole storage units of the output,
relabelling in the same task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from segflow.engine.blocks import (
    Block,
    BlockGrid,
    Box,
    grow_box,
    intersect,
    relative,
    shrink_box,
)
from segflow.engine.executor import Executor, ProgressCallback
from segflow.engine.pipeline import Plan, Step
from segflow.io.base import Reader
from segflow.ops.label import LabelParams
from segflow.ops.registry import Done, GlobalStatistic, OpContext
from segflow.stitch.labels import (
    BlockRelabel,
    Faces,
    block_faces,
    face_pairs,
    merge_labels,
    neighbor_offsets,
    smallest_label_dtype,
)


class Sink(Protocol):
    """Where a block's core result goes. Must pickle cheaply."""

    def write(self, region: Box, data: np.ndarray) -> Any: ...


class ArraySink:
    """Hands the block back to the caller, which assembles a numpy array."""

    def write(self, region: Box, data: np.ndarray) -> Any:
        return region, data


@dataclass
class Tile:
    """A block's intermediate image: ``data`` covers ``box`` (global coordinates)."""

    box: Box
    data: np.ndarray
    partial: Any = None


@dataclass
class LabelTile:
    """A block's local labels (``1..n`` on its core) and its face slabs."""

    labels: np.ndarray
    n: int
    faces: Faces


@dataclass
class BlockSummary:
    region: Box
    written: Any = None
    foreground: int = 0


@dataclass
class ItemRun:
    """What running a pipeline on one item produced (small)."""

    n_blocks: int
    n_labels: int | None
    out_dtype: np.dtype
    stats: dict[int, Any]
    seconds: float
    blocks: list[BlockSummary] = field(default_factory=list)


def _context(
    step: Step, stats: Mapping[int, Any], ndim: int, spacing: tuple[float, ...]
) -> OpContext:
    return OpContext(spatial_ndim=ndim, stat=stats.get(step.index), spacing=spacing)


def _core_of(box: Box, data: np.ndarray, core: Box) -> np.ndarray:
    return data[(slice(None), *relative(core, box))]


def read_core(reader: Reader, block: Block) -> np.ndarray:
    return reader.read(block.core)


def cut_strips(
    core: np.ndarray, block: Block, receivers: Sequence[Block]
) -> dict[int, tuple[Box, np.ndarray]]:
    """The parts of this block's core that fall inside each receiver's halo."""
    strips = {}
    for other in receivers:
        box = intersect(other.outer, block.core)
        strips[other.linear] = (box, core[(slice(None), *relative(box, block.core))].copy())
    return strips


def assemble(
    core: np.ndarray, block: Block, strips: Sequence[Mapping[int, tuple[Box, np.ndarray]]]
) -> np.ndarray:
    """The block's outer region from its core and the strips its neighbours cut for it."""
    shape = tuple(s.stop - s.start for s in block.outer)
    data = np.empty((core.shape[0], *shape), dtype=core.dtype)
    data[(slice(None), *relative(block.core, block.outer))] = core
    for sent in strips:
        box, strip = sent[block.linear]
        data[(slice(None), *relative(box, block.outer))] = strip
    return data


def run_block(
    source: Reader | Tile | np.ndarray,
    block: Block,
    strips: Sequence[Mapping[int, tuple[Box, np.ndarray]]] = (),
    *,
    steps: Sequence[Step],
    stats: Mapping[int, Any],
    shape: tuple[int, ...],
    keep_halo: tuple[int, ...],
    spacing: tuple[float, ...] = (),
    saved: Mapping[str, Sink] | None = None,
    reduce: tuple[GlobalStatistic, Any] | None = None,
    label: Step | None = None,
    sink: Sink | None = None,
    out_dtype: np.dtype | None = None,
) -> Tile | LabelTile | BlockSummary:
    """One block's share of one phase: read (or take the kept tile), run ``steps``, then end
    the phase with a reduction partial, local labels, or a write of the core.

    ``source`` is the kept tile of the previous phase, or this block's core (then ``strips``
    complete its halo), or a reader to read the outer region from."""
    if isinstance(source, Tile):
        box, data = source.box, source.data
    elif isinstance(source, np.ndarray):
        box, data = block.outer, assemble(source, block, strips)
    else:
        box = block.outer
        data = source.read(box)
    ndim = len(shape)
    for step in steps:
        data = step.op.apply(data, step.params, _context(step, stats, ndim, spacing))
        if step.op.kind == "local":
            inner = shrink_box(box, step.op.halo_of(step.params, ndim), shape)
            data, box = data[(slice(None), *relative(inner, box))], inner
        if step.save_as is not None and saved is not None:
            core = _core_of(box, data, block.core)[0]
            saved[step.save_as].write(block.core, _storable(core))
    if reduce is not None:
        statistic, state = reduce
        keep = grow_box(block.core, keep_halo, shape)
        keep = tuple(
            slice(max(k.start, b.start), min(k.stop, b.stop))
            for k, b in zip(keep, box, strict=True)
        )
        data = data[(slice(None), *relative(keep, box))]
        tile = Tile(keep, data)
        tile.partial = statistic.map(_core_of(keep, data, block.core), state)
        return tile
    core = _core_of(box, data, block.core)
    if label is not None:
        labels = label.op.apply(core, label.params, _context(label, stats, ndim, spacing))[0]
        return LabelTile(labels=labels, n=int(labels.max(initial=0)), faces=block_faces(labels))
    if sink is None:
        raise TypeError("run_block needs a sink for the last phase")
    result = core[0] if core.shape[0] == 1 else core
    stored = _storable(result) if out_dtype is None else result.astype(out_dtype, copy=False)
    return BlockSummary(block.core, sink.write(block.core, stored), int(np.count_nonzero(stored)))


def _storable(data: np.ndarray) -> np.ndarray:
    return data.view(np.uint8) if data.dtype == np.bool_ else data


def tile_partial(tile: Tile) -> Any:
    return tile.partial


def tile_statistic(tile: Tile, block: Block, *, statistic: GlobalStatistic, state: Any) -> Any:
    return statistic.map(_core_of(tile.box, tile.data, block.core), state)


def label_faces(tile: LabelTile) -> tuple[int, Faces]:
    return tile.n, tile.faces


def label_pairs(
    mine: tuple[int, Faces],
    neighbors: Sequence[tuple[int, Faces]],
    linear: int,
    offsets: Sequence[tuple[tuple[int, ...], int]],
    *,
    connectivity: int,
) -> tuple[int, np.ndarray]:
    n, faces = mine
    others = [(d, other, f) for (d, other), (_, f) in zip(offsets, neighbors, strict=True)]
    return n, face_pairs(linear, faces, others, connectivity)


def relabel_block(
    tile: LabelTile,
    block: Block,
    relabel: BlockRelabel,
    *,
    steps: Sequence[Step],
    stats: Mapping[int, Any],
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    dtype: np.dtype,
    sink: Sink,
) -> BlockSummary:
    """Turn local labels into final ids (a table lookup), run trailing pointwise steps, write."""
    table = relabel.table(tile.n, dtype)
    data = table[tile.labels][np.newaxis]
    for step in steps:
        data = step.op.apply(data, step.params, _context(step, stats, len(shape), spacing))
    out = data[0].astype(dtype, copy=False)
    return BlockSummary(block.core, sink.write(block.core, out), int(np.count_nonzero(out)))


def run_plan(
    reader: Reader,
    plan: Plan,
    grid: BlockGrid,
    executor: Executor,
    *,
    make_sink: Callable[[np.dtype], Sink],
    spacing: Sequence[float] = (),
    saved: Mapping[str, Sink] | None = None,
    progress: ProgressCallback | None = None,
) -> ItemRun:
    """Run every phase of ``plan`` over ``grid`` and write the result through ``make_sink``.

    ``reader`` may be a Dask future of a reader (scattered once, read on the workers).
    ``make_sink(dtype)`` is called once, on the caller, when the output dtype is known (for
    labels, only after the merge: the smallest dtype that holds every id).
    """
    started = time.perf_counter()
    blocks = grid.blocks()
    shape = grid.shape
    spacing = tuple(float(s) for s in spacing)
    stats: dict[int, Any] = {}
    sources, strips = _read_once(reader, grid, blocks, executor)
    relabels: Sequence[BlockRelabel] = ()
    n_labels: int | None = None
    remaining = list(plan.halo)
    common = {"shape": shape, "spacing": spacing, "saved": saved}
    for number, phase in enumerate(plan.phases):
        for step in phase.steps:
            if step.op.kind == "local":
                remaining = [
                    r - h
                    for r, h in zip(
                        remaining, step.op.halo_of(step.params, len(shape)), strict=True
                    )
                ]
        label = f"phase {number + 1}/{len(plan.phases)}"
        if phase.ends_with == "statistic":
            assert phase.statistic_step is not None
            stat_step = phase.statistic_step
            statistic = stat_step.op.statistic_for(stat_step.params)
            state = statistic.start()
            tiles = executor.map(
                run_block,
                sources,
                blocks,
                strips,
                steps=phase.steps,
                stats=dict(stats),
                keep_halo=tuple(remaining),
                reduce=(statistic, state),
                **common,
            )
            partials = executor.gather(
                executor.map(tile_partial, tiles), label=label, progress=progress
            )
            while True:
                result = statistic.combine(partials, state)
                if isinstance(result, Done):
                    stats[stat_step.index] = result.value
                    break
                state = result
                partials = executor.gather(
                    executor.map(tile_statistic, tiles, blocks, statistic=statistic, state=state)
                )
            sources, strips = tiles, [()] * len(blocks)
        elif phase.ends_with == "label":
            assert phase.connectivity is not None
            params = phase.connectivity.params
            assert isinstance(params, LabelParams)
            tiles = executor.map(
                run_block,
                sources,
                blocks,
                strips,
                steps=phase.steps,
                stats=dict(stats),
                keep_halo=(0,) * len(shape),
                label=phase.connectivity,
                **common,
            )
            faces = executor.map(label_faces, tiles)
            offsets = neighbor_offsets(len(shape), params.connectivity)
            neighbor_args, offset_args = [], []
            for block in blocks:
                present = []
                for d in offsets:
                    other = tuple(i + x for i, x in zip(block.index, d, strict=True))
                    if grid.contains(other):
                        present.append((d, grid.block(other).linear))
                offset_args.append(present)
                neighbor_args.append([faces[linear] for _, linear in present])
            results = executor.map(
                label_pairs,
                faces,
                neighbor_args,
                [b.linear for b in blocks],
                offset_args,
                connectivity=params.connectivity,
            )
            gathered = executor.gather(results, label=label, progress=progress)
            merge = merge_labels([n for n, _ in gathered], [p for _, p in gathered])
            relabels, n_labels = merge.relabels, merge.n_labels
            sources, strips = tiles, [()] * len(blocks)
        else:
            if n_labels is not None:
                dtype = smallest_label_dtype(n_labels)
                sink = make_sink(dtype)
                handles = executor.map(
                    relabel_block,
                    sources,
                    blocks,
                    relabels,
                    steps=phase.steps,
                    stats=dict(stats),
                    shape=shape,
                    spacing=spacing,
                    dtype=dtype,
                    sink=sink,
                )
            else:
                dtype = plan.out_dtype
                sink = make_sink(dtype)
                handles = executor.map(
                    run_block,
                    sources,
                    blocks,
                    strips,
                    steps=phase.steps,
                    stats=dict(stats),
                    keep_halo=(0,) * len(shape),
                    sink=sink,
                    out_dtype=dtype,
                    **common,
                )
            summaries = executor.gather(handles, label=label, progress=progress)
            return ItemRun(
                n_blocks=len(blocks),
                n_labels=n_labels,
                out_dtype=np.dtype(dtype),
                stats=stats,
                seconds=time.perf_counter() - started,
                blocks=summaries,
            )
    raise AssertionError("a plan always ends with an output phase")


def _read_once(
    reader: Reader, grid: BlockGrid, blocks: Sequence[Block], executor: Executor
) -> tuple[list[Any], list[Any]]:
    """Sources and halo strips for the first phase: each core read once, halos from strips.

    With no halo (or one block) the first phase reads its region from ``reader`` directly.
    """
    if not any(grid.halo) or len(blocks) == 1:
        return [reader] * len(blocks), [()] * len(blocks)
    cores = executor.map(read_core, [reader] * len(blocks), blocks)
    receivers = [
        [other for other in grid.overlapping(grow_box(b.core, grid.halo, grid.shape)) if other != b]
        for b in blocks
    ]
    cut = executor.map(cut_strips, cores, blocks, receivers)
    strips = [
        [cut[other.linear] for other in grid.overlapping(b.outer) if other != b] for b in blocks
    ]
    return cores, strips

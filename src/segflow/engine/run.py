"""Run a compiled pipeline over the blocks of one item.

Each phase is one task per block (take the block's source, run every step, end with the
phase's partial result). The input is read once: each block reads its core, and the halo comes
from strips its neighbours cut from their cores (a halo read straight from the source would
decompress every neighbouring chunk again; measured on 256^2 Zarr chunks, reading a block
with an 8-pixel halo cost 2.5x the CPU of reading its core). The same exchange gives the halo
of a phase that starts after a connectivity operation. Kept blocks stay where they were
computed; only partial results (histograms, face labels, object features) and small summaries
come back to the caller, once per phase. The final phase writes whole storage units of the
output, relabelling in the same task.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from segflow.engine.blocks import Block, BlockGrid, Box, grow_box, intersect, relative, shrink_box
from segflow.engine.executor import Executor, ProgressCallback
from segflow.engine.pipeline import Phase, Plan, Step
from segflow.io.base import Reader
from segflow.ops.registry import Done, GlobalStatistic, OpContext, map_statistic
from segflow.stitch.labels import (
    BlockObjects,
    BlockRelabel,
    Faces,
    block_faces,
    block_order,
    decide_block,
    face_pairs,
    first_pixels,
    merge_objects,
    neighbor_offsets,
    smallest_label_dtype,
)
from segflow.stitch.regions import RegionPartial, measure_regions, merge_rows

Strips = Sequence[Mapping[int, tuple[Box, np.ndarray]]]

#: Items whose intermediates would exceed this many bytes (8 per pixel, over all workers) run
#: in streaming mode: nothing is kept between phases, each phase recomputes from the input.
KEEP_LIMIT = 1 << 30


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
class LabelSummary:
    """The small part of a labelled block: what its neighbours and the client need."""

    objects: BlockObjects
    faces: Faces
    class_faces: Faces | None = None


@dataclass
class LabelTile:
    """A block's local labels (``1..n`` on its core), kept on the worker until relabelled."""

    labels: np.ndarray
    keep: np.ndarray  # (n + 1,) labels kept by the block's own decision
    source: np.ndarray | None  # the connectivity step's input core, if its finish needs it
    summary: LabelSummary


@dataclass(frozen=True)
class Finish:
    """How to turn a :class:`LabelTile` into the connectivity step's output."""

    step: Step
    dtype: np.dtype


class RegionsSink(Protocol):
    """Where finished region-property rows go. Must pickle cheaply."""

    def write(self, name: str, rows: RegionPartial) -> Any: ...


@dataclass(frozen=True)
class RegionsSpec:
    """Measure the output's objects: rows go to ``sink``; ``intensity`` is read per block."""

    sink: RegionsSink
    intensity: Reader | None = None


@dataclass
class BlockSummary:
    region: Box
    written: Any = None
    foreground: int = 0
    regions: tuple[Any, RegionPartial] | None = None  # (what the sink returned, face rows)


@dataclass
class ItemRun:
    """What running a pipeline on one item produced (small)."""

    n_blocks: int
    n_labels: int | None
    out_dtype: np.dtype
    stats: dict[str, Any]  # by Step.key
    seconds: float
    blocks: list[BlockSummary] = field(default_factory=list)
    regions: list[Any] | None = None  # what the regions sink returned, per part


def _context(
    step: Step,
    stats: Mapping[str, Any],
    ndim: int,
    spacing: tuple[float, ...],
    box: Box = (),
    shape: tuple[int, ...] = (),
) -> OpContext:
    return OpContext(
        spatial_ndim=ndim, stat=stats.get(step.key), spacing=spacing, box=box, shape=shape
    )


def _core_of(box: Box, data: np.ndarray, core: Box) -> np.ndarray:
    return data[(slice(None), *relative(core, box))]


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


def finish_block(
    tile: LabelTile,
    block: Block,
    relabel: BlockRelabel,
    *,
    finish: Finish,
    saved: Mapping[str, Sink] | None = None,
) -> np.ndarray:
    """Final ids of a labelled block (a table lookup), or the step's output made from them."""
    ids = relabel.table(tile.keep, finish.dtype)[tile.labels]
    step = finish.step
    out = ids if step.op.finish is None else step.op.finish(ids, tile.source, step.params)
    out = out if out.ndim > tile.labels.ndim else out[np.newaxis]
    if step.save_as is not None and saved is not None:
        saved[step.save_as].write(block.core, _storable(out[0]))
    return out


def run_block(
    source: Reader | Tile | LabelTile | np.ndarray,
    block: Block,
    strips: Strips = (),
    relabel: BlockRelabel | None = None,
    own_stats: Mapping[str, Any] | None = None,
    *,
    steps: Sequence[Step],
    stats: Mapping[str, Any],
    shape: tuple[int, ...],
    halo: tuple[int, ...],
    keep_halo: tuple[int, ...],
    spacing: tuple[float, ...] = (),
    saved: Mapping[str, Sink] | None = None,
    finish: Finish | None = None,
    reduce: tuple[GlobalStatistic, Any] | None = None,
    label: Step | None = None,
    sink: Sink | None = None,
    out_dtype: np.dtype | None = None,
    regions: RegionsSpec | None = None,
) -> Tile | LabelTile | BlockSummary:
    """One block's share of one phase: take its source, run ``steps``, then end the phase
    with a reduction partial, local labels, or a write of the core.

    ``source`` is the kept tile of the previous phase, a labelled block to finish with
    ``relabel``, this block's core (then ``strips`` complete its ``halo``), or a reader to
    read the block's region from. ``own_stats`` are the statistics only this block sees
    (``Done.per_block``).
    """
    if own_stats:
        stats = {**stats, **own_stats}
    if isinstance(source, Tile):
        box, data = source.box, source.data
    elif isinstance(source, LabelTile):
        assert relabel is not None and finish is not None
        box, data = block.core, finish_block(source, block, relabel, finish=finish, saved=saved)
    elif isinstance(source, np.ndarray):
        box = grow_box(block.core, halo, shape)
        data = assemble(source, block, strips, box)
    else:
        box = grow_box(block.core, halo, shape)
        data = source.read(box)
    box, data = apply_steps(steps, box, data, block, stats, shape, spacing, saved)
    if reduce is not None:
        statistic, state = reduce
        keep = intersect(grow_box(block.core, keep_halo, shape), box)
        data = data[(slice(None), *relative(keep, box))]
        tile = Tile(keep, data)
        core = _core_of(keep, data, block.core)
        tile.partial = map_statistic(statistic, core, state, block.core, shape)
        return tile
    core = _core_of(box, data, block.core)
    if label is not None:
        return label_block(core, block, label, stats=stats, shape=shape, spacing=spacing)
    if sink is None:
        raise TypeError("run_block needs a sink for the last phase")
    result = core[0] if core.shape[0] == 1 else core
    stored = _storable(result) if out_dtype is None else result.astype(out_dtype, copy=False)
    summary = BlockSummary(
        block.core, sink.write(block.core, stored), int(np.count_nonzero(stored))
    )
    if regions is not None:
        if isinstance(source, LabelTile) and not steps and finish_is_ids(finish):
            assert relabel is not None and finish is not None
            # The local labels are dense already: no sort of the block to number its objects.
            dense, finals = source.labels, relabel.table(source.keep, np.dtype(np.int64))
            by_class = finish.step.op.pairs_by_class(finish.step.params)
            classes = source.source[0] if by_class and source.source is not None else None
        else:
            uniq, inverse = np.unique(stored, return_inverse=True)
            if uniq[0] != 0:
                uniq, inverse = np.concatenate([[0], uniq]), inverse + 1
            dense, finals, classes = inverse.reshape(stored.shape), uniq.astype(np.int64), None
        intensity = None if regions.intensity is None else regions.intensity.read(block.core)
        rows, on_faces = measure_regions(dense, finals, block.core, intensity, classes)
        complete = regions.sink.write(f"part-{block.linear:06d}", rows.take(~on_faces))
        summary.regions = (complete, rows.take(on_faces))
    return summary


def finish_is_ids(finish: Finish | None) -> bool:
    """Whether a finished connectivity step writes its stitched ids (not a mask, not the
    input's own ids)."""
    return finish is not None and finish.step.op.finish is None


def apply_steps(
    steps: Sequence[Step],
    box: Box,
    data: np.ndarray,
    block: Block,
    stats: Mapping[str, Any],
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    saved: Mapping[str, Sink] | None,
) -> tuple[Box, np.ndarray]:
    """Run ``steps`` on ``data`` (covering ``box``), shrinking the box after local steps."""
    ndim = len(shape)
    for step in steps:
        ctx = _context(step, stats, ndim, spacing, box, shape)
        data = step.op.apply(data, step.params, ctx)
        if step.op.kind == "local":
            inner = shrink_box(box, step.op.halo_of(step.params, ndim, spacing), shape)
            data, box = data[(slice(None), *relative(inner, box))], inner
        if step.save_as is not None and saved is not None:
            core = _core_of(box, data, block.core)[0]
            saved[step.save_as].write(block.core, _storable(core))
    return box, data


def stream_block(
    reader: Reader,
    block: Block,
    relabels: Sequence[BlockRelabel],
    own_stats: Mapping[str, Any],
    *,
    replay: Sequence[Phase],
    finishes: Sequence[Finish],
    read_halo: tuple[int, ...],
    **phase: Any,
) -> Any:
    """One phase of one block in streaming mode: nothing was kept, so recompute.

    Reads the block from the input again and replays the earlier phases (their statistics
    and relabel tables are known now), then runs this phase with :func:`run_block`. Returns
    only what the caller needs: a statistic partial, the label summary, or the block summary.
    Intermediate writes (``save_as``) happen only in the phase that first computes them.
    """
    phase["stats"] = stats = {**phase["stats"], **own_stats}
    shape, spacing = phase["shape"], phase["spacing"]
    box = grow_box(block.core, read_halo, shape)
    source: Tile | LabelTile = Tile(box, reader.read(box))
    relabel: BlockRelabel | None = None
    finish: Finish | None = None
    finishing = iter(zip(relabels, finishes, strict=True))
    for earlier in replay:
        if isinstance(source, LabelTile):
            assert relabel is not None and finish is not None
            box, data = block.core, finish_block(source, block, relabel, finish=finish)
        else:
            box, data = source.box, source.data
        box, data = apply_steps(earlier.steps, box, data, block, stats, shape, spacing, None)
        if earlier.connectivity is not None:
            core = _core_of(box, data, block.core)
            step = earlier.connectivity
            source = label_block(core, block, step, stats=stats, shape=shape, spacing=spacing)
            relabel, finish = next(finishing)
        else:
            source, relabel, finish = Tile(box, data), None, None
    result = run_block(source, block, (), relabel, finish=finish, halo=read_halo, **phase)
    if isinstance(result, Tile):
        return result.partial
    if isinstance(result, LabelTile):
        return result.summary
    return result


def label_block(
    core: np.ndarray,
    block: Block,
    step: Step,
    *,
    stats: Mapping[str, Any],
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
) -> LabelTile:
    """Label a block's core, measure its objects and decide those complete inside it."""
    ctx = _context(step, stats, len(shape), spacing, block.core, shape)
    try:
        labels = step.op.apply(core, step.params, ctx)[0]
        rule = step.op.rule_for(step.params, ctx)
    except ValueError as error:  # bad input found in the data: say which step refused it
        raise ValueError(f"{step.key}: {error}") from error
    n = int(labels.max(initial=0))
    features = None if rule is None else rule.measure(core, labels, n, block.core, shape)
    keys = None if rule is None or rule.ids is None else rule.ids(core, labels, n)
    faces = block_faces(labels)
    if step.op.finish is None:  # the ids are the output: number objects in item scan order
        first = first_pixels(labels, n, block.core, shape)
    else:
        first = block_order(block.linear, n)
    objects, keep = decide_block(faces, n, features, rule, keys, first)
    by_class = step.op.pairs_by_class(step.params)
    summary = LabelSummary(objects, faces, block_faces(core[0]) if by_class else None)
    source = core if step.op.keeps_source(step.params) else None
    return LabelTile(labels, keep, source, summary)


def _storable(data: np.ndarray) -> np.ndarray:
    return data.view(np.uint8) if data.dtype == np.bool_ else data


def tile_partial(tile: Tile) -> Any:
    return tile.partial


def tile_statistic(
    tile: Tile,
    block: Block,
    *,
    statistic: GlobalStatistic,
    state: Any,
    shape: tuple[int, ...],
) -> Any:
    core = _core_of(tile.box, tile.data, block.core)
    return map_statistic(statistic, core, state, block.core, shape)


FAN_IN = 16  # partial results merged per task in a statistic's tree reduction

#: A global statistic that has not finished after this many passes over the item stops the
#: item with an error naming its step: no statistic may loop for ever (Li's iteration stops
#: itself well before this; exact percentiles need at most 5 passes).
MAX_STATISTIC_PASSES = 1000


def merge_partials(partials: list[Any], *, statistic: GlobalStatistic, state: Any) -> Any:
    return statistic.merge(partials, state)  # type: ignore[attr-defined]


def label_summary(tile: LabelTile) -> LabelSummary:
    return tile.summary


def label_pairs(
    mine: LabelSummary,
    neighbors: Sequence[LabelSummary],
    linear: int,
    offsets: Sequence[tuple[tuple[int, ...], int]],
    *,
    connectivity: int,
) -> tuple[BlockObjects, np.ndarray]:
    others = [(d, other, n.faces) for (d, other), n in zip(offsets, neighbors, strict=True)]
    pairs = face_pairs(
        linear,
        mine.faces,
        others,
        connectivity,
        classes=mine.class_faces,
        neighbor_classes=[n.class_faces for n in neighbors],
    )
    return mine.objects, pairs


@dataclass
class _Sources:
    """What the next phase starts from, one entry per block."""

    items: list[Any]
    strips: list[Any]
    relabels: list[Any]
    finish: Finish | None = None


def run_plan(
    reader: Reader,
    plan: Plan,
    grid: BlockGrid,
    executor: Executor,
    *,
    make_sink: Callable[[np.dtype], Sink],
    spacing: Sequence[float] = (),
    saved: Mapping[str, Sink] | None = None,
    regions: RegionsSpec | None = None,
    keep_limit: int | None = None,
    progress: ProgressCallback | None = None,
) -> ItemRun:
    """Run every phase of ``plan`` over ``grid`` and write the result through ``make_sink``.

    ``reader`` may be a Dask future of a reader (scattered once, read on the workers).
    ``make_sink(dtype)`` is called once, on the caller, when the output dtype is known (for
    labels, only after the merge: the smallest dtype that holds every id). With ``regions``,
    the output's objects are measured in the same tasks that write them.

    Intermediates stay on the workers between phases while they fit in ``keep_limit`` bytes
    (default :data:`KEEP_LIMIT`); a larger item runs in *streaming* mode, where each phase
    reads its blocks again and recomputes the earlier phases, so a worker holds only the
    blocks it is working on (the memory of a 16384^2 item is that of a 4096^2 one). Pipelines
    with local steps after a connectivity step keep their intermediates regardless.
    """
    limit = KEEP_LIMIT if keep_limit is None else keep_limit
    run = _PlanRun(
        plan,
        grid,
        executor,
        reader,
        spacing=tuple(float(s) for s in spacing),
        saved=saved,
        regions=regions,
        stream=8 * math.prod(grid.shape) > limit and can_stream(plan),
        progress=progress,
    )
    sources = run.read_once()
    for number, phase in enumerate(plan.phases):
        label = f"phase {number + 1}/{len(plan.phases)}"
        if phase.ends_with == "statistic":
            keep_halo = plan.phases[number + 1].halo_in
            sources = run.statistic_phase(phase, sources, label, keep_halo)
        elif phase.ends_with == "label":
            sources = run.label_phase(phase, sources, label)
        else:
            return run.output_phase(phase, sources, label, make_sink)
    raise AssertionError("a plan always ends with an output phase")


def can_stream(plan: Plan) -> bool:
    """Whether every phase can be recomputed from the input (no halo after a label)."""
    return not any(any(p.halo_in) for p in plan.phases if p.after is not None)


class _PlanRun:
    """The state of one item's run: statistics so far, the last merge, the timer."""

    def __init__(
        self,
        plan: Plan,
        grid: BlockGrid,
        executor: Executor,
        reader: Any,
        *,
        spacing: tuple[float, ...],
        saved: Mapping[str, Sink] | None,
        regions: RegionsSpec | None,
        stream: bool,
        progress: ProgressCallback | None,
    ) -> None:
        self.plan, self.grid, self.executor, self.reader = plan, grid, executor, reader
        self.blocks = grid.blocks()
        self.shape = grid.shape
        self.spacing = spacing
        self.saved = saved
        self.regions = regions
        self.stream = stream
        self.progress = progress
        self.stats: dict[str, Any] = {}
        self.block_stats: dict[str, Sequence[Any]] = {}  # Done.per_block, by Step.key
        self.n_labels: int | None = None
        self.done: list[Phase] = []  # streaming: phases to replay, with their merges
        self.relabel_lists: list[Sequence[BlockRelabel]] = []
        self.finishes: list[Finish] = []
        self.started = time.perf_counter()

    def _none(self) -> list[Any]:
        return [()] * len(self.blocks)

    def own_stats(self) -> list[dict[str, Any]]:
        """For each block, the statistics only it sees."""
        return [{k: v[b.linear] for k, v in self.block_stats.items()} for b in self.blocks]

    def stream_map(self, phase: Phase, **kwargs: Any) -> list[Any]:
        """Streaming mode: one :func:`stream_block` task per block."""
        relabels = [[r[b.linear] for r in self.relabel_lists] for b in self.blocks]
        return self.executor.map(
            stream_block,
            [self.reader] * len(self.blocks),
            self.blocks,
            relabels,
            self.own_stats(),
            replay=list(self.done),
            finishes=list(self.finishes),
            read_halo=self.grid.halo,
            steps=phase.steps,
            stats=dict(self.stats),
            shape=self.shape,
            spacing=self.spacing,
            **kwargs,
        )

    def read_once(self) -> _Sources:
        """Sources for the first phase: each core read once, halos from strips.

        With no halo (or one block), in streaming mode, or where the halo is wider than a
        block, the first phase reads its region from the reader: a halo past the next block
        would make every block wait on strips from many others, (2 * halo / block + 1)^ndim
        of them, where reading the window costs about the same bytes.
        """
        readers = [self.reader] * len(self.blocks)
        grid = self.grid
        wide = any(h > b for h, b in zip(grid.halo, grid.block_shape, strict=True))
        if self.stream or not any(grid.halo) or len(self.blocks) == 1 or wide:
            return _Sources(readers, self._none(), [None] * len(self.blocks))
        cores = self.executor.map(read_core, readers, self.blocks)
        return _Sources(cores, self.exchange(cores, self.grid.halo), [None] * len(self.blocks))

    def exchange(self, cores: list[Any], halo: tuple[int, ...]) -> list[Any]:
        """For each block, the strips its neighbours cut from ``cores`` for its ``halo``."""
        grid, shape = self.grid, self.shape
        receivers = [
            [o for o in grid.overlapping(grow_box(b.core, halo, shape)) if o.linear != b.linear]
            for b in self.blocks
        ]
        cut = self.executor.map(cut_strips, cores, self.blocks, receivers, halo=halo, shape=shape)
        return [
            [cut[o.linear] for o in grid.overlapping(grow_box(b.core, halo, shape)) if o != b]
            for b in self.blocks
        ]

    def start(self, phase: Phase, sources: _Sources) -> _Sources:
        """Finish labelled blocks first where the phase needs a halo around them."""
        if sources.finish is None or not any(phase.halo_in):
            return sources
        cores = self.executor.map(
            finish_block, sources.items, self.blocks, sources.relabels,
            finish=sources.finish, saved=self.saved,
        )  # fmt: skip
        strips = self.exchange(cores, phase.halo_in)
        return _Sources(cores, strips, [None] * len(self.blocks))

    def map_blocks(self, phase: Phase, sources: _Sources, **kwargs: Any) -> list[Any]:
        sources = self.start(phase, sources)
        return self.executor.map(
            run_block,
            sources.items,
            self.blocks,
            sources.strips,
            sources.relabels,
            self.own_stats(),
            steps=phase.steps,
            stats=dict(self.stats),
            shape=self.shape,
            halo=phase.halo_in,
            spacing=self.spacing,
            saved=self.saved,
            finish=sources.finish,
            **kwargs,
        )

    def statistic_phase(
        self, phase: Phase, sources: _Sources, label: str, keep_halo: tuple[int, ...]
    ) -> _Sources:
        executor = self.executor
        assert phase.statistic_step is not None
        stat_step = phase.statistic_step
        statistic = stat_step.op.statistic_for(stat_step.params)
        state = statistic.start()
        if self.stream:
            tiles = []
            partials = self.reduce(
                self.stream_map(
                    phase, keep_halo=keep_halo, reduce=(statistic, state), saved=self.saved
                ),
                statistic,
                state,
                label=label,
            )
        else:
            tiles = self.map_blocks(phase, sources, keep_halo=keep_halo, reduce=(statistic, state))
            partials = self.reduce(executor.map(tile_partial, tiles), statistic, state, label=label)
        for passes in itertools.count(1):
            if passes > MAX_STATISTIC_PASSES:
                raise RuntimeError(
                    f"{stat_step.key}: the statistic gave no result after "
                    f"{MAX_STATISTIC_PASSES} passes over the item; please report this"
                )
            try:
                result = statistic.combine(partials, state)
            except ValueError as error:  # say which step's statistic could not be taken
                raise ValueError(f"{stat_step.key}: {error}") from error
            if isinstance(result, Done):
                self.stats[stat_step.key] = result.value
                if result.per_block is not None:
                    self.block_stats[stat_step.key] = result.per_block
                if stat_step.op.makes_labels:
                    self.n_labels = int(result.value)
                break
            state = result
            if self.stream:  # another pass: recompute, without writing saved arrays again
                handles = self.stream_map(
                    phase, keep_halo=keep_halo, reduce=(statistic, state), saved=None
                )
            else:
                handles = executor.map(
                    tile_statistic,
                    tiles,
                    self.blocks,
                    statistic=statistic,
                    state=state,
                    shape=self.shape,
                )
            partials = self.reduce(handles, statistic, state)
        self.done.append(phase)
        return _Sources(tiles, self._none(), [None] * len(self.blocks))

    def reduce(
        self, handles: list[Any], statistic: GlobalStatistic, state: Any, *, label: str = ""
    ) -> list[Any]:
        """The blocks' partial results, merged on the workers in groups of ``FAN_IN`` (a
        tree) where the statistic can merge them, so the client receives at most
        ``FAN_IN`` of them however many blocks the item has. Progress (for a ``label``d
        pass) counts the blocks."""
        executor = self.executor
        progress = self.progress if label else None
        leaves = handles
        if getattr(statistic, "merge", None) is not None:
            while len(handles) > FAN_IN:
                groups = [handles[i : i + FAN_IN] for i in range(0, len(handles), FAN_IN)]
                handles = executor.map(merge_partials, groups, statistic=statistic, state=state)
        if handles is not leaves and progress is not None:
            executor.wait(leaves, label=label, progress=progress)
            return executor.gather(handles)
        return executor.gather(handles, label=label, progress=progress)

    def label_phase(self, phase: Phase, sources: _Sources, label: str) -> _Sources:
        executor, grid = self.executor, self.grid
        step = phase.connectivity
        assert step is not None
        connectivity = step.op.connectivity_of(step.params, grid.ndim)
        if self.stream:
            tiles = []
            summaries = self.stream_map(
                phase, keep_halo=(0,) * grid.ndim, label=step, saved=self.saved
            )
        else:
            tiles = self.map_blocks(phase, sources, keep_halo=(0,) * grid.ndim, label=step)
            summaries = executor.map(label_summary, tiles)
        neighbor_args, offset_args = [], []
        for block in self.blocks:
            present = []
            for d in neighbor_offsets(grid.ndim, connectivity):
                other = tuple(i + x for i, x in zip(block.index, d, strict=True))
                if grid.contains(other):
                    present.append((d, grid.block(other).linear))
            offset_args.append(present)
            neighbor_args.append([summaries[linear] for _, linear in present])
        results = executor.map(
            label_pairs,
            summaries,
            neighbor_args,
            [b.linear for b in self.blocks],
            offset_args,
            connectivity=connectivity,
        )
        gathered = executor.gather(results, label=label, progress=self.progress)
        ctx = _context(step, self.stats, grid.ndim, self.spacing)
        merge = merge_objects(
            [o for o, _ in gathered], [p for _, p in gathered], step.op.rule_for(step.params, ctx)
        )
        dtype = smallest_label_dtype(merge.n_labels)
        if step.op.finish is None:
            self.n_labels = merge.n_labels
        self.done.append(phase)
        self.relabel_lists.append(merge.relabels)
        self.finishes.append(Finish(step, dtype))
        return _Sources(tiles, self._none(), list(merge.relabels), Finish(step, dtype))

    def output_phase(
        self,
        phase: Phase,
        sources: _Sources,
        label: str,
        make_sink: Callable[[np.dtype], Sink],
    ) -> ItemRun:
        if self.plan.out_kind == "labels" and self.n_labels is not None:
            dtype = smallest_label_dtype(self.n_labels)
        else:
            dtype = self.plan.out_dtype
        sink = make_sink(dtype)
        ends = {"sink": sink, "out_dtype": dtype, "regions": self.regions}
        if self.stream:
            handles = self.stream_map(
                phase, keep_halo=(0,) * self.grid.ndim, saved=self.saved, **ends
            )
        else:
            handles = self.map_blocks(phase, sources, keep_halo=(0,) * self.grid.ndim, **ends)
        summaries = self.executor.gather(handles, label=label, progress=self.progress)
        written = None
        if self.regions is not None:
            faces = merge_rows([s.regions[1] for s in summaries if s.regions is not None])
            written = [s.regions[0] for s in summaries if s.regions is not None]
            written.append(self.regions.sink.write("part-faces", faces))
        return ItemRun(
            n_blocks=len(self.blocks),
            n_labels=self.n_labels if self.plan.out_kind == "labels" else None,
            out_dtype=np.dtype(dtype),
            stats=self.stats,
            seconds=time.perf_counter() - self.started,
            blocks=summaries,
            regions=written,
        )

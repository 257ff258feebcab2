"""Run a compiled pipeline over the blocks of one item: the client-side phase scheduler.

Each phase is one task per block (take the block's source, run every step, end with the
phase's partial result). The client submits each phase once and waits once: kept blocks stay
where they were computed; only partial results (histograms, face labels, object features) and
small summaries come back here, once per phase. The final phase writes whole storage units of
the output, relabelling in the same task. The code is split by role:

- :mod:`segflow.engine.kernels`: what runs on the workers (one block's share of a phase, and
  the phase ends: reduce, label, write);
- :mod:`segflow.engine.halo`: the halo exchange between neighbouring blocks;
- this module: the phases, submitted from the client.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segflow.engine.blocks import BlockGrid, grow_box
from segflow.engine.executor import Executor, ProgressCallback
from segflow.engine.grow import Growth
from segflow.engine.halo import cut_strips, read_core
from segflow.engine.kernels import (
    ArraySink,
    BlockSummary,
    Finish,
    Label,
    PhaseEnd,
    PhaseTask,
    Reduce,
    RegionsSpec,
    Sink,
    Write,
    _context,
    finish_block,
    label_pairs,
    label_summary,
    merge_partials,
    run_block,
    stream_block,
    tile_partial,
    tile_statistic,
)
from segflow.engine.pipeline import Phase, Plan, Step
from segflow.engine.resources import merge_resources
from segflow.faults import fault_point
from segflow.io.base import Reader
from segflow.ops.registry import Done, GlobalStatistic
from segflow.stitch.keep_ids import merge_keeping_ids
from segflow.stitch.labels import (
    BlockRelabel,
    merge_objects,
    neighbor_offsets,
    smallest_label_dtype,
)
from segflow.stitch.regions import merge_rows

__all__ = [
    "FAN_IN",
    "KEEP_LIMIT",
    "MAX_STATISTIC_PASSES",
    "ArraySink",
    "ItemRun",
    "RegionsSpec",
    "Sink",
    "can_stream",
    "merge_partials",
    "run_plan",
]

#: Items whose intermediates would exceed this many bytes (8 per pixel, over all workers) run
#: in streaming mode: nothing is kept between phases, each phase recomputes from the input.
KEEP_LIMIT = 1 << 30

FAN_IN = 16  # partial results merged per task in a statistic's tree reduction

#: A global statistic that has not finished after this many passes over the item stops the
#: item with an error naming its step: no statistic may loop for ever (Li's iteration stops
#: itself well before this; exact percentiles need at most 5 passes).
MAX_STATISTIC_PASSES = 1000


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
    n_resumed: int = 0  # output blocks an earlier, interrupted run had written
    warnings: list[str] = field(default_factory=list)  # one line each, for the user
    max_label: int | None = None  # the largest id (labels): n_labels, unless the scene grew
    n_reused: int = 0  # blocks a growing scene took from its previous version


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
    records: Callable[[np.dtype, int | None, Mapping[str, Any]], Any] | None = None,
    growth: Growth | None = None,
) -> ItemRun:
    """Run every phase of ``plan`` over ``grid`` and write the result through ``make_sink``.

    With ``growth`` (a growing scene, :mod:`segflow.engine.grow`), its untouched blocks
    take their previous output as their source and run none of the first phase's steps;
    labels are numbered to keep the previous version's ids
    (:mod:`segflow.stitch.keep_ids`).

    With ``records`` (``records(dtype, n_labels, stats)`` gives the
    :class:`~segflow.store.blocks.BlockRecords` of the output phase), each output block
    records itself once written, and blocks an earlier run recorded are not run again.

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
        records=records,
        growth=growth,
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


def phase_resources(phases: Sequence[Phase]) -> dict[str, float]:
    """What a block task running ``phases``' steps holds (``{"GPU": 1}`` for a model step)."""
    return merge_resources(s.op.resources_of(s.params) for p in phases for s in p.steps)


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
        records: Callable[[np.dtype, int | None, Mapping[str, Any]], Any] | None = None,
        growth: Growth | None = None,
    ) -> None:
        self.plan, self.grid, self.executor, self.reader = plan, grid, executor, reader
        self.blocks = grid.blocks()
        self.shape = grid.shape
        self.spacing = spacing
        self.saved = saved
        self.regions = regions
        self.stream = stream
        self.progress = progress
        self.records = records
        self._output_done = 0
        self.stats: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.block_stats: dict[str, Sequence[Any]] = {}  # Done.per_block, by Step.key
        self.n_labels: int | None = None
        self.max_label: int | None = None  # set where ids are not 1..n_labels (growth)
        self.growth = growth
        self.done: list[Phase] = []  # streaming: phases to replay, with their merges
        self.relabel_lists: list[Sequence[BlockRelabel]] = []
        self.finishes: list[Finish] = []
        self.started = time.perf_counter()

    def _output_progress(self, label: str, done: int, total: int) -> None:
        for _ in range(done - self._output_done):  # one hit per block, however reported
            fault_point("output-block-done")  # the crash tests' "killed mid output phase"
        self._output_done = done
        if self.progress is not None:
            self.progress(label, done, total)

    def _none(self) -> list[Any]:
        return [()] * len(self.blocks)

    def own_stats(self) -> list[dict[str, Any]]:
        """For each block, the statistics only it sees."""
        return [{k: v[b.linear] for k, v in self.block_stats.items()} for b in self.blocks]

    def task(self, phase: Phase, end: PhaseEnd, saved: Mapping[str, Sink] | None) -> PhaseTask:
        """What every block of ``phase`` gets: its steps, the statistics so far, its end."""
        return PhaseTask(
            steps=phase.steps,
            stats=dict(self.stats),
            shape=self.shape,
            end=end,
            halo=phase.halo_in,
            spacing=self.spacing,
            saved=saved,
        )

    def stream_map(
        self,
        phase: Phase,
        end: PhaseEnd,
        saved: Mapping[str, Sink] | None,
        only: Sequence[int] | None = None,
    ) -> list[Any]:
        """Streaming mode: one :func:`stream_block` task per block (of ``only``)."""
        pick = range(len(self.blocks)) if only is None else only
        own = self.own_stats()

        def call(group: Sequence[int], bare: bool) -> list[Any]:
            blocks = [self.blocks[i] for i in group]
            replay = [self._bare(p) if bare else p for p in self.done]
            now = self._bare(phase) if bare else phase
            reader = self._stored() if bare else self.reader
            return self.executor.map(
                stream_block,
                [reader] * len(blocks),
                blocks,
                [[r[b.linear] for r in self.relabel_lists] for b in blocks],
                [own[b.linear] for b in blocks],
                replay=replay,
                finishes=list(self.finishes),
                read_halo=(0,) * self.grid.ndim if bare else self.grid.halo,
                task=self.task(now, end, saved),
                resources=phase_resources([*replay, now]),
            )

        return self._split(pick, call)

    def _split(
        self, pick: Sequence[int], call: Callable[[Sequence[int], bool], list[Any]]
    ) -> list[Any]:
        """``call(blocks, bare)`` for the blocks of ``pick`` that run the pipeline, then
        (``bare``) for a growing scene's untouched ones; the handles in ``pick``'s order."""
        untouched = set() if self.growth is None else self.growth.untouched
        run = [i for i in pick if self.blocks[i].linear not in untouched]
        kept = [i for i in pick if self.blocks[i].linear in untouched]
        handles: dict[int, Any] = {}
        for group, bare in ((run, False), (kept, True)):
            if group:
                handles.update(zip(group, call(group, bare), strict=True))
        return [handles[i] for i in pick]

    def _bare(self, phase: Phase) -> Phase:
        """The first phase as an untouched block of a growing scene runs it: no steps, no
        halo (its source is its stored output); later phases as they are."""
        if phase is not self.plan.phases[0]:
            return phase
        return dataclasses.replace(phase, steps=(), halo_in=(0,) * self.grid.ndim)

    def _stored(self) -> Any:
        assert self.growth is not None
        return self.growth.stored

    def read_once(self) -> _Sources:
        """Sources for the first phase: each core read once, halos from strips.

        With no halo (or one block), in streaming mode, or where the halo is wider than a
        block, the first phase reads its region from the reader: a halo past the next block
        would make every block wait on strips from many others, (2 * halo / block + 1)^ndim
        of them, where reading the window costs about the same bytes.
        """
        readers = [self.reader] * len(self.blocks)
        grid = self.grid
        if self.growth is not None:  # each block reads its own window (or stored output)
            readers = [
                self._stored() if self.growth.is_untouched(b) else self.reader for b in self.blocks
            ]
            return _Sources(readers, self._none(), [None] * len(self.blocks))
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

    def map_blocks(
        self, phase: Phase, sources: _Sources, end: PhaseEnd, only: Sequence[int] | None = None
    ) -> list[Any]:
        sources = self.start(phase, sources)
        pick = range(len(self.blocks)) if only is None else only
        own = self.own_stats()

        def call(group: Sequence[int], bare: bool) -> list[Any]:
            now = self._bare(phase) if bare else phase
            return self.executor.map(
                run_block,
                [sources.items[i] for i in group],
                [self.blocks[i] for i in group],
                [sources.strips[i] for i in group],
                [sources.relabels[i] for i in group],
                [own[i] for i in group],
                task=self.task(now, end, self.saved),
                finish=sources.finish,
                resources=phase_resources([now]),
            )

        return self._split(pick, call)

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
                self.stream_map(phase, Reduce(statistic, state, keep_halo), self.saved),
                statistic,
                state,
                label=label,
            )
        else:
            tiles = self.map_blocks(phase, sources, Reduce(statistic, state, keep_halo))
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
                self._warn_if_mostly_nan(stat_step, result.counted)
                self.stats[stat_step.key] = result.value
                if result.per_block is not None:
                    self.block_stats[stat_step.key] = result.per_block
                if stat_step.op.gives_labels(stat_step.params):
                    self.n_labels = int(result.value)
                break
            state = result
            if self.stream:  # another pass: recompute, without writing saved arrays again
                handles = self.stream_map(phase, Reduce(statistic, state, keep_halo), None)
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

    def _warn_if_mostly_nan(self, step: Step, n: int | None) -> None:
        """Say so when the step's statistic saw ``n`` values, less than half of the item:
        NaN in the input spreads through filters (a Gaussian takes every pixel within its
        reach, as scipy's does), and the result then describes what little is left."""
        total = math.prod(self.shape)
        if n is None or n >= total / 2:
            return
        self.warnings.append(
            f"{step.key}: {1 - n / total:.1%} of the item is NaN where this step takes its "
            f"statistic (NaN in the input spreads through filters such as gaussian); the "
            f"result describes the rest only: fill or mask the NaN first"
        )

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
        end = Label(step, None if self.growth is None else self.growth.stored)
        if self.stream:
            tiles = []
            summaries = self.stream_map(phase, end, self.saved)
        else:
            tiles = self.map_blocks(phase, sources, end)
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
        objects, pairs = [o for o, _ in gathered], [p for _, p in gathered]
        if self.growth is not None:  # plan_growth allows `label` only: no object rule
            merge = merge_keeping_ids(objects, pairs, self.growth.max_label)
            self.max_label = merge.max_label
        else:
            merge = merge_objects(objects, pairs, step.op.rule_for(step.params, ctx))
        dtype = smallest_label_dtype(merge.max_label or merge.n_labels)
        if step.op.finish is None:
            self.n_labels = merge.n_labels
        elif step.op.keeps_ids and self.n_labels is not None:
            # Ids kept, some objects dropped: the count is the kept objects', the largest
            # id (the dtype, a growing scene's next id) stays the input's.
            self.max_label = self.max_label or self.n_labels
            self.n_labels = merge.n_labels
        self.done.append(phase)
        self.relabel_lists.append(merge.relabels)
        self.finishes.append(Finish(step, dtype))
        return _Sources(tiles, self._none(), list(merge.relabels), Finish(step, dtype))

    def _after_blocks(self, sink: Sink, todo: Sequence[int], handles: Sequence[Any]) -> None:
        """The sink's work that follows the blocks (:class:`Sink`), submitted now."""
        after_blocks = getattr(sink, "after_blocks", None)
        if after_blocks is not None:
            blocks = [(self.blocks[i].core, h) for i, h in zip(todo, handles, strict=True)]
            after_blocks(self.executor, blocks)

    def output_phase(
        self,
        phase: Phase,
        sources: _Sources,
        label: str,
        make_sink: Callable[[np.dtype], Sink],
    ) -> ItemRun:
        if self.plan.out_kind == "labels" and self.n_labels is not None:
            dtype = smallest_label_dtype(self.max_label or self.n_labels)
        else:
            dtype = self.plan.out_dtype
        sink = make_sink(dtype)
        records = None if self.records is None else self.records(dtype, self.n_labels, self.stats)
        done = {} if records is None else records.load()
        todo = [b.linear for b in self.blocks if b.linear not in done]
        count_ids = self.plan.out_kind == "labels" and self.n_labels is None
        end = Write(sink, dtype, self.regions, records, count_ids)
        if self.stream:
            handles = self.stream_map(phase, end, self.saved, todo)
        else:
            handles = self.map_blocks(phase, sources, end, todo)
        self._after_blocks(sink, todo, handles)
        fresh = self.executor.gather(handles, label=label, progress=self._output_progress)
        by_block = {**done, **dict(zip(todo, fresh, strict=True))}
        summaries = [by_block[b.linear] for b in self.blocks]
        written = None
        if self.regions is not None:
            faces = merge_rows([s.regions[1] for s in summaries if s.regions is not None])
            written = [s.regions[0] for s in summaries if s.regions is not None]
            written.append(self.regions.sink.write("part-faces", faces))
        if count_ids:  # ids not numbered by stitching (from_boxes'): count those written
            ids = [s.ids for s in summaries if s.ids is not None]
            self.n_labels = len(np.unique(np.concatenate(ids))) if ids else 0
        return ItemRun(
            n_blocks=len(self.blocks),
            n_resumed=len(done),
            n_labels=self.n_labels if self.plan.out_kind == "labels" else None,
            out_dtype=np.dtype(dtype),
            stats=self.stats,
            seconds=time.perf_counter() - self.started,
            blocks=summaries,
            regions=written,
            warnings=self.warnings,
            max_label=self.max_label or self.n_labels if self.plan.out_kind == "labels" else None,
            n_reused=0 if self.growth is None else len(self.growth.untouched),
        )

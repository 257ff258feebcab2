"""What runs on the workers: one block's share of one phase.

Each phase is one task per block: take the block's source (the input, a kept tile, or a
labelled block to finish), run every step, then end the phase. How a phase ends is a small
object (:class:`Reduce`, :class:`Label`, :class:`Write`): adding a new kind of end is one more
class with an ``end`` method, and touches neither the others nor the scheduler's other phases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from segflow.engine.blocks import Block, Box, grow_box, intersect, relative, shrink_box
from segflow.engine.halo import Strips, assemble
from segflow.engine.pipeline import Phase, Step
from segflow.engine.resources import get_resource
from segflow.io.base import Reader
from segflow.ops.registry import GlobalStatistic, OpContext, map_statistic
from segflow.stitch.labels import (
    BlockObjects,
    BlockRelabel,
    Faces,
    block_faces,
    block_order,
    decide_block,
    face_pairs,
    first_pixels,
)
from segflow.stitch.regions import RegionPartial, measure_regions


class Sink(Protocol):
    """Where a block's core result goes. Must pickle cheaply.

    A sink may also have ``after_blocks(executor, written)``, called on the client once
    the output phase's block tasks are submitted (``written``: ``(region, handle)`` of
    each): it may submit work that depends on those handles (the OME-Zarr pyramid's
    storage units that span blocks), to run as their blocks finish.
    """

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
    ids: np.ndarray | None = None  # the ids in the core, where the count is not known before


@dataclass(frozen=True)
class Source:
    """Where a block's data came from, for phase ends that can reuse it (kept labels)."""

    item: Any
    relabel: BlockRelabel | None = None
    finish: Finish | None = None


class PhaseEnd(Protocol):
    """How a phase ends, once its steps ran on the block: ``end`` returns the block's
    result (kept on the worker or sent to the caller)."""

    def end(
        self, task: PhaseTask, block: Block, box: Box, data: np.ndarray, source: Source
    ) -> Any: ...


@dataclass(frozen=True)
class PhaseTask:
    """What every block of one phase shares: the steps, what they know, how the phase ends."""

    steps: tuple[Step, ...]
    stats: Mapping[str, Any]
    shape: tuple[int, ...]
    end: PhaseEnd
    halo: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    saved: Mapping[str, Sink] | None = None


@dataclass(frozen=True)
class Reduce:
    """End with a statistic partial of the core; keep the block (grown by ``keep_halo``)."""

    statistic: GlobalStatistic
    state: Any
    keep_halo: tuple[int, ...]

    def end(
        self, task: PhaseTask, block: Block, box: Box, data: np.ndarray, source: Source
    ) -> Tile:
        keep = intersect(grow_box(block.core, self.keep_halo, task.shape), box)
        data = data[(slice(None), *relative(keep, box))]
        tile = Tile(keep, data)
        core = _core_of(keep, data, block.core)
        tile.partial = map_statistic(self.statistic, core, self.state, block.core, task.shape)
        return tile


@dataclass(frozen=True)
class Label:
    """End with the core labelled locally (``step`` is the connectivity step). With
    ``previous`` (a growing scene's stored output, :class:`segflow.engine.grow.
    StoredOutput`), each label also says which id its pixels had there (its claim)."""

    step: Step
    previous: Any = None

    def end(
        self, task: PhaseTask, block: Block, box: Box, data: np.ndarray, source: Source
    ) -> LabelTile:
        core = _core_of(box, data, block.core)
        tile = label_block(
            core, block, self.step, stats=task.stats, shape=task.shape, spacing=task.spacing
        )
        if self.previous is not None:  # a reused block's data are its stored ids
            reused = type(source.item) is type(self.previous) and not task.steps
            stored = core[0] if reused else None
            claims = self.previous.old_ids(tile.labels, block.core, stored)
            objects = tile.summary.objects
            tile.summary.objects = replace(
                objects, node_claims=claims[objects.nodes], own_claims=claims[tile.keep]
            )
        return tile


@dataclass(frozen=True)
class Write:
    """End with the core written through ``sink`` (as ``out_dtype``); with ``regions``,
    measure its objects in the same task; with ``count_ids``, keep the ids in the core (the
    object count of labels whose ids were not numbered by stitching, as ``from_boxes``')."""

    sink: Sink
    out_dtype: np.dtype | None = None
    regions: RegionsSpec | None = None
    records: Any = None  # store.blocks.BlockRecords: a block records itself once written
    count_ids: bool = False

    def end(
        self, task: PhaseTask, block: Block, box: Box, data: np.ndarray, source: Source
    ) -> BlockSummary:
        core = _core_of(box, data, block.core)
        result = _squeeze(core)
        if self.out_dtype is None:
            stored = _storable(result)
        else:
            stored = result.astype(self.out_dtype, copy=False)
        summary = BlockSummary(
            block.core, self.sink.write(block.core, stored), int(np.count_nonzero(stored))
        )
        if self.regions is not None:
            summary.regions = self._measure(task, block, stored, source)
        if self.count_ids:
            summary.ids = np.unique(stored[stored != 0])
        if self.records is not None:
            self.records.write(block.linear, summary)
        return summary

    def _measure(
        self, task: PhaseTask, block: Block, stored: np.ndarray, source: Source
    ) -> tuple[Any, RegionPartial]:
        assert self.regions is not None
        item, relabel, finish = source.item, source.relabel, source.finish
        if isinstance(item, LabelTile) and not task.steps and finish_is_ids(finish):
            assert relabel is not None and finish is not None
            # The local labels are dense already: no sort of the block to number its objects.
            dense, finals = item.labels, relabel.table(item.keep, np.dtype(np.int64))
            by_class = finish.step.op.reports_classes(finish.step.params)
            classes = item.source[0] if by_class and item.source is not None else None
        else:
            uniq, inverse = np.unique(stored, return_inverse=True)
            if uniq[0] != 0:
                uniq, inverse = np.concatenate([[0], uniq]), inverse + 1
            dense, finals, classes = inverse.reshape(stored.shape), uniq.astype(np.int64), None
        intensity = (
            None if self.regions.intensity is None else self.regions.intensity.read(block.core)
        )
        rows, on_faces = measure_regions(dense, finals, block.core, intensity, classes)
        complete = self.regions.sink.write(f"part-{block.linear:06d}", rows.take(~on_faces))
        return complete, rows.take(on_faces)


def _context(
    step: Step,
    stats: Mapping[str, Any],
    ndim: int,
    spacing: tuple[float, ...],
    box: Box = (),
    shape: tuple[int, ...] = (),
    resource: Any = None,
    source: np.ndarray | None = None,
) -> OpContext:
    return OpContext(
        spatial_ndim=ndim,
        stat=stats.get(step.stat_key),
        spacing=spacing,
        box=box,
        shape=shape,
        resource=resource,
        source=source,
    )


def _core_of(box: Box, data: np.ndarray, core: Box) -> np.ndarray:
    return data[(slice(None), *relative(core, box))]


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
        saved[step.save_as].write(block.core, _storable(_squeeze(out)))
    return out


def run_block(
    source: Reader | Tile | LabelTile | np.ndarray,
    block: Block,
    strips: Strips = (),
    relabel: BlockRelabel | None = None,
    own_stats: Mapping[str, Any] | None = None,
    *,
    task: PhaseTask,
    finish: Finish | None = None,
) -> Any:
    """One block's share of one phase: take its source, run ``task.steps``, then end the
    phase as ``task.end`` says (a reduction partial, local labels, or a write of the core).

    ``source`` is the kept tile of the previous phase, a labelled block to finish with
    ``relabel``, this block's core (then ``strips`` complete its ``task.halo``), or a reader
    to read the block's region from. ``own_stats`` are the statistics only this block sees
    (``Done.per_block``).
    """
    if own_stats:
        task = replace(task, stats={**task.stats, **own_stats})
    shape = task.shape
    if isinstance(source, Tile):
        box, data = source.box, source.data
    elif isinstance(source, LabelTile):
        assert relabel is not None and finish is not None
        box = block.core
        data = finish_block(source, block, relabel, finish=finish, saved=task.saved)
    elif isinstance(source, np.ndarray):
        box = grow_box(block.core, task.halo, shape)
        data = assemble(source, block, strips, box)
    else:
        box = grow_box(block.core, task.halo, shape)
        data = source.read(box)
    box, data = apply_steps(
        task.steps, box, data, block, task.stats, shape, task.spacing, task.saved
    )
    return task.end.end(task, block, box, data, Source(source, relabel, finish))


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
    start_box, start = box, data
    for step in steps:
        resource = get_resource(step.op, step.params)  # built once per process, then cached
        source = start[(slice(None), *relative(box, start_box))]  # a view: no copy
        ctx = _context(step, stats, ndim, spacing, box, shape, resource, source)
        data = step.op.apply(data, step.params, ctx)
        if step.op.kind in ("local", "global"):  # a global step's halo: 0 unless declared
            inner = shrink_box(box, step.op.halo_of(step.params, ndim, spacing), shape)
            data, box = data[(slice(None), *relative(inner, box))], inner
        if step.save_as is not None and saved is not None:
            core = _core_of(box, data, block.core)
            saved[step.save_as].write(block.core, _storable(_squeeze(core)))
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
    task: PhaseTask,
) -> Any:
    """One phase of one block in streaming mode: nothing was kept, so recompute.

    Reads the block from the input again and replays the earlier phases (their statistics
    and relabel tables are known now), then runs this phase with :func:`run_block`. Returns
    only what the caller needs: a statistic partial, the label summary, or the block summary.
    Intermediate writes (``save_as``) happen only in the phase that first computes them.
    """
    task = replace(task, stats={**task.stats, **own_stats}, halo=read_halo)
    stats, shape, spacing = task.stats, task.shape, task.spacing
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
    result = run_block(source, block, (), relabel, task=task, finish=finish)
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


def _squeeze(data: np.ndarray) -> np.ndarray:
    """A block as stored: without its channel axis when it has one channel; several
    channels keep it (the array's leading ``class`` axis)."""
    return data[0] if data.shape[0] == 1 else data


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

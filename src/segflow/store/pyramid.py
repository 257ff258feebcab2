"""The OME-Zarr pyramid of an item's output, built by the blocks that write the output.

Reading a finished item back to build its pyramid (:func:`segflow.store.ome.write_pyramid`)
is a second pass over every pixel, which cost more than the segmentation itself (8192^2
sobel: 5.0 s with the view against 1.7 s without). Here each block, when it writes its part
of the output (the final ids: the write is the last thing a block does, after relabelling),
also writes:

- level 0 (the copy of the output the OME label image needs), as the bytes the output's
  storage units were just encoded to (both arrays share chunks, shards and codecs): on a
  local store hard links to the output's files, so nothing is written or stored twice;
- every storage unit of a level whose footprint lies inside the block, downsampled from
  what the block holds (level k from level k - 1, as the read-back does, so the values are
  the same bit for bit);
- for a level whose storage units span blocks, its share of that level into a temporary,
  uncompressed *scratch* array chunked by block.

The small second step writes only the storage units no block owned: from the scratch array
where the blocks could compute the level, else (levels too coarse for a block to hold whole
windows of) from the previous level, which is small by then. Its tasks are submitted with
the blocks' (:meth:`PyramidSink.after_blocks`), each depending on the blocks under its
unit, so they run as those blocks finish rather than after the last one; once every block
is written, :func:`finish_pyramid` waits for them (or, where none were submitted, runs
them), removes the scratch arrays and writes the OME metadata.

A level ``k`` is computed in the blocks when the block side is a multiple of its factor
along every axis with more than one block (the windows of the level then never cross a
block's edge).

Blocks are assumed to follow the grid the pyramid was planned for (``grid``: the engine's
block shape, or by default the storage unit): a write that does not is refused, since the
second step would then leave storage units unwritten.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow.errors import StoreError
from segflow.io.base import ItemInfo
from segflow.store.ome import (
    PYRAMID_SUFFIX,
    BaseArray,
    Method,
    PyramidLevel,
    create_level,
    downsample,
    downsample_method,
    level_storage,
    plan_levels,
    unit_regions,
    write_pyramid_metadata,
)

Region = tuple[slice, ...]
SCRATCH_PREFIX = "scratch-"  # scratch arrays in the pyramid group: gone before the check


@dataclass(frozen=True)
class PyramidPlan:
    """The levels of one output's pyramid and who writes each storage unit (picklable)."""

    root: str
    item_id: str
    name: str  # the output array the pyramid is built from
    levels: tuple[PyramidLevel, ...]
    units: tuple[tuple[int, ...], ...]  # the spatial storage unit of each level
    grid: tuple[int, ...]  # the block core shape the writes follow (clipped to the item)
    computed: int  # levels 1..computed are computed in the blocks
    method: Method
    n_lead: int = 0  # leading channel axes, stored whole
    token: str = ""  # names this plan's arrays in a worker's cache of open arrays

    @property
    def group(self) -> str:
        return f"{self.name}{PYRAMID_SUFFIX}"

    def path(self, k: int) -> str:
        return f"{self.group}/{self.levels[k].path}"

    def scratch_path(self, k: int) -> str:
        return f"{self.group}/{SCRATCH_PREFIX}{k}"

    def step(self, k: int) -> tuple[int, ...]:
        """The factor from level ``k - 1`` to level ``k``."""
        before, after = self.levels[k - 1].factor, self.levels[k].factor
        return tuple(a // b for a, b in zip(after, before, strict=True))

    def owned(self, k: int, region: Region) -> bool:
        """Whether one block computes storage unit ``region`` of level ``k`` whole."""
        if k > self.computed:
            return False
        shape0 = self.levels[0].shape
        for s, f, b, n in zip(region, self.levels[k].factor, self.grid, shape0, strict=True):
            if (s.start * f) // b != (min(s.stop * f, n) - 1) // b:
                return False
        return True

    def loose(self, k: int) -> list[Region]:
        """The storage units of level ``k`` no block writes: the second step's."""
        level = self.levels[k]
        return [r for r in unit_regions(level.shape, self.units[k]) if not self.owned(k, r)]

    def scratch_chunk(self, k: int) -> tuple[int, ...]:
        """A block's share of level ``k``: the chunk of its scratch array."""
        level, shape0 = self.levels[k], self.levels[0].shape
        return tuple(
            n if b >= n0 else b // f
            for n, n0, b, f in zip(level.shape, shape0, self.grid, level.factor, strict=True)
        )


def plan_pyramid(
    root: str,
    info: ItemInfo,
    name: str,
    base: BaseArray,
    *,
    grid: Sequence[int] | None = None,
    max_levels: int | None = None,
) -> PyramidPlan:
    """Plan the pyramid of output ``name`` (of storage ``base``) written in blocks of
    ``grid`` (default: the output's storage unit).

    Examples
    --------
    >>> from segflow.io import ArrayReader
    >>> info = ArrayReader(np.zeros((700, 1000), np.uint8), "a").info
    >>> base = BaseArray(np.dtype("uint8"), 0, (), (), (256, 256), None)
    >>> plan = plan_pyramid("", info, "mask", base, grid=(256, 512))
    >>> [lv.shape for lv in plan.levels], plan.computed
    ([(700, 1000), (350, 500), (175, 250)], 2)
    >>> len(plan.loose(1)), len(plan.loose(2))  # level 1: the top row of units spans 2 blocks
    (2, 1)
    """
    shape = info.spatial_shape
    unit = base.shards or base.chunks
    blocks = tuple(min(int(b), n) for b, n in zip(grid or unit, shape, strict=True))
    levels = tuple(plan_levels(shape, info.spacing, base.chunks, max_levels=max_levels))
    computed = 0
    for level in levels[1:]:
        fits = all(
            b >= n or b % f == 0 for b, n, f in zip(blocks, shape, level.factor, strict=True)
        )
        if not fits:
            break
        computed += 1
    units = []
    for level in levels:
        chunk, shard = level_storage(base.chunks, base.shards, level.shape)
        units.append(shard or chunk)
    return PyramidPlan(
        token=uuid.uuid4().hex,
        root=root,
        item_id=info.id,
        name=name,
        levels=levels,
        units=tuple(units),
        grid=blocks,
        computed=computed,
        method=downsample_method(base.dtype),
        n_lead=len(base.lead_shape),
    )


def prepare_pyramid(plan: PyramidPlan, info: ItemInfo, base: BaseArray) -> None:
    """Create the pyramid group, its level arrays and the scratch arrays of the levels
    whose storage units span blocks (before the first block writes)."""
    import zarr

    zarr.open_group(plan.root, mode="a", zarr_format=3).require_group(f"{info.id}/{plan.group}")
    for k, level in enumerate(plan.levels):
        create_level(plan.root, info, plan.path(k), base, level.shape)
    for k in range(1, plan.computed + 1):
        if not plan.loose(k):
            continue
        lead = base.lead_shape
        zarr.create_array(
            plan.root,
            name=f"{info.id}/{plan.scratch_path(k)}",
            shape=(*lead, *plan.levels[k].shape),
            dtype=base.dtype,
            chunks=(*lead, *plan.scratch_chunk(k)),
            compressors=None,  # written once, read once, removed: not worth encoding
            fill_value=base.fill_value,
            overwrite=True,
            zarr_format=3,
        )


def is_prepared(plan: PyramidPlan) -> bool:
    """Whether every array :func:`prepare_pyramid` creates for ``plan`` exists."""
    from segflow.store.fs import fresh_fs

    paths = [plan.path(k) for k in range(len(plan.levels))] + [
        plan.scratch_path(k) for k in range(1, plan.computed + 1) if plan.loose(k)
    ]
    fs, _ = fresh_fs(str(plan.root))
    for path in paths:
        _, inner = fresh_fs(f"{str(plan.root).rstrip('/')}/{plan.item_id}/{path}/zarr.json")
        if not fs.exists(inner):
            return False
    return True


class PyramidSink:
    """The sink of an output with a pyramid: writes a block's region of the output, then
    its share of every level (picklable, and small: each task gets its own copy, and the
    arrays it writes are opened once per worker process, see :func:`_writer`)."""

    def __init__(self, plan: PyramidPlan) -> None:
        self.plan = plan
        _SUBMITTED.pop(_key(plan), None)  # an earlier, failed run's tasks: not this one's

    def write(self, region: Region, data: np.ndarray) -> None:
        """Write ``data`` (a block's output over ``region``) and its pyramid share."""
        self._check_grid(region)
        plan = self.plan
        base, level0 = _writer(plan, plan.name), _writer(plan, plan.path(0))
        base.write(region, data)
        if not _copy_units(base, level0, region):
            level0.write(region, data)
        box = region
        for k in range(1, self.plan.computed + 1):
            step = self.plan.step(k)
            data = downsample(data, step, self.plan.method)
            box = _reduced(box, step, self.plan.levels[k].shape)
            self._write_level(k, box, data)

    def _write_level(self, k: int, box: Region, data: np.ndarray) -> None:
        """The storage units of level ``k`` the block owns; its whole share of the level
        into the scratch array where a unit it touches spans blocks."""
        plan = self.plan
        spills = False
        for unit in _units_touching(box, plan.units[k], plan.levels[k].shape):
            if plan.owned(k, unit):
                where: tuple[Any, ...] = (Ellipsis, *_relative(unit, box))
                _writer(plan, plan.path(k)).write(unit, data[where])
            else:
                spills = True
        if spills:
            _writer(plan, plan.scratch_path(k)).write(box, data)

    def after_blocks(self, executor: Any, written: Sequence[tuple[Region, Any]]) -> None:
        """Submit the second step's tasks now, each after the blocks of ``written``
        (``(region, handle)`` of each block task) under its unit; :func:`finish_pyramid`
        waits for them. Blocks not in ``written`` (a resumed item's) are on disk already."""
        while len(_SUBMITTED) >= 256:  # items that failed before their finish step
            del _SUBMITTED[next(iter(_SUBMITTED))]  # (finish_pyramid submits anew if needed)
        _SUBMITTED[_key(self.plan)] = _submit_units(self.plan, executor, written)

    def _check_grid(self, region: Region) -> None:
        shape, grid = self.plan.levels[0].shape, self.plan.grid
        for s, b, n in zip(region, grid, shape, strict=True):
            if s.start % b or (s.stop % b and s.stop != n):
                raise StoreError(
                    f"array '{self.plan.item_id}/{self.plan.name}': region "
                    f"{[(x.start, x.stop) for x in region]} does not follow the blocks "
                    f"{grid} its OME-Zarr pyramid was planned for"
                )

    def __repr__(self) -> str:
        return f"PyramidSink({self.plan.root!r}, {self.plan.item_id!r}, {self.plan.name!r})"


# Writers of the arrays of the plans this process wrote lately, by plan token and path: a
# block task gets its own copy of the sink, and opening 4-6 arrays (reading and parsing
# their zarr.json) for every block cost 0.3-0.4 s of CPU per 8192^2 item.
_WRITERS: dict[tuple[str, str], Any] = {}


# The second step's tasks submitted with the output's blocks (PyramidSink.after_blocks), by
# (root, item, output): finish_pyramid, which plans the pyramid again, waits for them.
_SUBMITTED: dict[tuple[str, str, str], list[Any]] = {}


def _key(plan: PyramidPlan) -> tuple[str, str, str]:
    return (str(plan.root), plan.item_id, plan.name)


def _writer(plan: PyramidPlan, path: str) -> Any:
    """The writer of array ``path`` (in the item group) of ``plan``, opened once here."""
    from segflow.store.layout import ZarrRegionWriter

    key = (plan.token, path)
    writer = _WRITERS.get(key)
    if writer is None:
        if len(_WRITERS) > 256:  # plans of items long done
            _WRITERS.clear()
        writer = _WRITERS[key] = ZarrRegionWriter(plan.root, plan.item_id, path)
    return writer


def finish_pyramid(
    plan: PyramidPlan,
    info: ItemInfo,
    base: BaseArray,
    *,
    executor: Any,
    categories: Sequence[tuple[int, str, str | None]] = (),
    kind: str = "labels",
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The second step, once every block is written: the storage units that span blocks
    (from the scratch arrays, or from the previous level beyond what blocks compute), then
    the scratch arrays go and the OME metadata is written. Returns every level array, as
    :func:`segflow.store.ome.write_pyramid` does. The units' tasks were submitted with
    the blocks (:meth:`PyramidSink.after_blocks`): here they are waited for."""
    try:
        submitted = _SUBMITTED.pop(_key(plan), None)
        if submitted is None:  # not submitted with the blocks: every block is written now
            submitted = _submit_units(plan, executor, [])
        executor.gather(submitted, label="pyramid")
        _remove_scratch(plan)
        return write_pyramid_metadata(
            plan.root, info, plan.name, plan.levels, base, categories=categories, kind=kind
        )
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"item '{info.id}': cannot write the OME-Zarr pyramid of '{plan.name}' "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _submit_units(
    plan: PyramidPlan, executor: Any, written: Sequence[tuple[Region, Any]]
) -> list[Any]:
    """Submit a task for every storage unit no block writes; return their handles.

    A unit of a level the blocks computed waits for the blocks of ``written`` under it (it
    is copied from their scratch array); a unit of a coarser level for every block and
    every unit of the level before. They run ahead of the blocks submitted before them
    once their blocks are done (a higher priority), so most overlap the blocks' writes."""
    from segflow.store.layout import ZarrRegionWriter

    def writer(path: str) -> ZarrRegionWriter:
        return ZarrRegionWriter(plan.root, plan.item_id, path)

    before = [handle for _, handle in written]
    submitted: list[Any] = []
    for k in range(1, len(plan.levels)):
        units = plan.loose(k)
        if not units:
            continue
        if k <= plan.computed:  # from its scratch array, after the blocks under each unit
            source, step = writer(plan.scratch_path(k)), (1,) * len(units[0])
            factor = plan.levels[k].factor
            after = [[h for r, h in written if _meets(r, unit, factor)] for unit in units]
        else:  # from the level before, after all of it
            source, step = writer(plan.path(k - 1)), plan.step(k)
            after = [before] * len(units)
        handles = executor.map(
            _finish_unit,
            [source] * len(units),
            [writer(plan.path(k))] * len(units),
            units,
            [step] * len(units),
            [plan.method] * len(units),
            after,
            priority=1,
        )
        submitted += handles
        before = before + handles
    return submitted


def _meets(region: Region, unit: Region, factor: Sequence[int]) -> bool:
    """Whether level-0 ``region`` meets the footprint of a level's storage ``unit``."""
    return all(
        r.start < u.stop * f and u.start * f < r.stop
        for r, u, f in zip(region, unit, factor, strict=True)
    )


def _finish_unit(
    source: Any,
    target: Any,
    region: Region,
    step: tuple[int, ...],
    method: Method,
    after: Sequence[Any] = (),
) -> None:
    """One task of the second step: read ``source`` under ``region`` (grown by ``step``),
    write it reduced (a scratch array holds the level's values already: step 1).
    ``after``: what the task waited for (the block summaries of its blocks), unused."""
    if all(f == 1 for f in step):
        target.write(region, source.read(region))
        return
    grown = tuple(slice(s.start * f, s.stop * f) for s, f in zip(region, step, strict=True))
    target.write(region, downsample(source.read(grown), step, method))


def _remove_scratch(plan: PyramidPlan) -> None:
    from segflow.store.fs import fresh_fs

    for k in range(1, plan.computed + 1):
        fs, path = fresh_fs(f"{str(plan.root).rstrip('/')}/{plan.item_id}/{plan.scratch_path(k)}")
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _reduced(box: Region, step: Sequence[int], shape: Sequence[int]) -> Region:
    """The next level's region of a block's ``box`` (its start a multiple of ``step``)."""
    return tuple(
        slice(s.start // f, min(-(-s.stop // f), n))
        for s, f, n in zip(box, step, shape, strict=True)
    )


def _units_touching(box: Region, unit: Sequence[int], shape: Sequence[int]) -> list[Region]:
    """The storage units of a level (of spatial ``shape``) that meet ``box``."""
    ranges = [
        [slice(i * u, min((i + 1) * u, n)) for i in range(s.start // u, -(-s.stop // u))]
        for s, u, n in zip(box, unit, shape, strict=True)
    ]
    return [tuple(r) for r in _product(ranges)]


def _product(ranges: list[list[slice]]) -> list[list[slice]]:
    out: list[list[slice]] = [[]]
    for options in ranges:
        out = [[*head, o] for head in out for o in options]
    return out


def _relative(region: Region, box: Region) -> Region:
    return tuple(
        slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, box, strict=True)
    )


def _copy_units(source: Any, target: Any, region: Region) -> bool:
    """Give ``target`` the encoded storage units of ``source`` under ``region`` (arrays of
    the same shape, dtype, chunks, shards and codecs): no second encoding of the same values.
    On a local store each unit is a hard link to the source's file (no bytes copied, none
    stored twice; zarr replaces a unit's file when it rewrites it, so the arrays stay
    independent), elsewhere a copy. False (nothing done) where the arrays are not stored
    alike or a unit is not on disk."""
    a, b = source._open(), target._open()
    if not _stored_alike(a.metadata, b.metadata):
        return False
    unit = a.metadata.chunk_grid.chunk_shape
    n_lead = a.ndim - len(region)
    spans = [range(1)] * n_lead + [
        range(s.start // u, -(-s.stop // u)) for s, u in zip(region, unit[n_lead:], strict=True)
    ]
    keys = [a.metadata.encode_chunk_key(c) for c in _grid_coords(spans)]
    if _link_units(a.store_path, b.store_path, keys):
        return True
    return _copy_encoded(a.store_path, b.store_path, keys)


def _link_units(source: Any, target: Any, keys: Sequence[str]) -> bool:
    """Hard-link each unit file of a local store (written aside, then renamed into place,
    as zarr writes); False where the stores are not local or links are refused."""
    import os
    import uuid

    from zarr.storage import LocalStore

    if not (isinstance(source.store, LocalStore) and isinstance(target.store, LocalStore)):
        return False
    for key in keys:
        src = os.path.join(str(source.store.root), source.path, key)
        dst = os.path.join(str(target.store.root), target.path, key)
        aside = f"{dst}.{uuid.uuid4().hex}.partial"  # what drop_partial_writes removes
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, aside)
            os.replace(aside, dst)
        except OSError:  # no such unit, or a file system without hard links: copy instead
            return False
    return True


def _copy_encoded(source: Any, target: Any, keys: Sequence[str]) -> bool:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    prototype = default_buffer_prototype()
    buffers = [sync(source.store.get(f"{source.path}/{k}", prototype=prototype)) for k in keys]
    if any(buffer is None for buffer in buffers):
        return False
    for key, buffer in zip(keys, buffers, strict=True):
        sync(target.store.set(f"{target.path}/{key}", buffer))
    return True


def _grid_coords(spans: list[range]) -> list[tuple[int, ...]]:
    return [
        tuple(s[i] for s, i in zip(spans, index, strict=True))
        for index in np.ndindex(*(len(s) for s in spans))
    ]


def _stored_alike(a: Any, b: Any) -> bool:
    return bool(
        a.shape == b.shape
        and a.data_type == b.data_type
        and a.chunk_grid == b.chunk_grid
        and a.chunk_key_encoding == b.chunk_key_encoding
        and a.codecs == b.codecs
        and np.array_equal(np.asarray(a.fill_value), np.asarray(b.fill_value), equal_nan=True)
    )


__all__ = [
    "PyramidPlan",
    "PyramidSink",
    "finish_pyramid",
    "is_prepared",
    "plan_pyramid",
    "prepare_pyramid",
]

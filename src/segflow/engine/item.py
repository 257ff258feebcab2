"""Segment one item of a collection into the output store: the unit a flow task runs."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segflow.engine.api import run_item
from segflow.engine.blocks import block_shape_for
from segflow.engine.executor import Executor, ProgressCallback
from segflow.engine.interrupt import stop_requested
from segflow.engine.pipeline import compile_pipeline
from segflow.faults import fault_point
from segflow.io.base import ItemInfo, Reader
from segflow.store.writers import ActiveWriters, WriteTarget

# The Prefect layer's folders inside the package (links in a checkout, folders in the wheel).
PREFECT_LAYER = ("flows", "tasks")  # segflow.flows, segflow.tasks: not the engine


@functools.cache
def code_version() -> str:
    """The version of the code that segments items: ``VERSION+src.DIGEST``.

    ``DIGEST`` is 12 hex digits of :func:`source_digest` of this package, so any change to the
    engine's sources (a commit, or an uncommitted edit in a checkout) gives a new code
    version and the next run redoes the collection's items, while a change elsewhere (the
    Prefect layer, docs, configs) does not. A wheel and the checkout it was built from agree.
    """
    from segflow import __version__

    return f"{__version__}+src.{source_digest(Path(__file__).parents[1])[:12]}"


def source_digest(package: Path) -> str:
    """SHA-256 over the ``.py`` files of the engine package folder ``package``.

    Files are taken in order of their path relative to ``package`` (with ``/``), each as its
    path and its bytes. Left out: ``flows/`` and ``tasks/`` directly under ``package`` (the
    Prefect layer, links in a checkout and folders in the wheel) and ``__pycache__``.
    """
    digest = hashlib.sha256()
    for path in sorted(_engine_sources(package), key=lambda p: p.relative_to(package).as_posix()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _engine_sources(package: Path) -> Iterator[Path]:
    for folder, subfolders, files in os.walk(package):  # links are not followed
        here = Path(folder)
        subfolders[:] = [
            name
            for name in subfolders
            if name != "__pycache__" and not (here == package and name in PREFECT_LAYER)
        ]
        yield from (here / name for name in files if name.endswith(".py"))


@dataclass
class ItemResult:
    """One row of the collection index: small, safe to pass through Prefect."""

    id: str
    source: str
    status: str  # "done", "failed", "skipped" or "interrupted" (never recorded)
    error: str | None = None
    shape: str = ""
    output: str = ""
    object_count: int | None = None
    foreground_fraction: float | None = None
    seconds: float = 0.0
    n_blocks: int = 0
    n_resumed: int = 0  # output blocks a crashed or interrupted run had already written
    area_p05: float | None = None  # object areas in pixels, with `regions`
    area_p50: float | None = None
    area_p95: float | None = None
    fingerprint: str = ""
    config_hash: str = ""
    config_name: str = ""  # the `name` of the config that made the row
    model_hash: str = ""  # content hash of the pipeline's models, "" without one
    code_version: str = field(default_factory=code_version)
    statistics: dict[str, float] = field(default_factory=dict)
    warning: str | None = None  # what the user should know of a done item (NaN took most)
    tiles: str = ""  # a scene's tiles: JSON [[path, fingerprint], ...]; "" for other items
    n_reused: int = 0  # a growing scene's blocks taken from its previous version

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["statistics"] = repr(self.statistics) if self.statistics else ""
        return row


def scene_tiles(info: ItemInfo) -> str:
    """A scene's tiles for its index row, ``[[path, fingerprint], ...]`` as JSON (a changed
    tile is why a scene is redone); ``""`` for an item of one file."""
    import json

    tiles = info.attrs.get("tiles")
    if not isinstance(tiles, list):
        return ""
    return json.dumps([[t["path"], t["fingerprint"]] for t in tiles])


def describe_output(object_count: Any, foreground_fraction: Any) -> str:
    """What an item's output holds, in words: ``"322 objects"`` for labels, ``"12.4 %
    foreground"`` for a mask or class map (non-zero pixels), ``""`` when neither is known.

    Examples
    --------
    >>> describe_output(322, 0.3), describe_output(None, 0.1238), describe_output(None, None)
    ('322 objects', '12.4 % foreground', '')
    """
    if object_count is not None:
        return f"{int(object_count):,} object{'' if int(object_count) == 1 else 's'}"
    if foreground_fraction is not None:
        return f"{100 * float(foreground_fraction):.1f} % foreground"
    return ""


def describe_item_error(error: BaseException, item_id: str, path: str) -> str:
    """The one line an item's failure reads: ``item 'ID' (PATH): REASON``.

    A reader's :class:`~segflow.errors.ItemReadError` says what could not be read by
    itself, and names the file it read: its ``item '...':`` prefix and its type name are
    left out, so the item is named once. Any other error keeps its type name
    (``PlanError: ...``), which tells a bad config from a bad file.

    Examples
    --------
    >>> from segflow.errors import ItemReadError, PlanError
    >>> describe_item_error(ItemReadError("item '/in/a.tif': cut short"), "a", "/in/a.tif")
    "item 'a' (/in/a.tif): cut short"
    >>> describe_item_error(PlanError("3 axes, expected 2"), "a", "/in/a.tif")
    "item 'a' (/in/a.tif): PlanError: 3 axes, expected 2"
    """
    from segflow.errors import ItemReadError

    text = str(error)
    if isinstance(error, ItemReadError):
        for name in (path, item_id):
            text = text.removeprefix(f"item '{name}': ").removeprefix(f"item {name!r}: ")
        return f"item {item_id!r} ({path}): {text}"
    return f"item {item_id!r} ({path}): {type(error).__name__}: {text}"


def segment_item(
    reader: Reader,
    pipeline: Sequence[Mapping[str, Any]],
    *,
    store: str,
    block_shape: Sequence[int] | int | None,
    executor: Executor,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    config_hash: str = "",
    regions: bool = False,
    regions_intensity: str | bool | None = "input",
    vectors: bool = False,
    dicom_seg: bool = False,
    keep_limit: int | None = None,
    progress: ProgressCallback | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
    resumable: bool = False,
    ome: bool = True,
    pyramid: int | None = None,
    writers: Mapping[str, Mapping[str, Any]] | None = None,
    output: Mapping[str, Any] | None = None,
    quicklook: int | None = None,
) -> ItemResult:
    """Run ``pipeline`` on one item and commit it to ``STORE/ITEM_ID``.

    The item is written into the run's staging area, checked (every array and storage
    unit on disk, one region row per object) and only then swapped in with its commit
    record (:mod:`segflow.store.commit`): until then ``STORE/ITEM_ID`` keeps its previous
    complete result, and a failed or interrupted item leaves it untouched. ``run_id`` and
    ``run_name`` (a Prefect flow run's id and name) go into the commit record; each commit
    is a new version of the item (:mod:`segflow.store.versions`).

    With ``resumable`` (and a local store and an input fingerprint), the staging area is
    named by the item, its input, the config and the code, and each block of the output
    phase records itself once written (:mod:`segflow.store.blocks`): after a crash or a
    Ctrl-C, the next run of the same item recomputes the earlier phases and writes only
    the blocks that have no record.

    Never raises for a bad item: the returned :class:`ItemResult` says ``failed`` and names
    the item and the reason, so the rest of the collection goes on.

    Each output is a writer's (:mod:`segflow.store.writers`: it checks the item before any
    block, prepares in staging, may hook each output block, finishes once the blocks are
    written, checks its files before the commit; segflow's own, each module saying what
    it writes, in :mod:`segflow.engine.writers`): ``regions`` (``ITEM/regions.parquet``;
    the result carries the 5th, 50th and 95th percentiles of the object areas) with
    ``regions_intensity`` (``"input"`` or True, a ``save_as`` array's name, None or False),
    ``vectors`` (``ITEM/vectors.parquet``), ``ome`` (the OME-Zarr 0.5 view, whose pyramid
    has at most ``pyramid`` levels beyond full resolution), ``dicom_seg`` (``seg.dcm``).
    ``writers`` (``output.writers``) names other registered output writers with their
    settings. ``output``, the config's ``output`` section as a mapping (as a run passes
    it), replaces ``regions`` ... ``writers``: the writers read their own fields of it.

    With ``quicklook`` (a size in pixels), the quick look writer
    (:mod:`segflow.engine.writers.quicklook`) draws the item's picture into
    ``STORE/ITEM_ID/quicklook.png``, in staging before the commit: a committed version is
    never written again. Failing to draw it only adds a warning to the result.
    """
    if output is None:  # the keyword arguments, as the config's `output` has them
        output = {
            "regions": regions,
            "regions_intensity": regions_intensity,
            "vectors": vectors,
            "dicom_seg": dicom_seg,
            "ome": ome,
            "pyramid": pyramid,
            "writers": writers,
        }
    if quicklook is not None:  # a picture the run asks of this item: the quick look writer
        output = {**output, "quicklook": quicklook}
    options = ItemOptions(
        store=store,
        block_shape=block_shape,
        chunks=None if chunks is None else tuple(chunks),
        shards=None if shards is None else tuple(shards),
        config_hash=config_hash,
        keep_limit=keep_limit,
        run_id=run_id or uuid.uuid4().hex,
        run_name=run_name or "",
        resumable=resumable,
        output=output,
    )
    return _segment_item(reader, pipeline, options, executor, progress)


def _segment_item(
    reader: Reader,
    pipeline: Sequence[Mapping[str, Any]],
    options: ItemOptions,
    executor: Executor,
    progress: ProgressCallback | None,
) -> ItemResult:
    """:func:`segment_item` with its options gathered: stage, run, commit; a failure is
    the result's, and leaves the store's committed item untouched."""
    info = reader.info
    stage = _Stage.of(info, options)
    started = time.perf_counter()
    result = ItemResult(
        id=info.id,
        source=info.path,
        status="failed",
        shape=str(tuple(info.shape)),
        fingerprint=info.fingerprint,
        config_hash=options.config_hash,
        tiles=scene_tiles(info),
    )
    try:
        plan, run = _segment_staged(reader, pipeline, options, stage, executor, progress, result)
    except Exception as error:  # one bad item must not stop the collection
        if stop_requested():  # whatever broke (a worker killed by the same Ctrl-C), it is
            result.status = "interrupted"  # not the item's fault: not recorded, redone
        result.error = describe_item_error(error, info.id, info.path)
        result.seconds = time.perf_counter() - started
        if result.status != "interrupted" or stage.resume_name is None:
            _remove(stage.root)  # the store's committed result is untouched
        return result
    fault_point("item-committed")
    _remove(stage.root)
    _describe_done(result, plan, run, info.spatial_shape)
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class ItemOptions:
    """What :func:`segment_item` is asked to write for one item (its keyword arguments)."""

    store: str
    block_shape: Sequence[int] | int | None
    chunks: tuple[int, ...] | None = None
    shards: tuple[int, ...] | None = None
    config_hash: str = ""
    keep_limit: int | None = None
    run_id: str = ""
    run_name: str = ""
    resumable: bool = False
    output: Mapping[str, Any] = field(default_factory=dict)  # the writers' `output` fields


@dataclass(frozen=True)
class _Stage:
    """Where an item is staged, and whether an earlier run of it is being resumed."""

    root: str
    blocks_dir: str  # the output phase's block records
    resume_name: str | None
    resuming: bool

    @classmethod
    def of(cls, info: Any, options: ItemOptions) -> _Stage:
        from segflow.store.commit import is_staged, stage_name, staging_root

        store = options.store
        resume_name = (
            stage_name(info.id, options.config_hash, info.fingerprint, code_version())
            if options.resumable and info.fingerprint
            else None
        )
        root = staging_root(store, resume_name or f"{info.id}.{uuid.uuid4().hex}")
        blocks_dir = f"{root}/.blocks"  # block records: in the item's own staging root
        resuming = resume_name is not None and is_staged(root, info.id)
        return cls(root, blocks_dir, resume_name, resuming)


@dataclass
class _Outputs:
    """What an item writes besides its output's blocks, prepared before the blocks run."""

    layout: Any
    block: tuple[int, ...]
    chunk: tuple[int, ...]
    shard: tuple[int, ...] | None
    writers: ActiveWriters
    target: WriteTarget  # what the writers' hooks are given (and their states)
    arrays: dict[str, str] = field(default_factory=dict)  # name -> dtype, every array
    saved: dict[str, Any] = field(default_factory=dict)  # save_as name -> sink
    output: Any = None  # the output's ArraySpec, once its dtype is known
    parent: str | None = None  # the item's latest version when it began (begin_item)


def _segment_staged(
    reader: Reader,
    pipeline: Sequence[Mapping[str, Any]],
    options: ItemOptions,
    stage: _Stage,
    executor: Executor,
    progress: ProgressCallback | None,
    result: ItemResult,
) -> tuple[Any, Any]:
    """Plan, check, prepare the outputs, run the blocks, finish, check and commit."""
    plan = plan_for_item(pipeline, reader.info)
    result.model_hash = _model_hash(plan)
    outputs = _prepare_outputs(reader, plan, options, stage, executor, progress)
    growth, why = _growth(reader.info, plan, outputs, options, result)
    run = _run_blocks(reader, plan, outputs, options, stage, executor, progress, growth)
    result.n_resumed = run.n_resumed
    result.n_reused = run.n_reused
    result.warning = "; ".join([*([why] if why else []), *run.warnings]) or None
    # The output phase is over: from here on (joining tables, the commit) a rerun starts
    # the item afresh, so its block records go before the region parts do.
    _remove(stage.blocks_dir)
    _finish_and_commit(run, outputs, options, result)
    return plan, run


def _growth(
    info: ItemInfo, plan: Any, outputs: _Outputs, options: ItemOptions, result: ItemResult
) -> tuple[Any, str | None]:
    """A growing scene's reuse of its previous version, or the line saying why every
    block is redone (:mod:`segflow.engine.grow`)."""
    from segflow.engine.grow import growth_for

    return growth_for(
        options.store,
        info,
        plan,
        block_shape=outputs.block,
        storage_unit=outputs.shard or outputs.chunk,
        made_by={
            "config_hash": options.config_hash,
            "code_version": result.code_version,
            "model_hash": result.model_hash,
        },
    )


def plan_for_item(pipeline: Sequence[Mapping[str, Any]], info: ItemInfo) -> Any:
    """``pipeline`` compiled for one item: its dimensions, channels, dtype, spacing, units
    and nodata (raises ``PlanError`` or ``ValueError`` when it does not fit the item)."""
    return compile_pipeline(
        pipeline,
        spatial_ndim=len(info.spatial_shape),
        channels=info.n_channels,
        dtype=info.dtype,
        spacing=info.spacing,
        units=info.units,
        nodata=info.nodata,
        item=info,
    )


def check_outputs(plan: Any, info: ItemInfo, output: Mapping[str, Any]) -> ActiveWriters:
    """Every output writer ``output`` (the config's ``output`` section) turns on, each
    having checked the item and the ``plan`` compiled for it: the one pre-run check of
    outputs that ``segflow validate``, ``segflow run`` and each item's run make (raises
    the first refusal: ``output.regions`` on a pipeline without labels, say)."""
    active = ActiveWriters.of_output(output)
    active.check(info, plan.out_kind)
    return active


def _prepare_outputs(
    reader: Reader,
    plan: Any,
    options: ItemOptions,
    stage: _Stage,
    executor: Executor,
    progress: ProgressCallback | None,
) -> _Outputs:
    """The pre-run checks of every output writer, then the staged item group, its
    ``save_as`` arrays and the writers' prepare steps (nothing of the item is written
    before the checks)."""
    from segflow.store.commit import begin_item, drop_partial_writes

    info = reader.info
    spatial = info.spatial_shape
    active = check_outputs(plan, info, options.output)
    block = block_shape_for(options.block_shape, len(spatial))
    chunk = tuple(min(c, n) for c, n in zip(options.chunks or block, spatial, strict=True))
    shard = None
    if options.shards is not None:
        # A shard may exceed a small item, but must stay a multiple of the chunk.
        shard = tuple(
            min(s, -(-n // c) * c) for s, c, n in zip(options.shards, chunk, spatial, strict=True)
        )
    layout = active.layout(block)
    target = WriteTarget(
        stage.root,
        info,
        plan.out_kind,
        executor,
        reader=reader,
        plan=plan,
        block_shape=block,
        config_hash=options.config_hash,
        resuming=stage.resuming,
        progress=progress,
    )
    outputs = _Outputs(layout, block, chunk, shard, active, target)
    # Refuses a foreign store or folder before any write.
    outputs.parent = begin_item(options.store, info.id)
    if stage.resuming:
        drop_partial_writes(stage.root, info.id)  # a write the kill cut short is redone
    else:
        layout.create_item(stage.root, info)
    for name, dtype in plan.saved.items():
        spec = _spec(outputs, name, dtype, plan.saved_classes, plan.saved_categories)
        outputs.saved[name] = _ensure_array(layout, stage.root, info, spec, reuse=stage.resuming)
        outputs.arrays[name] = str(np.dtype(dtype))
    active.prepare(target)
    return outputs


def _spec(
    outputs: _Outputs, name: str, dtype: Any, classes: Mapping[str, Any], categories: Mapping
) -> Any:
    from segflow.store.layout import ArraySpec

    return ArraySpec(
        name,
        str(dtype),
        outputs.chunk,
        outputs.shard,
        classes=classes.get(name, ()),
        categories=categories.get(name, ()),
    )


def _run_blocks(
    reader: Reader,
    plan: Any,
    outputs: _Outputs,
    options: ItemOptions,
    stage: _Stage,
    executor: Executor,
    progress: ProgressCallback | None,
    growth: Any = None,
) -> Any:
    """Run the pipeline's phases over the blocks; the output's sink is made once its dtype
    is known (the layout's, with the writers' block hooks). ``growth``: a growing scene's
    reuse of its previous version (:mod:`segflow.engine.grow`)."""
    from segflow.store.blocks import BlockRecords, output_key

    info = reader.info

    def make_sink(dtype: np.dtype) -> Any:
        spec = _spec(
            outputs,
            plan.out_kind,
            dtype,
            {plan.out_kind: plan.out_classes},
            {plan.out_kind: plan.out_categories},
        )
        outputs.output = spec
        outputs.arrays[plan.out_kind] = str(np.dtype(dtype))
        sink = _ensure_array(
            outputs.layout, stage.root, info, spec, reuse=stage.resuming, output=True
        )
        return outputs.writers.sink(sink)

    def records(dtype: np.dtype, n_labels: int | None, stats: Any) -> BlockRecords:
        # A grown scene's ids depend on the version it grew from.
        grown_from = () if growth is None else (growth.version,)
        key = output_key(str(np.dtype(dtype)), n_labels, *grown_from, stats=stats)
        return BlockRecords(stage.blocks_dir, key)

    return run_item(
        reader,
        plan,
        block_shape=outputs.block,
        executor=executor,
        make_sink=make_sink,
        saved=outputs.saved,
        storage_unit=outputs.shard or outputs.chunk,
        regions=outputs.writers.object_rows(outputs.target),
        keep_limit=options.keep_limit,
        progress=progress,
        records=records if stage.resume_name is not None else None,
        growth=growth,
    )


def _finish_and_commit(
    run: Any, outputs: _Outputs, options: ItemOptions, result: ItemResult
) -> None:
    """Every writer's finish step in staging (the OME-Zarr pyramid, the tables, the quick
    look, ...), its commit check (every array, every writer's files), then the commit."""
    from segflow.store.commit import commit_item

    target = replace(
        outputs.target,
        output_spec=outputs.output,
        object_count=run.n_labels,
        arrays=dict(outputs.arrays),
    )
    info, root = target.info, target.root
    writer_files = outputs.writers.finish(target, [b.written for b in run.blocks])
    for key, value in target.row.items():  # what the writers tell of the item
        setattr(result, key, value)
    result.warning = "; ".join(w for w in (result.warning, *target.warnings) if w) or None
    outputs.writers.verify(target, writer_files)
    fault_point("item-staged")
    record = _commit_record(info, options, result, run, outputs)
    commit_item(options.store, root, info.id, record, parent=outputs.parent)


def _commit_record(
    info: Any, options: ItemOptions, result: ItemResult, run: Any, outputs: _Outputs
) -> dict[str, Any]:
    return {
        "run_id": options.run_id,
        "run_name": options.run_name or None,
        "fingerprint": info.fingerprint,
        "config_hash": options.config_hash,
        "model_hash": result.model_hash,
        "code_version": result.code_version,
        "arrays": outputs.arrays,
        "object_count": run.n_labels,
        "max_label": run.max_label,  # ids run to here (a grown scene's are not 1..n)
        "committed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _describe_done(result: ItemResult, plan: Any, run: Any, spatial: Sequence[int]) -> None:
    """Fill a committed item's row: its output, objects, foreground and statistics."""
    foreground = sum(b.foreground for b in run.blocks)
    result.status = "done"
    result.output = plan.out_kind
    result.object_count = run.n_labels
    result.foreground_fraction = foreground / max(int(np.prod(spatial)), 1)
    result.n_blocks = run.n_blocks
    for key, value in run.stats.items():
        values = np.asarray(value, dtype=np.float64).ravel()  # k-means: k x features
        for k, v in enumerate(values):
            suffix = "" if values.size == 1 else f".{k}"
            result.statistics[f"{key}{suffix}"] = float(v)


def _model_hash(plan: Any) -> str:
    """The content hash of the plan's models (as :meth:`SegflowConfig.model_hash`)."""
    from segflow.ops.model import models_hash

    return models_hash([s.params.path for s in plan.steps if s.op.name == "_model_infer"])


def _remove(path: str) -> None:
    """Remove a staging or block-record folder; never anything outside the store's
    bookkeeping folder."""
    from segflow.store.lock import SEGFLOW_DIR, is_local, local_path

    if f"/{SEGFLOW_DIR}/" not in path:
        return
    if is_local(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    from segflow.store.fs import fresh_fs

    fs, inner = fresh_fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def _ensure_array(
    layout: Any, root: str, info: Any, spec: Any, *, reuse: bool, output: bool = False
) -> Any:
    """Create an array through ``layout`` (the pipeline's ``output``, or a ``save_as`` one),
    or keep the staged one of a resumed item if it fits; return its sink."""
    import zarr

    from segflow.store.layout import ZarrRegionWriter

    if reuse:
        try:
            array = zarr.open_array(root, path=f"{info.id}/{spec.name}", mode="r")
        except Exception:
            array = None
        if array is not None and str(array.dtype) == str(np.dtype(spec.dtype)):
            if not output:
                return ZarrRegionWriter(root, info.id, spec.name)
            sink = layout.open_output(root, info, spec)
            if sink is not None:
                return sink
    if output:
        return layout.create_output(root, info, spec)
    return layout.create_array(root, info, spec)

"""Output writers other packages add: one more file or array per item, as a registered part.

A :class:`Writer` is found by name in a registry that loads the entry point group
``segflow.writers`` (as operations load ``segflow.operations``): a package declares

.. code-block:: toml

    [project.entry-points."segflow.writers"]
    histogram = "my_package.writers:HISTOGRAM"

and a config turns it on under ``output.writers``, with its settings::

    output:
      store: out.zarr
      writers:
        histogram: {bins: 32}

A writer takes part in every phase of an item, each an optional hook:

- ``check(info, output_kind, settings)``: before any block runs; raise to refuse the item
  (a writer of labels only, given a float output);
- ``block(region, data, settings)``: in each block's output task, once its final output is
  written (relabelled ids, on the worker): returns a small picklable part of the result;
- ``finish(target, settings, parts)``: once every block is written, in the item's staging
  group (``target``: where to write, what was written), with the blocks' parts in block
  order; returns the files (relative to the item group) it wrote;
- ``verify(target, settings, files)``: the commit check, before the item is swapped in.

The outputs segflow writes itself (region and vector tables, the DICOM SEG, the OME-Zarr
view and its pyramid, the quick look) are writers of the same kind, registered from
:data:`BUILTIN_WRITERS` (one line each) and turned on by their own ``output`` field
(``switch``, e.g. ``output.regions: true``; ``output_fields`` maps further ``output``
fields to their settings); the quick look's field, ``quicklook``, is not the config's: a
run sets it for the items it draws (``segment_item(quicklook=SIZE)``). Any writer may also
use these hooks:

- ``prepare(target, settings)``: after the checks, once the staged item group exists and
  before any block runs; what it returns is the writer's state for this item, which
  ``finish`` and ``verify`` find as ``target.states[NAME]``;
- ``object_rows(state)``: the :class:`~segflow.engine.kernels.RegionsSpec` that receives
  the per-object rows the stitch merges (one writer per item at most);
- ``layout(settings, blocks)``: the :class:`~segflow.store.output.OutputLayout` the output
  is written with: the output writer's xarray/CF layout, or one that extends it, given by
  one more writer at most (the OME-Zarr view);

and one for the whole store, after a run's items, while the run holds the store's lock:

- ``collect(store, settings, items)``: bring a collection-wide file up to date for the
  ``items`` the run did (None: every item; the collection's ``vectors.parquet/`` folder);
  ``settings`` is
  None when the run does not turn the writer on (then only refresh what an earlier run
  left, never leave it stale); returns its path (None without one) and a line to log.

``finish`` may also fill ``target.row`` (fields of the item's index row, such as the
area percentiles of the region table) and add lines to ``target.warnings`` (what went
wrong without failing the item, such as a quick look that could not be drawn: the item's
result warns, the item commits).

Its settings are a pydantic model: they are validated when the config is loaded and are
part of the config hash (a changed setting redoes the items), except those the writer names
in ``hash_opt_out`` with the reason (settings that cannot change a stored byte).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel

from segflow.errors import did_you_mean
from segflow.io.base import ItemInfo

ENTRY_POINT_GROUP = "segflow.writers"


@dataclass(frozen=True)
class WriteTarget:
    """Where a writer's ``finish`` writes: the item's staging root and what is there."""

    root: str  # the Zarr root the item is staged under
    info: ItemInfo
    output: str  # the output array's name (``labels``, ``mask``, ...)
    executor: Any  # the run's executor, for a writer that reads the output blockwise
    reader: Any = None  # the item's reader
    plan: Any = None  # the compiled pipeline (segflow.engine.pipeline)
    block_shape: tuple[int, ...] | None = None  # the blocks the item is written in
    config_hash: str = ""
    resuming: bool = False  # an interrupted run of the item is being resumed
    progress: Any = None  # the run's progress callback, for a writer's own block pass
    output_spec: Any = None  # the output's ArraySpec, once the blocks are written
    arrays: Mapping[str, str] = field(default_factory=dict)  # name -> dtype, every array
    object_count: int | None = None  # the output's objects (labels), once written
    states: dict[str, Any] = field(default_factory=dict)  # prepare's result, by writer
    row: dict[str, Any] = field(default_factory=dict)  # index row fields writers fill
    warnings: list[str] = field(default_factory=list)  # lines for the item's result

    @property
    def item_url(self) -> str:
        """The item group's folder or URL: ``ROOT/ITEM``."""
        return f"{str(self.root).rstrip('/')}/{self.info.id}"


@dataclass(frozen=True)
class Writer:
    """One output writer (see the module note for the hooks)."""

    name: str
    settings: type[BaseModel]
    finish: Callable[[WriteTarget, Any, Sequence[Any]], Sequence[str]] | None = None
    check: Callable[[ItemInfo, str, Any], None] | None = None
    block: Callable[[tuple[slice, ...], np.ndarray, Any], Any] | None = None
    verify: Callable[[WriteTarget, Any, Sequence[str]], None] | None = None
    hash_opt_out: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    prepare: Callable[[WriteTarget, Any], Any] | None = None
    object_rows: Callable[[Any], Any] | None = None
    layout: Callable[[Any, tuple[int, ...]], Any] | None = None
    collect: Callable[[str, Any, Sequence[str] | None], tuple[str | None, str]] | None = None
    switch: str | None = None  # a built-in writer's `output` field that turns it on
    always: bool = False  # a built-in writer that is always on (the output itself)
    output_fields: Mapping[str, str] = field(default_factory=dict)  # output field -> setting


_REGISTRY: dict[str, Writer] = {}

# The writers segflow ships: name -> "module:attribute" of its Writer, imported on first
# use; in the order their hooks run (the vector table joins the region table's columns).
BUILTIN_WRITERS: dict[str, str] = {
    "output": "segflow.engine.writers.output:OUTPUT",
    "regions": "segflow.engine.writers.regions:REGIONS",
    "vectors": "segflow.engine.writers.vectors:VECTORS",
    "ome": "segflow.engine.writers.ome:OME",
    "dicom_seg": "segflow.engine.writers.dicom_seg:DICOM_SEG",
    "quicklook": "segflow.engine.writers.quicklook:QUICKLOOK",
}


def register_writer(writer: Writer) -> Writer:
    """Add ``writer`` to the registry; a second writer of the same name is refused."""
    if writer.name in _REGISTRY and _REGISTRY[writer.name] is not writer:
        raise ValueError(f"a writer named {writer.name!r} is registered already")
    unknown = set(writer.hash_opt_out) - set(writer.settings.model_fields)
    unknown |= set(writer.output_fields.values()) - set(writer.settings.model_fields)
    if unknown:
        raise ValueError(
            f"writer {writer.name!r}: `hash_opt_out` or `output_fields` name "
            f"{sorted(unknown)}, which are not settings of {writer.settings.__name__}"
        )
    _REGISTRY[writer.name] = writer
    return writer


def get_writer(name: str) -> Writer:
    """The writer registered as ``name``.

    Raises
    ------
    KeyError
        If none is; the message suggests the closest names.
    """
    _load_builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    hint = did_you_mean(name, sorted(_REGISTRY))
    raise KeyError(
        f"unknown output writer {name!r}; {hint or 'none is close to it'} (writers come "
        f"from packages declaring the entry point group {ENTRY_POINT_GROUP!r})"
    )


def list_writers() -> list[Writer]:
    """Every registered writer, sorted by name."""
    _load_builtins()
    _load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


@functools.cache
def _load_builtins() -> None:
    """Register the writers of :data:`BUILTIN_WRITERS` (once per process)."""
    import importlib

    for name, where in BUILTIN_WRITERS.items():
        module, attribute = where.split(":")
        writer = getattr(importlib.import_module(module), attribute)
        assert writer.name == name, (name, where)
        register_writer(writer)


@functools.cache
def _load_entry_points() -> None:
    """Register the writers other packages declare in :data:`ENTRY_POINT_GROUP` (once per
    process: a Dask worker running a writer's block hook loads them too)."""
    from importlib.metadata import entry_points

    _load_builtins()  # a package's writer may not take a built-in writer's name
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        writer = entry.load()
        where = f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP!r}"
        if not isinstance(writer, Writer):
            raise TypeError(f"{where} must name a Writer, got {type(writer).__name__}")
        try:
            register_writer(writer)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def writer_settings(name: str, values: Mapping[str, Any]) -> BaseModel:
    """``values`` validated as the settings of writer ``name`` under ``output.writers``
    (raises ``KeyError`` for an unknown writer or one of segflow's own, which its own
    ``output`` field turns on, pydantic's ``ValidationError`` for bad settings)."""
    writer = get_writer(name)
    if writer.switch is not None or writer.always:
        how = "always on" if writer.always else f"turned on with `output.{writer.switch}`"
        raise KeyError(
            f"output writer {name!r} is segflow's own: it is {how}, not under `output.writers`"
        )
    return writer.settings.model_validate(dict(values))


def hashed_settings(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Writer ``name``'s share of the config hash: its settings with defaults filled in, as
    JSON data, less the ones it opts out."""
    writer = get_writer(name)
    data = writer_settings(name, values).model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in writer.hash_opt_out}


def builtin_settings(output: Mapping[str, Any]) -> list[tuple[Writer, BaseModel]]:
    """segflow's own writers that the ``output`` settings (the config's ``output`` section
    as a mapping) turn on, in :data:`BUILTIN_WRITERS` order, with their settings."""
    _load_builtins()
    chosen = []
    for name in BUILTIN_WRITERS:
        writer = _REGISTRY[name]
        if writer.always or (writer.switch is not None and output.get(writer.switch)):
            values = {
                setting: output[field]
                for field, setting in writer.output_fields.items()
                if field in output
            }
            chosen.append((writer, writer.settings.model_validate(values)))
    return chosen


def collecting_writers(output: Mapping[str, Any]) -> list[tuple[Writer, BaseModel | None]]:
    """Every registered writer with a ``collect`` step, with its settings when ``output``
    turns it on, else None (its collection-wide file is refreshed, never left stale)."""
    chosen = {w.name: s for w, s in ActiveWriters.of_output(output).chosen}
    return [(w, chosen.get(w.name)) for w in list_writers() if w.collect is not None]


@dataclass(frozen=True)
class ActiveWriters:
    """The writers a config turns on for one item, with their validated settings, in the
    order their hooks run (segflow's own first, then the others by name)."""

    chosen: tuple[tuple[Writer, Any], ...] = ()

    @classmethod
    def of(cls, config: Mapping[str, Mapping[str, Any]] | None) -> ActiveWriters:
        """The writers named in ``config`` (``output.writers``) alone."""
        return cls(
            tuple(
                (get_writer(name), writer_settings(name, values))
                for name, values in sorted((config or {}).items())
            )
        )

    @classmethod
    def of_output(cls, output: Mapping[str, Any]) -> ActiveWriters:
        """Every writer the ``output`` settings turn on: segflow's own by their fields,
        then those named under ``output.writers``."""
        return cls((*builtin_settings(output), *cls.of(output.get("writers")).chosen))

    def check(self, info: ItemInfo, output_kind: str) -> None:
        """Each writer's pre-run check (raises the first refusal)."""
        for writer, settings in self.chosen:
            if writer.check is not None:
                writer.check(info, output_kind, settings)

    def layout(self, blocks: tuple[int, ...]) -> Any:
        """The output's layout: the output writer's (xarray/CF), or the one a later writer
        gives that extends it (the OME-Zarr view); the xarray one without any writer."""
        from segflow.store.output import XarrayLayout

        made = [w.layout(s, blocks) for w, s in self.chosen if w.layout is not None]
        if any(not isinstance(layout, XarrayLayout) for layout in made) or len(made) > 2:
            names = [w.name for w, _ in self.chosen if w.layout is not None]
            raise ValueError(
                f"output writers {names} each give the output's layout: one may extend "
                "the xarray layout, no more"
            )
        return made[-1] if made else XarrayLayout()

    def prepare(self, target: WriteTarget) -> None:
        """Each writer's prepare step; its result goes to ``target.states``."""
        for writer, settings in self.chosen:
            if writer.prepare is not None:
                target.states[writer.name] = writer.prepare(target, settings)

    def object_rows(self, target: WriteTarget) -> Any:
        """What receives the per-object rows of the stitch (a ``RegionsSpec``), or None."""
        made = [w.object_rows(target.states.get(w.name)) for w, _ in self.chosen if w.object_rows]
        if len(made) > 1:
            raise ValueError(f"{len(made)} output writers each take the per-object rows")
        return made[0] if made else None

    def sink(self, sink: Any) -> Any:
        """``sink`` (the output's) with the writers' block hooks run after each write."""
        hooks = tuple((w.name, w.block, s) for w, s in self.chosen if w.block is not None)
        return BlockHooksSink(sink, hooks) if hooks else sink

    def finish(self, target: WriteTarget, written: Sequence[Any]) -> dict[str, list[str]]:
        """Each writer's finish, given its parts of the blocks' ``written`` results."""
        files = {}
        for writer, settings in self.chosen:
            if writer.finish is None:
                continue
            parts = [w.get(writer.name) if isinstance(w, dict) else None for w in written]
            files[writer.name] = list(writer.finish(target, settings, parts))
        return files

    def verify(self, target: WriteTarget, files: Mapping[str, Sequence[str]]) -> None:
        for writer, settings in self.chosen:
            if writer.verify is not None:
                writer.verify(target, settings, files.get(writer.name, ()))


class BlockHooksSink:
    """The output sink, then each writer's block hook; what the block returns is the
    writers' parts by name (picklable; carried to ``finish`` in the block summaries)."""

    def __init__(self, sink: Any, hooks: tuple[tuple[str, Any, Any], ...]) -> None:
        self.sink = sink
        self.hooks = hooks

    def write(self, region: tuple[slice, ...], data: np.ndarray) -> dict[str, Any]:
        self.sink.write(region, data)
        return {name: hook(region, data, settings) for name, hook, settings in self.hooks}

    def after_blocks(self, executor: Any, written: Sequence[tuple[Any, Any]]) -> None:
        """The output sink's work after the blocks (see :class:`segflow.engine.run.Sink`)."""
        after_blocks = getattr(self.sink, "after_blocks", None)
        if after_blocks is not None:
            after_blocks(executor, written)

    def __repr__(self) -> str:
        return f"BlockHooksSink({self.sink!r}, {[name for name, _, _ in self.hooks]})"


__all__ = [
    "BUILTIN_WRITERS",
    "ENTRY_POINT_GROUP",
    "ActiveWriters",
    "BlockHooksSink",
    "WriteTarget",
    "Writer",
    "builtin_settings",
    "collecting_writers",
    "get_writer",
    "hashed_settings",
    "list_writers",
    "register_writer",
    "writer_settings",
]

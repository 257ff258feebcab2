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

    @property
    def item_url(self) -> str:
        """The item group's folder or URL: ``ROOT/ITEM``."""
        return f"{str(self.root).rstrip('/')}/{self.info.id}"


@dataclass(frozen=True)
class Writer:
    """One output writer (see the module note for the hooks)."""

    name: str
    settings: type[BaseModel]
    finish: Callable[[WriteTarget, Any, Sequence[Any]], Sequence[str]]
    check: Callable[[ItemInfo, str, Any], None] | None = None
    block: Callable[[tuple[slice, ...], np.ndarray, Any], Any] | None = None
    verify: Callable[[WriteTarget, Any, Sequence[str]], None] | None = None
    hash_opt_out: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""


_REGISTRY: dict[str, Writer] = {}


def register_writer(writer: Writer) -> Writer:
    """Add ``writer`` to the registry; a second writer of the same name is refused."""
    if writer.name in _REGISTRY and _REGISTRY[writer.name] is not writer:
        raise ValueError(f"a writer named {writer.name!r} is registered already")
    unknown = set(writer.hash_opt_out) - set(writer.settings.model_fields)
    if unknown:
        raise ValueError(
            f"writer {writer.name!r}: `hash_opt_out` names {sorted(unknown)}, which are not "
            f"settings of {writer.settings.__name__}"
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
    _load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


@functools.cache
def _load_entry_points() -> None:
    """Register the writers other packages declare in :data:`ENTRY_POINT_GROUP` (once per
    process: a Dask worker running a writer's block hook loads them too)."""
    from importlib.metadata import entry_points

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
    """``values`` validated as writer ``name``'s settings (raises ``KeyError`` for an
    unknown writer, pydantic's ``ValidationError`` for bad settings)."""
    return get_writer(name).settings.model_validate(dict(values))


def hashed_settings(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Writer ``name``'s share of the config hash: its settings with defaults filled in, as
    JSON data, less the ones it opts out."""
    writer = get_writer(name)
    data = writer_settings(name, values).model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in writer.hash_opt_out}


@dataclass(frozen=True)
class ActiveWriters:
    """The writers a config turns on for one item, with their validated settings."""

    chosen: tuple[tuple[Writer, Any], ...] = ()

    @classmethod
    def of(cls, config: Mapping[str, Mapping[str, Any]] | None) -> ActiveWriters:
        return cls(
            tuple(
                (get_writer(name), writer_settings(name, values))
                for name, values in sorted((config or {}).items())
            )
        )

    def check(self, info: ItemInfo, output_kind: str) -> None:
        for writer, settings in self.chosen:
            if writer.check is not None:
                writer.check(info, output_kind, settings)

    def sink(self, sink: Any) -> Any:
        """``sink`` (the output's) with the writers' block hooks run after each write."""
        hooks = tuple((w.name, w.block, s) for w, s in self.chosen if w.block is not None)
        return BlockHooksSink(sink, hooks) if hooks else sink

    def finish(self, target: WriteTarget, written: Sequence[Any]) -> dict[str, list[str]]:
        """Each writer's finish, given its parts of the blocks' ``written`` results."""
        files = {}
        for writer, settings in self.chosen:
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

    def __repr__(self) -> str:
        return f"BlockHooksSink({self.sink!r}, {[name for name, _, _ in self.hooks]})"


__all__ = [
    "ENTRY_POINT_GROUP",
    "ActiveWriters",
    "BlockHooksSink",
    "WriteTarget",
    "Writer",
    "get_writer",
    "hashed_settings",
    "list_writers",
    "register_writer",
    "writer_settings",
]

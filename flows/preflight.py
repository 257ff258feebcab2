"""What stops a config before it runs, checked by ``segflow validate`` and ``segflow run``
before Prefect is imported: a config that does not load, configs that would share a store,
a missing input or foreign store, shape settings or a pipeline that fit no item.

Each problem is one line naming the config, the setting and the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer


def load_or_report(
    path: Path, overrides: Sequence[str], *, untrained: list[Path] | None = None
) -> Any:
    """The config, or None after printing one line per problem.

    With ``untrained``, a config whose only problem is a model not there (not trained yet,
    or not copied here) is appended to it, its line saying it is not run and how to train
    the model: a run of many configs leaves it out and runs the others.
    """
    from segflow.config import load_config
    from segflow.errors import ConfigError

    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        if untrained is not None and error.problems == error.untrained:
            untrained.append(path)
            for problem in error.problems:
                typer.echo(
                    f"{path}: not run, its model is not trained: {problem}; train it with "
                    "`segflow train` (see configs/train/)",
                    err=True,
                )
            return None
        for problem in error.problems:  # a --set's problem names the --set, not the file
            typer.echo(problem if problem.startswith("--set ") else f"{path}: {problem}", err=True)
        return None
    for note in config.notes:  # what loading derived from the --set values
        typer.echo(f"{path}: {note}", err=True)
    return config


def report(lines: Sequence[str]) -> bool:
    """Print each line on stderr; True when there was any."""
    for line in lines:
        typer.echo(line, err=True)
    return bool(lines)


def shared_store_problems(paths: Sequence[Path], configs: Sequence[Any]) -> list[str]:
    """One line per store that configs of different names given together would write into
    (each would replace the other's items), unless each allows it."""
    names: dict[str, dict[str, Path]] = {}
    for path, config in zip(paths, configs, strict=True):
        if not config.output.allow_other_configs:
            names.setdefault(str(config.output.store).rstrip("/"), {})[config.name] = path
    return [
        f"{list(by_name.values())[1]}: output.store: configs "
        f"{' and '.join(repr(n) for n in by_name)} ({', '.join(str(p) for p in by_name.values())}) "
        f"would write into one store '{store}' and replace each other's items: give each its "
        f"own output.store, or --set output.allow_other_configs=true to let them share it"
        for store, by_name in names.items()
        if len(by_name) > 1
    ]


def _collection_problems(
    config: Any, notes: list[str] | None = None
) -> tuple[list[str], list[Any], list[tuple[str, str]]]:
    """What stops a whole run before it starts: a missing or empty input, a store path that
    is a file or a foreign folder, shape settings that do not fit an item's axes, what a
    step finds wrong with the collection (boxes for files not in it). Also
    returns the readable items and the unreadable files (which fail alone in a run);
    ``notes`` receives discovery's lines on files left out or renamed on purpose."""
    from segflow.engine.collection import check_config_owner, config_counts, index_as_table
    from segflow.engine.pipeline import collection_notes
    from segflow.errors import SegflowError
    from segflow.io import discover_items
    from segflow.store.commit import check_store

    problems = []
    output = config.output
    try:
        check_store(output.store)
        check_config_owner(
            output.store,
            config_counts(index_as_table(output.store)),  # not a dict per row
            config_name=config.name,
            allow=output.allow_other_configs,
        )
    except SegflowError as error:
        problems.append(f"output.store: {error}")
    try:
        readers, failures = discover_items(
            config.input.path,
            notes=notes,
            store=config.output.store,
            **config.input.reader_options(),
        )
    except SegflowError as error:
        return [*problems, f"input.path: {error}"], [], []
    # Boxes for files that are not in the collection, say: refused, one line each.
    problems += collection_notes(config.pipeline, [reader.info for reader in readers])
    misfits = [_shape_misfit(reader.info, config) for reader in readers]
    if readers and all(misfits):  # no item fits: the settings are wrong, not the items
        problems += [m for m in misfits if m]
    return problems, readers, failures


def run_problems(
    config: Any, notes: list[str]
) -> tuple[list[str], list[Any], list[tuple[str, str]]]:
    """:func:`_collection_problems`, then, without any, the items' own pre-run check until
    one passes (:func:`segflow.engine.collection.unfit_items`): a config that no item fits
    (``output.regions`` on a pipeline without labels) is refused before anything runs."""
    from segflow.engine.collection import unfit_items

    problems, readers, failures = _collection_problems(config, notes)
    if not problems:
        problems = unfit_items(config, [reader.info for reader in readers])
    return problems, readers, failures


def _shape_misfit(info: Any, config: Any) -> str | None:
    """One line when a shape setting has another axis count than the item, or blocks that
    do not cover whole storage units of it (naming the ``--set`` that fixes it), else None."""
    from segflow.engine.blocks import plan_blocks
    from segflow.errors import PlanError

    blocks = config.blocks.shape
    settings = {
        "blocks.shape": blocks if isinstance(blocks, list) else None,
        "output.chunks": config.output.chunks,
        "output.shards": config.output.shards,
    }
    axes = info.spatial_axes
    misfits = {k: v for k, v in settings.items() if v is not None and len(v) != len(axes)}
    where = f"item {info.id!r} ({info.path})"
    if misfits:
        wrong = " and ".join(f"{k} {v}" for k, v in misfits.items())
        one_more = any(len(v) == len(axes) - 1 for v in misfits.values())
        return f"{wrong}: {where} has {len(axes)} spatial axes {axes}" + _bands_hint(
            info, config, one_more
        )
    unit = config.output.shards or config.output.chunks
    try:
        plan_blocks(info.spatial_shape, blocks, storage_unit=unit)
    except PlanError as error:
        return f"{where}: {error} ({_unit_fix(blocks, config.output)})"
    return None


# A first axis longer than this is taken for slices: no bands hint.
MAX_GUESSED_BANDS = 16


def _bands_hint(info: Any, config: Any, one_axis_more: bool) -> str:
    """The ``--set`` that reads a TIFF's first axis as bands, when a 2-D config met a TIFF
    read as a stack of a few slices (a multi-band TIFF without axis metadata), else ''."""
    from segflow.io.builtin import TIFF_SUFFIXES

    options = config.input.options or {}
    first = info.spatial_shape[0]
    if not one_axis_more or "axes" in options or first > MAX_GUESSED_BANDS:
        return ""
    if not str(info.path).lower().endswith(TIFF_SUFFIXES):
        return ""
    return (
        f"; if its first axis ({first}) holds bands, not slices, say so: "
        "--set input.options.axes=cyx"
    )


def _unit_fix(blocks: Any, output: Any) -> str:
    """The ``--set`` that makes blocks cover whole storage units."""

    def shape(value: Any) -> str:
        return "[" + ",".join(str(v) for v in value) + "]"

    if output.shards is not None:
        return f"--set blocks.shape={shape(output.shards)} fixes it: blocks of whole shards"
    fixes = f"--set output.chunks={shape(blocks)}" if isinstance(blocks, list) else ""
    either = f"{fixes} or " if fixes else ""
    return f"{either}--set blocks.shape={shape(output.chunks)} fixes it"


def check_items(config: Any) -> list[str]:
    """Problems of the collection and of fitting the pipeline to each item (channels,
    dimensions), one per line."""
    from segflow.engine.collection import check_item_fit

    problems, readers, failures = _collection_problems(config)
    problems += [f"input.path: {message}" for _, message in failures]
    for reader in readers:
        info = reader.info
        if not problems and (misfit := _shape_misfit(info, config)):
            problems.append(misfit)  # in a run, this item fails alone
            continue
        if line := check_item_fit(config, info):  # budget, pipeline, output writers
            problems.append(line)
    return problems

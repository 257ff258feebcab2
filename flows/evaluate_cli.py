"""``segflow evaluate CONFIG... --reference PATH``: score each config's store against
reference masks and print a table (:func:`segflow.flows.evaluate.evaluate_collection`).
What makes scoring impossible (no segmented item, no reference file, a malformed COCO file)
is said before Prefect is imported."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from segflow.flows.cli_options import (
    EXIT_FAILED,
    EXIT_INVALID,
    ConfigPaths,
    SetOption,
    VerboseOption,
)
from segflow.flows.preflight import load_or_report
from segflow.flows.progress import prefect_log_file, prefect_logs_to


def evaluate(
    configs: ConfigPaths,
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            metavar="PATH",
            help="Reference masks: a file, a folder or a glob (label images or GeoJSON).",
        ),
    ],
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Score each config's store against reference masks and print a summary table.

    Exit status: 0 when every matched item was scored, 1 when one failed, 2 on an invalid
    config, a store with no segmented item, or a --reference that names no file.
    """
    overrides = list(set_ or [])
    loaded = [load_or_report(path, overrides) for path in configs]
    if any(config is None for config in loaded):
        raise typer.Exit(EXIT_INVALID)
    problems = [
        f"{path}: {problem}"
        for path, config in zip(configs, loaded, strict=True)
        if (problem := _nothing_to_score(path, config, reference, overrides))
    ]
    if problems:
        for line in problems:
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_INVALID)

    from segflow.flows._server import prefect_api
    from segflow.flows.evaluate import evaluate_collection

    failed = False
    # One temporary server for every config, quiet when it stops.
    with prefect_log_file(verbose), prefect_api():
        for path in configs:
            with prefect_logs_to(Console(stderr=True)):
                summary = evaluate_collection(str(path), reference, overrides)
            _print_scores(summary)
            failed |= bool(summary["failed"])
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _nothing_to_score(
    path: Path, config: Any, reference: str, overrides: Sequence[str]
) -> str | None:
    """Why ``evaluate`` cannot score anything for ``config`` (checked before Prefect starts):
    its store has no segmented item, ``reference`` names no file, or a COCO file there is
    malformed."""
    from segflow.engine.collection import index_rows
    from segflow.evaluate import find_references, made_by

    store = config.output.store
    rows = index_rows(store)
    if not made_by(rows, config.name):
        same = " with the same --set options" if overrides else ""
        others = sorted({str(r["config_name"]) for r in rows if r.get("config_name")})
        made = f" (its items were made by config {', '.join(map(repr, others))})" if others else ""
        return (
            f"store '{store}' has no item made by config {config.name!r} to score{made}: run "
            f"`segflow run {path}`{same} first"
        )
    found = find_references(reference)
    if not found:
        return f"--reference {reference!r} names no file (a file, a folder or a glob)"
    return _bad_coco(found)


def _bad_coco(references: Sequence[str]) -> str | None:
    """The first problem of a COCO reference file that no item could be scored against
    (an image without its size, an annotation of an image it does not list)."""
    from segflow.errors import EvaluationError
    from segflow.io.coco import is_coco, load_coco

    for path in references:
        try:
            if is_coco(path):
                load_coco(path)
        except EvaluationError as error:
            return str(error)
    return None


def _print_scores(summary: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"{summary['name']}: scores against the references ({summary['store']})")
    rows = summary["scored"]
    columns = ["ap50", "ap50_95", "matched", "n_pred", "n_ref", "dice_1", "iou_1"]
    columns = [c for c in columns if any(c in r for r in rows)]
    table.add_column("item")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["id"], *[_cell(row.get(c)) for c in columns])
    if len(rows) > 1:
        means = [sum(float(r.get(c, 0)) for r in rows) / len(rows) for c in columns]
        table.add_row("mean", *[_cell(m) for m in means])
    console.print(table)
    notes: dict[str, list[str]] = {}  # one line per note, naming the items it concerns
    for row in rows:
        if row.get("eval_note"):
            notes.setdefault(row["eval_note"], []).append(row["id"])
    for note, ids in notes.items():
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        typer.echo(f"{shown}: {note}", err=True)
    for row in summary["failed"]:
        typer.echo(row["eval_error"], err=True)
    if summary["unmatched"]:
        typer.echo(f"no reference for: {', '.join(summary['unmatched'])}", err=True)
    for line in summary.get("not_in_collection", []):
        typer.echo(line, err=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)

"""``segflow train CONFIG``: train a model from a train YAML (resumable), with live bars for
epochs and steps and the loss table at the end (:func:`segflow.flows.train.train_flow`).
A config that does not load, or an output holding another run, is refused before Prefect is
imported."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from segflow.flows.cli_options import EXIT_FAILED, EXIT_INVALID, VerboseOption
from segflow.flows.progress import prefect_log_file, train_progress


def train(
    config: Annotated[Path, typer.Argument(help="A train YAML (see configs/train/).")],
    restart: Annotated[
        bool, typer.Option("--restart", help="Drop a saved run and start afresh.")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Train a model (resumable: a rerun continues after the last finished epoch).

    Writes OUTPUT/best (weights + model card), OUTPUT/last (the saved run) and
    OUTPUT/loss.png; prints the loss and validation score per epoch. Exit status 2 on an
    invalid config, or when OUTPUT holds a run trained with other data or settings (then
    --restart trains afresh).
    """
    from segflow.errors import ConfigError
    from segflow.store.lock import live_holder, locked_message
    from segflow.train_config import (
        coco_extra_lines,
        find_pairs,
        load_train_config,
        resume_changes,
    )

    console = Console()
    try:
        cfg = load_train_config(config)
        pairs = find_pairs(cfg.data)  # every image has its reference, before Prefect starts
        for line in coco_extra_lines(pairs):
            typer.echo(f"{config}: {line}", err=True)
        changes = [] if restart else resume_changes(cfg)
    except ConfigError as error:
        Console(stderr=True).print(f"{config}: invalid train config", *error.problems, sep="\n")
        raise typer.Exit(EXIT_INVALID) from None
    if changes:
        typer.echo(_other_run_line(config, cfg.output, changes), err=True)
        raise typer.Exit(EXIT_INVALID)
    if (holder := live_holder(cfg.output)) is not None:  # another training writes there now
        typer.echo(f"{config}: {locked_message(cfg.output, holder, 'training output')}", err=True)
        raise typer.Exit(EXIT_INVALID)
    summary = _run_flow(config, restart, verbose, console, cfg)
    table = Table(title=f"{cfg.name}: training ({summary['best']})")
    for column in ("epoch", "loss", "val loss", f"val {cfg.training.score_name}", "best"):
        table.add_column(column, justify="right")
    for h in summary["history"]:
        mark = " *" if h["improved"] else ""
        val_loss = h.get("val_loss", float("nan"))  # NaN: a run saved before it was measured
        table.add_row(str(h["epoch"]), f"{h['loss']:.4f}",
                      "-" if val_loss != val_loss else f"{val_loss:.4f}",
                      f"{h['val_score']:.4f}{mark}", f"{h['best_score']:.4f}")  # fmt: skip
    console.print(table)
    console.print(f"loss curve: {summary['loss_curve']}")


def _run_flow(config: Path, restart: bool, verbose: bool, console: Console, cfg: Any) -> Any:
    """Run the train flow with live progress; the first Ctrl-C or SIGTERM ends the running
    epoch after its step (the saved run stays as the last finished epoch left it) and exits
    with 128 + the signal's number after one line saying how to resume; a second exits at
    once. A failed or refused run exits with its one line."""
    from segflow.engine.interrupt import stop_requested
    from segflow.flows._server import prefect_api
    from segflow.flows._signals import EXIT_SIGNAL, stop_on_signals
    from segflow.flows.train import train_flow

    with (
        prefect_log_file(verbose),
        stop_on_signals(),
        prefect_api(),
        train_progress(console, cfg.name, cfg.training.max_epochs),
    ):
        state = train_flow(str(config), restart=restart, return_state=True)
    if state.is_completed():
        return state.result()
    typer.echo(f"{config}: {state.message}", err=True)
    if state.is_cancelled():
        raise typer.Exit(EXIT_SIGNAL.get(stop_requested() or "", EXIT_FAILED))
    raise typer.Exit(EXIT_FAILED)


def _other_run_line(config: Path, output: str, changes: Sequence[str]) -> str:
    """Why ``segflow train`` cannot resume the run saved in ``output``, and the fix.

    Examples
    --------
    >>> _other_run_line(Path("train.yaml"), "models/unet", ["training.seed 1, now 2"])
    "train.yaml: output 'models/unet' holds a run trained with other data or settings \
(training.seed 1, now 2): rerun with --restart to train afresh there, or set another output"
    """
    return (
        f"{config}: output '{output}' holds a run trained with other data or settings "
        f"({'; '.join(changes)}): rerun with --restart to train afresh there, or set another "
        "output"
    )

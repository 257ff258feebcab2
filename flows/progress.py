"""What ``segflow run``, ``evaluate`` and ``train`` show while they work: the live progress
bars (one line per finished item or epoch off a terminal) and where Prefect's log lines go
(a log file named on the terminal, or above the bar with ``--verbose``).

Prefect and the progress listener are imported inside the functions, as in
:mod:`segflow.flows.cli`: importing this module starts nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape


@contextmanager
def prefect_log_file(verbose: bool) -> Iterator[None]:
    """Unless ``verbose``, Prefect's INFO lines go to a log file named on the terminal."""
    if verbose:
        yield
        return
    from prefect.logging.configuration import setup_logging

    from segflow.flows._logs import log_file_path, restore, route_prefect_logs

    setup_logging()  # Prefect's own configuration first (it is done once per process)

    path = log_file_path()
    handler = route_prefect_logs(path)
    typer.echo(f"segflow: Prefect's log: {path} (--verbose prints it here)", err=True)
    try:
        yield
    finally:
        restore(handler)


@contextmanager
def progress_bar(console: Console, title: str, n_items: int) -> Iterator[None]:
    """One bar for the items of a run on a terminal; elsewhere one line per finished item.

    The bar counts finished items (done, skipped, failed or interrupted) out of ``n_items``
    and shows the elapsed time and the last report of a running item (its shortened id,
    phase and blocks). Off a terminal (a log file, CI) a live bar would print nothing
    useful, so each item that is done or interrupted prints one plain line,
    ``[3/12] tile_0042: done``; a failed item's line is its error (logged by its task, on
    the terminal either way) and skipped items only count (a rerun would print thousands).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from segflow.tasks.progress import listen_progress

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("items"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    label = escape(title)
    bar = progress.add_task(label, total=n_items)
    finished: set[str] = set()
    lock = threading.Lock()  # reports come from the flow's task threads

    def update(item_id: str, phase: str, done: int, total: int) -> None:
        with lock:
            if phase not in _FINAL_PHASES:
                running = f"{_shorten(item_id)} {phase} {done}/{total} blocks"
                progress.update(bar, description=f"{label} · {escape(running)}")
                return
            if item_id in finished:
                return
            finished.add(item_id)
            count = f"{len(finished)}/{max(n_items, len(finished))}"
            progress.update(bar, description=label, completed=len(finished))
            # A failed item's own error line names it and says why: a second line saying
            # `failed` told it twice.
            if not console.is_terminal and phase not in ("skipped", "failed"):
                console.print(f"[{count}] {item_id}: {phase}", highlight=False, markup=False)

    with progress, listen_progress(update), prefect_logs_to(progress.console):
        progress.console.print(f"[bold]segflow run {label}[/]", highlight=False)
        yield


_FINAL_PHASES = ("done", "skipped", "failed", "interrupted")


def _shorten(item_id: str, width: int = 32) -> str:
    """``item_id`` cut in the middle to ``width`` characters, keeping both ends.

    Examples
    --------
    >>> _shorten("0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9_image", 20)
    '0a7d30b25…e4e9_image'
    """
    if len(item_id) <= width:
        return item_id
    head = (width - 1) // 2
    tail = width - 1 - head
    return f"{item_id[:head]}…{item_id[-tail:]}"


@contextmanager
def prefect_logs_to(console: Console) -> Iterator[None]:
    """Print Prefect's console log lines above the live progress bar, not through it.

    Prefect's console handler prints with its own rich console on the real stderr, which
    would tear the bar; for the duration it prints through ``console`` (the bar's) instead,
    keeping Prefect's colours.
    """
    import logging

    handlers: list[Any] = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(getattr(handler, "console", None), Console) and handler not in handlers:
                handlers.append(handler)
    saved = [(handler, handler.console) for handler in handlers]
    try:
        for handler in handlers:
            handler.console = _ConsoleAbove(console, handler.console)
        yield
    finally:
        for handler, original in saved:
            handler.console = original


class _ConsoleAbove:
    """Renders with ``style`` (a handler's console) and prints through ``target``."""

    def __init__(self, target: Console, style: Console) -> None:
        self.target = target
        self.style = style

    def print(self, *objects: Any, **kwargs: Any) -> None:
        from rich.text import Text

        with self.style.capture() as captured:
            self.style.print(*objects, **kwargs)
        self.target.print(Text.from_ansi(captured.get().rstrip("\n")), soft_wrap=True)


@contextmanager
def train_progress(console: Console, name: str, max_epochs: int) -> Iterator[None]:
    """Two live bars for ``segflow train`` on a terminal: epochs (with the last epoch's loss
    and validation score) and the optimiser steps of the running epoch; elsewhere one line
    per finished epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from segflow.tasks.progress import listen_progress

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    epochs = progress.add_task(f"{name} epochs", total=max_epochs)
    steps = progress.add_task("steps", total=None)

    def update(_: str, phase: str, step: int, total: int) -> None:
        if " done: " in phase:  # "epoch E done: loss L, val V, best B"
            epoch = int(phase.split()[1])
            progress.update(epochs, completed=epoch, description=f"{name} {phase}")
            if not console.is_terminal:
                console.print(f"{name} {phase}", highlight=False)
        else:
            progress.update(steps, completed=step, total=total, description=phase)

    with progress, listen_progress(update), prefect_logs_to(progress.console):
        yield

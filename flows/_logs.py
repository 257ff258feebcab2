"""Prefect's INFO lines to a log file; the terminal keeps the progress and the summary.

A run prints one progress bar (or one line per item off a terminal), warnings, errors and
its summary. What Prefect logs at INFO (task runs starting and finishing, each item's
line) goes to ``segflow-logs/run-TIME-PID.log`` under the segflow cache folder, whose path
the command prints first; the same lines are in the Prefect UI. ``--verbose`` keeps them in
the terminal as well.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from segflow.flows._env import segflow_prefect_home

_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


def log_file_path() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    return segflow_prefect_home().parent / "segflow-logs" / f"run-{stamp}-{os.getpid()}.log"


class _TerminalFilter(logging.Filter):
    """On the terminal: warnings, errors, and the few INFO lines marked for it (the Dask
    dashboard link) with ``extra={"segflow_console": True}``.

    Left out: lines marked ``extra={"segflow_console": False}`` (the command prints them
    itself), Prefect's ``Finished in state Failed(...)`` line of each flow and task run, and
    its ``Task run failed with state: Failed(...)`` line (with ``NoneType: None`` below it)
    of a task that returns a Failed state on purpose: both repeat the reason the item's own
    error line (or the command's summary) gives, and a failed item was told three times.
    A task that *raises* (``Task run failed with exception``) is a bug and stays shown.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        marked = getattr(record, "segflow_console", None)
        if marked is not None:
            return bool(marked)
        if record.name.startswith("prefect") and record.getMessage().startswith(_REPEATS):
            return False
        return record.levelno >= logging.WARNING


# Prefect's lines that repeat a failed item's or run's reason (see _TerminalFilter).
_REPEATS = ("Finished in state", "Task run failed with state")


_FILTER = _TerminalFilter()


def route_prefect_logs(path: Path) -> logging.Handler:
    """Send Prefect's records to ``path`` and keep only warnings, errors and marked lines
    on the terminal.

    Call after Prefect has configured logging. Returns the file handler (for
    :func:`restore`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger("prefect").addHandler(handler)
    for console in logging.getLogger().handlers:  # Prefect's console handler sits on root
        if console is not handler:
            console.addFilter(_FILTER)
    return handler


def restore(handler: logging.Handler) -> None:
    logging.getLogger("prefect").removeHandler(handler)
    handler.close()
    for console in logging.getLogger().handlers:
        console.removeFilter(_FILTER)

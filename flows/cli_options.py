"""The arguments, options and exit statuses the ``segflow`` commands share (``validate``,
``run``, ``evaluate``, ``train``: :mod:`segflow.flows.cli` and the command modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigPaths = Annotated[
    list[Path],
    typer.Argument(
        metavar="CONFIG", help="YAML pipeline configs (see configs/).", show_default=False
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set blocks.shape=[512,512] (repeatable). "
        "Relative paths given here (input.path, output.store) are taken from the current "
        "directory; those in the config file from the file's folder.",
        show_default=False,
    ),
]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show full tracebacks of unexpected errors.")
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Print Prefect's log lines here too; by default they go to a log file whose "
        "path is printed (and to the Prefect UI).",
    ),
]

EXIT_FAILED = 1  # some item (or a whole run) failed
EXIT_INVALID = 2  # a config is invalid: nothing ran

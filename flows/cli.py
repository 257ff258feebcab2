"""The ``segflow`` command: the one typer ``app``, its global options, ``main`` (the console
script) and ``validate``; each other command lives in the module of its job and is
registered here, in the order ``segflow --help`` lists them: ``ops``, ``models`` and
``formats`` (:mod:`segflow.flows.info_cli`), ``run`` (:mod:`segflow.flows.run_cli`),
``evaluate`` (:mod:`segflow.flows.evaluate_cli`), ``train`` (:mod:`segflow.flows.train_cli`),
``export`` (:mod:`segflow.flows.export_cli`), ``history``, ``tag`` and ``prune``
(:mod:`segflow.flows.versions_cli`). Their shared options are in
:mod:`segflow.flows.cli_options`, the checks before a run in :mod:`segflow.flows.preflight`,
the progress bars and Prefect's log routing in :mod:`segflow.flows.progress`.

Prefect is imported only by ``run`` (and only when some item is to do: the store's skip rule
is applied first), ``evaluate`` and ``train``, so ``segflow ops``, ``segflow validate`` and
a run with nothing to do answer fast (``benchmarks/bench_cli.py``); none of these modules
imports it (or Dask, or the engine) at import time.
Before that import, :func:`segflow.flows._env.isolate_prefect` keeps Prefect's state in a
segflow-owned folder unless the user configured Prefect.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

from segflow.flows._env import isolate_prefect
from segflow.flows.cli_options import EXIT_INVALID, ConfigPaths, SetOption
from segflow.flows.evaluate_cli import evaluate
from segflow.flows.export_cli import export
from segflow.flows.info_cli import formats, models_app, ops
from segflow.flows.preflight import check_items, load_or_report, report, shared_store_problems
from segflow.flows.run_cli import run
from segflow.flows.train_cli import train
from segflow.flows.versions_cli import history, prune, tag

isolate_prefect()  # before anything imports prefect

app = typer.Typer(
    name="segflow",
    help="Segment huge image collections block by block (Dask blocks, Prefect flows, Zarr).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:  # what segflow.__version__ says (the index's code_version), without the engine
        number = version("segflow")
    except PackageNotFoundError:
        number = "0.0.0+source"
    typer.echo(f"segflow {number} (Python {sys.version.split()[0]}, {sys.executable})")
    raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Segment huge image collections block by block (Dask blocks, Prefect flows, Zarr)."""


class _ReadableHelp(TyperCommand):
    """Help that shows types a user reads: ``PATH...`` for config files, ``KEY=VALUE`` for
    ``--set``, nothing for on/off flags (typer's own help prints ``<list[Path]>`` and
    ``<bool>``)."""

    def get_params(self, ctx: Any) -> Any:
        params = super().get_params(ctx)
        for param in params:
            shown: str | None = None
            if isinstance(param, TyperArgument):
                bare = param.bare_type()
                shown = "PATH" if "Path" in bare else bare.removeprefix("list[").rstrip("]")
                shown = shown.upper() + ("..." if param.nargs != 1 else "")
            elif isinstance(param, TyperOption) and param.is_flag:
                shown = ""
            if shown is not None:
                param.display_type_rich = lambda ctx, shown=shown: shown  # type: ignore[attr-defined]
        return params


def main() -> None:
    """Entry point of the ``segflow`` console script."""
    import sys

    if "--debug" not in sys.argv:
        from segflow.flows import _quiet

        _quiet.quiet_libraries()
        _quiet.QUIET_WORKERS = True  # not importing segflow.flows.cluster here: it imports Dask
    app()


def validate(configs: ConfigPaths, set_: SetOption = None) -> None:
    """Check configs without running them (keys, operations, parameters, and the pipeline
    against each item's channels and dimensions); print OK or one line per problem.
    """
    invalid = False
    valid: list[tuple[Path, Any]] = []
    for path in configs:
        config = load_or_report(path, set_ or [])
        if config is None:
            invalid = True
            continue
        valid.append((path, config))
        problems = check_items(config)
        for problem in problems:
            typer.echo(f"{path}: {problem}", err=True)
        invalid |= bool(problems)
        if not problems:
            steps = " -> ".join(str(step["op"]) for step in config.pipeline)
            typer.echo(f"OK {path}: {config.name}: {steps}; output {config.output.store}")
    invalid |= report(shared_store_problems([p for p, _ in valid], [c for _, c in valid]))
    if invalid:
        raise typer.Exit(EXIT_INVALID)


# Every command, in the order `segflow --help` lists them (each in the module of its job).
app.command()(ops)
app.add_typer(models_app, name="models")
app.command()(formats)
app.command()(validate)
app.command()(run)
app.command()(evaluate)
app.command()(train)
app.command()(export)
app.command()(history)
app.command()(tag)
app.command()(prune)

for _command in app.registered_commands:  # every command's help: see _ReadableHelp
    _command.cls = _ReadableHelp

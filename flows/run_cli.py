"""``segflow run CONFIG...``: each config as its own flow run, with a progress bar, and a
summary of where the output is.

Before Prefect is imported: the configs' problems (:mod:`segflow.flows.preflight`), a wait
for a store another live run holds, and each config's plan by the store's skip rule (a run
with nothing to do starts no server, flow run or cluster). While it runs: Ctrl-C / SIGTERM
or a lost Prefect API stop it, and it exits within :data:`STOP_DEADLINE` seconds even if
Prefect is stuck.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from segflow.flows.cli_options import (
    EXIT_FAILED,
    EXIT_INVALID,
    ConfigPaths,
    DebugOption,
    SetOption,
    VerboseOption,
)
from segflow.flows.preflight import load_or_report, report, run_problems, shared_store_problems
from segflow.flows.progress import prefect_log_file, progress_bar


def run(
    configs: ConfigPaths,
    set_: SetOption = None,
    debug: DebugOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run each config as its own flow run and print where the output is.

    Exit status: 0 when every item is done (or was already), 1 when any item or run failed
    (an unreadable or unfit item fails alone: the others complete) or a config was left out
    because its model is not trained (one line each; the other configs run), 2 when a config is
    invalid, its input is missing, its store path is a file or a folder segflow did not
    make, or a shape setting, the pipeline or an output writer fits none of the items
    (``output.regions`` on a pipeline without labels, say: then nothing runs), 130 / 143 when
    stopped by Ctrl-C / SIGTERM.
    """
    try:
        _run(configs, list(set_ or []), verbose=verbose or debug)
    except (typer.Exit, SystemExit):
        raise
    except Exception as error:
        if debug:
            raise
        typer.echo(
            f"segflow: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED) from None


def _run(configs: Sequence[Path], overrides: list[str], *, verbose: bool = False) -> None:
    untrained: list[Path] = []  # configs whose model is not there: reported, left out
    loaded = [load_or_report(path, overrides, untrained=untrained) for path in configs]
    pairs = zip(configs, loaded, strict=True)
    if any(config is None and path not in untrained for path, config in pairs):
        raise typer.Exit(EXIT_INVALID)
    configs = [path for path in configs if path not in untrained]
    loaded = [config for config in loaded if config is not None]
    if not configs:
        raise typer.Exit(EXIT_INVALID)
    try:
        _run_loaded(configs, loaded, overrides, verbose=verbose)
    except typer.Exit as stop:
        raise typer.Exit(stop.exit_code or (EXIT_FAILED if untrained else 0)) from None
    if untrained:  # the others ran; the left-out ones did not
        raise typer.Exit(EXIT_FAILED)


def _run_loaded(
    configs: Sequence[Path], loaded: Sequence[Any], overrides: list[str], *, verbose: bool
) -> None:
    invalid = report(shared_store_problems(configs, loaded))
    collections: list[tuple[Sequence[Any], Sequence[Any], list[str]]] = []
    for path, config in zip(configs, loaded, strict=True):
        notes: list[str] = []
        problems, readers, failures = run_problems(config, notes)
        for problem in problems:
            typer.echo(f"{path}: {problem}", err=True)
        invalid |= bool(problems)
        collections.append((readers, failures, notes))
        del readers, failures  # held by the list alone
    if invalid:
        raise typer.Exit(EXIT_INVALID)
    for path, config in zip(configs, loaded, strict=True):
        _wait_for_store(path, config.output.store, config.run.queue_timeout)
    plans = _plan_runs(loaded, collections)  # takes the readers: freed before the run
    if all(plan.nothing_to_do for plan in plans):
        for config, plan in zip(loaded, plans, strict=True):
            _print_skipped(config, plan)
        typer.echo(
            "nothing to do: every item is done with this input, config and code "
            "(no Prefect server, flow run or Dask cluster was started)",
            err=True,
        )
        return

    from collections import Counter

    from segflow.engine.collection import forget_plans, hand_over_plan
    from segflow.engine.interrupt import stop_requested
    from segflow.flows._server import prefect_api, watch_api
    from segflow.flows._signals import stop_on_signals

    console = Console(stderr=True)
    failed = False
    stores = [config.output.store for config in loaded]
    with (
        prefect_log_file(verbose),
        stop_on_signals(),
        _exit_when_stuck(stores),
        prefect_api() as api_url,
        watch_api(api_url, _api_lost),
        _shared_cluster(loaded) as shared,
    ):
        from segflow.flows._outcomes import RunOutcome
        from segflow.flows.segment import segment_collection

        # A config whose store another config of this command writes first plans anew.
        stores_used = Counter(str(store).rstrip("/") for store in stores)
        for path, config, plan in zip(configs, loaded, plans, strict=True):
            if stop_requested():
                break
            run_overrides = overrides + ([f"cluster.address={shared}"] if shared else [])
            if stores_used[str(config.output.store).rstrip("/")] == 1:
                hand_over_plan(config, plan)
            try:
                with progress_bar(console, str(path), len(plan.work()) + len(plan.skipped)):
                    state = segment_collection(str(path), run_overrides, return_state=True)
            finally:
                forget_plans()  # taken by the flow, unless it ended before planning
            result: Any = state.result(raise_on_failure=False)
            if isinstance(result, RunOutcome):  # failed items, or interrupted
                result = result.summary
            if isinstance(result, BaseException):
                typer.echo(f"{path}: run failed: {type(result).__name__}: {result}", err=True)
                failed = True
                continue
            summary: dict[str, Any] = result
            failed |= bool(summary["failed"])
            _print_summary(summary)
    if (reason := stop_requested()) is not None:
        typer.echo(_stopped_line(reason), err=True)
        raise typer.Exit(_stop_status(reason))
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _print_skipped(config: Any, plan: Any) -> None:
    """The summary of a run of ``config`` whose ``plan`` skips every item."""
    from segflow.engine.collection import run_summary

    skipped, store = plan.skipped.by_id(), config.output.store
    plain = config.output.plain_copy
    _print_summary(run_summary(config.name, store, [], skipped=skipped, plain_copy=plain))


def _plan_runs(
    configs: Sequence[Any], collections: list[tuple[Sequence[Any], Sequence[Any], list[str]]]
) -> list[Any]:
    """Each config's plan, decided with the store's own skip rule
    (:func:`segflow.engine.collection.plan_items`: an index row *and* a commit record with
    this input, config and code), before Prefect is imported or a server or cluster started.
    An unreadable file (to record as failed) or a dead run's lock (to take over) is
    something to do. A plan goes to its flow run, which then does not discover the
    collection again. Which config owns the store was checked before
    (:func:`segflow.flows.preflight._collection_problems`), so the index is not read for it
    twice."""
    from segflow.engine.collection import plan_items

    plans = [
        plan_items(
            readers,
            failures,
            config.output.store,
            config_hash=config.config_hash(),
            overwrite=config.output.overwrite,
            notes=notes,
            plain_copy=config.output.plain_copy,
        )
        for config, (readers, failures, notes) in zip(configs, collections, strict=True)
    ]
    # A reader per discovered item, held by ``collections`` alone, is dropped here, before
    # the run: each item is opened again by the task that segments it.
    collections.clear()
    return plans


# Seconds between two looks at a busy store's lock while the command waits for it.
STORE_POLL_SECONDS = 2.0


def _wait_for_store(path: Path, store: str, timeout: float | None) -> None:
    """Wait while another live run holds ``store`` (runs on one store take turns, as flow
    runs do in the store's queue), at most ``run.queue_timeout`` seconds: one line when the
    wait starts, one when it ends; exit 1 with the holder's line on timeout."""
    from segflow.engine.interrupt import stop_requested

    holder = _lock_holder(store)
    if holder is None:
        return
    limit = "no limit" if timeout is None else f"at most {timeout:.0f} s"
    typer.echo(f"{path}: waiting ({limit}, run.queue_timeout): {holder}", err=True)
    started = time.monotonic()
    while holder is not None:
        waited = time.monotonic() - started
        if stop_requested() or (timeout is not None and waited >= timeout):
            typer.echo(f"{path}: gave up after {waited:.0f} s: {holder}", err=True)
            raise typer.Exit(EXIT_FAILED)
        time.sleep(STORE_POLL_SECONDS if timeout is None else min(STORE_POLL_SECONDS, timeout))
        holder = _lock_holder(store)
    typer.echo(
        f"{path}: store '{store}' is free after {time.monotonic() - started:.0f} s", err=True
    )


def _lock_holder(store: str) -> str | None:
    """Why ``store`` cannot be written now (another live run holds it), or None."""
    from segflow.store.lock import live_holder, locked_message

    holder = live_holder(store)
    return None if holder is None else locked_message(store, holder)


# Seconds a stopped run may take to record what finished before the command exits anyway.
STOP_DEADLINE = 10.0


def _api_lost(reason: str) -> None:
    from segflow.engine.interrupt import request_stop

    request_stop(reason)


def _stopped_line(reason: str) -> str:
    return f"segflow: stopped ({reason}); committed items are kept, rerun to finish"


def _stop_status(reason: str) -> int:
    from segflow.flows._signals import EXIT_SIGNAL

    return EXIT_SIGNAL.get(reason, EXIT_FAILED)


@contextmanager
def _exit_when_stuck(stores: Sequence[str]) -> Iterator[None]:
    """Once a stop is requested, exit within :data:`STOP_DEADLINE` seconds even if Prefect
    is stuck (a dead API): fold this process's records into each store's index first.
    Everything committed is durable already; the next run redoes the rest."""
    import os
    import threading

    from segflow.engine.interrupt import stop_requested

    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.2):
            if (reason := stop_requested()) is None:
                continue
            if finished.wait(STOP_DEADLINE):
                return
            _finish_stores(stores)
            print(_stopped_line(reason), file=sys.stderr, flush=True)
            os._exit(_stop_status(reason))

    thread = threading.Thread(target=watch, name="segflow-stop-deadline", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()


def _finish_stores(stores: Sequence[str]) -> None:
    """Best effort, for stores whose lock this process holds: compact the records (each
    committed item's metadata is consolidated in its group already)."""
    import os

    from segflow.store.index import compact_index
    from segflow.store.lock import read_lock

    for store in stores:
        try:
            holder = read_lock(store)
            if holder is None or holder.get("pid") != os.getpid():
                continue
            compact_index(store)
        except Exception:
            continue


@contextmanager
def _shared_cluster(configs: Sequence[Any]) -> Iterator[str | None]:
    """One LocalCluster for several configs that would each start the same one.

    Starting Dask worker processes costs seconds; when every config asks for the same local
    cluster, the runs share one (each flow run then connects to it by address).
    """
    clusters = {config.cluster.model_dump_json() for config in configs}
    if len(configs) < 2 or len(clusters) > 1 or configs[0].cluster.address:
        yield None
        return
    from segflow.flows.cluster import dask_client

    with dask_client(configs[0].cluster) as client:
        yield str(client.scheduler.address)


# Failed items a summary names; the store's index has every one with its reason.
FAILURES_SHOWN = 20


def _print_summary(summary: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"[bold]{summary['name']}[/]: {summary['done']} done, {summary['skipped']} skipped "
        f"(already done), {summary['failed']} failed"
        + (f", {n} interrupted (not recorded)" if (n := summary.get("interrupted")) else ""),
        highlight=False,
        soft_wrap=True,  # one line, however narrow the terminal or file
    )
    failures = summary["failures"]
    for failure in failures[:FAILURES_SHOWN]:
        console.print(
            f"  [red]failed[/] {escape(failure['error'])}", highlight=False, soft_wrap=True
        )
    if (more := len(failures) - FAILURES_SHOWN + summary.get("failures_omitted", 0)) > 0:
        console.print(
            f"  [red]failed[/] … and {more} more (each with its reason in the index)",
            highlight=False,
        )
    if made := summary.get("made"):
        console.print(f"  made:   {made}", highlight=False, soft_wrap=True)
    console.print(f"  output: {summary['store']}", highlight=False, soft_wrap=True)
    console.print(f"  index:  {summary['index']}", highlight=False, soft_wrap=True)
    if summary["open"]:
        # The interpreter that runs segflow has xarray; a bare `python` may not.
        python = shlex.quote(sys.executable)
        module = summary["open"].split(".", 1)[0]  # xarray, or segflow (no plain copy)
        console.print(
            f'  open:   {python} -c "import {module}; print({summary["open"]})"',
            highlight=False,
            markup=False,
            soft_wrap=True,
        )

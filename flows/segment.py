"""The ``segment`` flow: segment every item of a collection into one Zarr store.

The flow only composes tasks: plan the run (discovery and the store's skip rule), hold the
store while the items run, gather the collection's vectors, report. Prefect runs one task
per item, or per batch of items in a large collection of small ones (``run.batch``), a few
at a time; Dask runs the blocks of each item. Items already done with the same input
fingerprint, config hash and code version are skipped, so a scheduled run only does new or
changed items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from segflow.config import SegflowConfig, apply_overrides, load_config, parse_config
from segflow.engine.collection import (
    ITEMS_IN_FLIGHT,
    Item,
    batch_size,
    batches,
    forget_plans,
    run_summary,
)
from segflow.engine.interrupt import Interrupted, stop_requested
from segflow.engine.rows import IndexRows
from segflow.errors import StoreError
from segflow.flows._cancel import stop_on_cancel
from segflow.flows._outcomes import RunOutcome, expected
from segflow.flows._signals import stop_on_signals
from segflow.flows.cluster import dashboard_link, dask_client
from segflow.flows.naming import RunNamer, add_flow_run_tags, run_tags, segment_run_kind
from segflow.flows.store_queue import QueueTimeoutError, store_queue
from segflow.store.versions import Retention
from segflow.tasks.artifacts import publish_progress, report_items_task
from segflow.tasks.items import plan_items_task, segment_items_task
from segflow.tasks.store import collect_outputs_task, current_run_id, writing_store

# The run's outcome, in its log; the segflow command prints its own summary instead of it.
SUMMARY_LINE = {"segflow_console": False}


class ItemsFailedError(RunOutcome):
    """Some items of a run failed; ``summary`` is the run's summary (the others completed).

    The data of the run's *Failed* state (an expected outcome, not a crash: see
    :mod:`segflow.flows._outcomes`). Read back from a persisted (JSON) flow result, the error
    has its message only and ``summary`` is None.
    """

    def describe(self, summary: dict[str, Any]) -> str:
        failures = "; ".join(f["error"] or f["id"] for f in summary["failures"])
        return f"{summary['failed']} item(s) of {summary['name']!r} failed: {failures}"


class RunInterrupted(RunOutcome):
    """A run stopped by a signal or a cancel; ``summary`` is what it did before it stopped.

    The data of the run's *Cancelled* state (a state's data must be an exception for
    Prefect to read it back: a dict made ``TypeError: Unexpected result for failed state``).
    """

    def describe(self, summary: dict[str, Any]) -> str:
        return (
            f"{summary['name']}: interrupted: {summary['done']} done, "
            f"{summary['interrupted']} interrupted or not started"
        )


def resolve_config(
    config: dict[str, Any] | str | Path, overrides: Sequence[str] = ()
) -> SegflowConfig:
    """A validated config from a YAML path (relative paths resolved against its folder) or
    from a mapping (relative paths resolved against the working directory)."""
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    return parse_config(apply_overrides(config, overrides), base_dir=Path.cwd())


def config_name(parameters: Mapping[str, Any]) -> str:
    """The name of the config a ``segment-collection`` run was given (for its run name)."""
    return resolve_config(parameters["config"], parameters.get("overrides") or ()).name


@flow(
    name="segment-collection",
    flow_run_name=RunNamer(config_name, kind=segment_run_kind),
    # Prefect's stubs declare TaskRunner invariant in its future type, so its own
    # ThreadPoolTaskRunner does not type-check here.
    task_runner=ThreadPoolTaskRunner(max_workers=ITEMS_IN_FLIGHT),  # type: ignore[arg-type]
    validate_parameters=True,
    # The summary is written as JSON to Prefect's result storage (local files under
    # PREFECT_LOCAL_STORAGE_PATH unless configured), so a parent run, the API and the UI
    # can read it after the process is gone.
    persist_result=True,
    result_serializer="json",
)
def segment_collection(
    config: dict[str, Any] | str,
    overrides: list[str] | None = None,
    overwrite: bool | None = None,
    item_filter: list[str] | None = None,
) -> State[Any]:
    """Segment every item of the collection named by ``config`` into its output store.

    Parameters
    ----------
    config
        Path of a YAML config (see ``configs/``) or the config as a mapping.
    overrides
        ``dotted.key=value`` overrides, as ``segflow run --set``.
    overwrite
        Redo items already done; default: the config's ``output.overwrite``.
    item_filter
        Glob patterns on item ids (``["tile_00*"]``); default: every item.

    Returns
    -------
    dict
        The flow's result (the function itself returns the final state): counts of items
        ``done``/``failed``/``skipped``, the ``store``, the ``index`` path, the ``failures``,
        the ``rows`` of this run and how to ``open`` an item.

    Raises
    ------
    ItemsFailedError
        Reading the result of a run where any item failed (after every other item completed
        and the index was written): the flow run ends *Failed* (red in the UI) with one line
        as its message and this error, carrying the summary, as its data.
    RunInterrupted
        The same for a run stopped by a signal or a cancel: it ends *Cancelled*.

    Both are expected outcomes, not crashes: no traceback is logged for them
    (:mod:`segflow.flows._outcomes`).
    """
    cfg = resolve_config(config, overrides or ())
    add_flow_run_tags(run_tags(cfg.name, cfg.output.store))
    # Cancelled from the UI or `prefect flow-run cancel`: stop as SIGTERM does, even when
    # Prefect's own cancellation watcher gave up (flows/_cancel.py). One run per store at a
    # time: others wait their turn (flows/store_queue.py).
    try:
        with (
            stop_on_cancel(),
            store_queue(
                cfg.output.store, timeout=cfg.run.queue_timeout, logger=get_run_logger()
            ) as waited,
        ):
            if waited:  # a plan the command made before the wait is out of date
                forget_plans()
            return _segment(cfg, overwrite, item_filter)
    except QueueTimeoutError as error:
        return _refused(cfg, error)
    except Interrupted as error:  # cancelled (or signalled) while waiting: nothing done
        message = f"{cfg.name}: {error}"
        get_run_logger().warning("%s", message, extra=SUMMARY_LINE)
        return expected(Cancelled(message=message, data=RunInterrupted(message)))


def _segment(
    cfg: SegflowConfig, overwrite: bool | None, item_filter: list[str] | None
) -> State[Any]:
    """The run, while this run holds its store's queue (see :func:`segment_collection`)."""
    logger = get_run_logger()
    store = cfg.output.store
    config_hash = cfg.config_hash()
    run_id = current_run_id()
    plan = plan_items_task(cfg, overwrite, item_filter)
    if isinstance(plan, StoreError):  # another config's store, or a damaged one
        return _refused(cfg, plan)
    work = plan.work()
    rows: list[dict[str, Any]] = []
    # A dead run's lock is taken over even with nothing to do: its flow run is ended
    # Crashed and its records compacted, so neither the UI nor the store keeps its traces.
    if work or plan.stale_lock or plan.plain_copy_changes:
        try:
            keep = plan.stages(config_hash)
            retention = Retention(**cfg.output.retention.model_dump())
            with (
                stop_on_signals(),
                writing_store(
                    store,
                    run_id,
                    keep_stages=keep,
                    retention=retention,
                    plain_copy=cfg.output.plain_copy,
                ),
            ):
                if work:
                    rows += segment_items(cfg, work, config_hash=config_hash, run_id=run_id)
                if any(r["status"] == "done" for r in rows) and stop_requested() is None:
                    # While the lock is held: the writers' collection-wide files (the
                    # vectors folder) get the items this run did (never left stale).
                    done = [r["id"] for r in rows if r["status"] == "done"]
                    collect_outputs_task(store, cfg.output.model_dump(), items=done)
        except StoreError as error:  # occupied, foreign or unwritable
            return _refused(cfg, error)
    rows.sort(key=lambda r: r["id"])
    skipped = plan.skipped.by_id()  # columns, not a dict per skipped item
    summary = summarize(cfg, rows, skipped)
    report_items_task(summary, rows, skipped)
    message = (
        f"{cfg.name}: {summary['done']} done, {summary['skipped']} skipped, "
        f"{summary['failed']} failed -> {store}"
    )
    if (reason := stop_requested()) is not None:
        message = (
            f"{cfg.name}: interrupted ({reason}): {summary['done']} done, "
            f"{summary['interrupted']} interrupted or not started, {summary['failed']} failed, "
            f"{summary['skipped']} skipped -> {store}"
        )
        logger.warning("%s", message, extra=SUMMARY_LINE)
        return expected(Cancelled(message=message, data=RunInterrupted(summary)))
    if summary["failed"]:
        # A bad item is an expected outcome, not an alarm: WARNING, and no traceback.
        logger.warning("%s", message, extra=SUMMARY_LINE)
        return expected(Failed(message=message, data=ItemsFailedError(summary)))
    logger.info("%s", message)
    return Completed(message=message, data=summary)


def _refused(cfg: SegflowConfig, error: StoreError) -> State[Any]:
    """The flow's end when its store refuses the run: one line, no traceback."""
    get_run_logger().error("%s: %s", cfg.name, error, extra=SUMMARY_LINE)
    return expected(Failed(message=f"{cfg.name}: {error}", data=error))


def segment_items(
    cfg: SegflowConfig, work: list[Item], *, config_hash: str, run_id: str
) -> list[dict[str, Any]]:
    """Segment ``work`` on the run's Dask cluster, in task runs of one item or a batch
    (``run.batch``); each item records itself as it finishes."""
    logger = get_run_logger()
    size = batch_size(work, cfg.run.batch)
    with dask_client(cfg.cluster) as client, publish_progress(cfg.name, cfg.output.store, work):
        address = client.scheduler.address
        logger.info(
            "segmenting %d items%s on Dask %s (%d workers)%s",
            len(work),
            f" in task runs of {size}" if size > 1 else "",
            address,
            len(client.scheduler_info()["workers"]),
            f", dashboard {link}" if (link := dashboard_link(client)) else "",
            extra={"segflow_console": True},  # shown on the terminal too (flows/_logs.py)
        )
        quicklook = {item["id"] for item in work[: cfg.run.quicklooks]}
        futures = [
            segment_items_task.submit(
                cfg,
                batch,
                config_hash=config_hash,
                scheduler_address=address,
                run_id=run_id,
                quicklook=[item["id"] for item in batch if item["id"] in quicklook],
            )
            # Automatic batches taper off at the end; a run.batch is kept as given.
            for batch in batches(work, size, taper=cfg.run.batch is None)
        ]
        rows = []
        for future in as_completed(futures):
            # A Failed or Cancelled batch's state holds its rows too.
            result = future.result(raise_on_failure=False)
            if isinstance(result, BaseException):  # the task itself broke (a bug): say so
                raise result
            rows += result
    return rows


def summarize(
    cfg: SegflowConfig, rows: list[dict[str, Any]], skipped: IndexRows | None = None
) -> dict[str, Any]:
    """The small, JSON-serialisable summary a run returns (and the CLI prints): see
    :func:`segflow.engine.collection.run_summary`."""
    plain_copy = cfg.output.plain_copy
    return run_summary(cfg.name, cfg.output.store, rows, skipped=skipped, plain_copy=plain_copy)

"""The ``segment`` flow: segment every item of a collection into one Zarr store.

Prefect runs one task per item (a few at a time); Dask runs the blocks of each item. Items
already done with the same input fingerprint, config hash and code version are skipped, so
a scheduled run only does new or changed items.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from segflow.config import SegflowConfig, apply_overrides, load_config, parse_config
from segflow.engine.interrupt import stop_requested
from segflow.engine.item import code_version
from segflow.errors import StoreError
from segflow.flows._signals import stop_on_signals
from segflow.flows.cluster import dashboard_link, dask_client
from segflow.flows.naming import RunNamer, add_flow_run_tags, run_tags
from segflow.store.commit import stage_name
from segflow.store.lock import has_stale_lock
from segflow.store.select import keep_recorded_ids, run_summary, select_items
from segflow.tasks import artifacts
from segflow.tasks.artifacts import publish_progress, report_items_task
from segflow.tasks.items import discover_items_task, segment_item_task
from segflow.tasks.progress import report_progress
from segflow.tasks.store import (
    compact_vectors_task,
    current_run_id,
    read_commits_task,
    read_index_task,
    record_items_task,
    writing_store,
)

# Items segmented at once. Dask already spreads each item's blocks over every worker; a few
# items in flight hide the round trips between an item's phases.
ITEMS_IN_FLIGHT = 3


class ItemsFailedError(RuntimeError):
    """Some items of a run failed; ``summary`` is the run's summary (the others completed).

    Read back from a persisted (JSON) flow result, the error has its message only and
    ``summary`` is None.
    """

    def __init__(self, summary: dict[str, Any] | str) -> None:
        if isinstance(summary, str):
            self.summary: dict[str, Any] | None = None
            super().__init__(summary)
            return
        self.summary = summary
        failures = "; ".join(f["error"] or f["id"] for f in summary["failures"])
        super().__init__(f"{summary['failed']} item(s) of {summary['name']!r} failed: {failures}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.summary if self.summary is not None else str(self),))


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
    flow_run_name=RunNamer(config_name),
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
        When any item failed, after every other item completed and the index was written;
        the flow run ends Failed (red in the UI) and the error carries the summary.
    """
    logger = get_run_logger()
    cfg = resolve_config(config, overrides or ())
    store = cfg.output.store
    add_flow_run_tags(run_tags(cfg.name, store))
    config_hash = cfg.config_hash()
    run_id = current_run_id()
    items, failed_rows = discover_items_task(cfg.input.path, cfg.input.options)
    index_rows = read_index_task(store)
    items, failed_rows = keep_recorded_ids(items, failed_rows, index_rows)
    done_ids = [r["id"] for r in index_rows if r.get("status") == "done"]
    todo, skipped = select_items(
        items,
        index_rows,
        config_hash=config_hash,
        overwrite=cfg.output.overwrite if overwrite is None else overwrite,
        commits=read_commits_task(store, done_ids) if done_ids else {},
        item_filter=item_filter,
    )
    if item_filter:
        failed_rows = [
            r for r in failed_rows if any(fnmatch.fnmatchcase(r["id"], p) for p in item_filter)
        ]
    for row in skipped:
        logger.info("item %s: skipped, already done with this input, config and code", row["id"])
        report_progress(row["id"], "skipped", 1, 1)
    stages = [stage_name(i["id"], config_hash, i["fingerprint"], code_version()) for i in todo]
    # A file discovery could not open is tried by a task of its own like any item: it fails
    # there, with the same reason, as a Failed task run of that item in the UI.
    unreadable = [{"id": r["id"], "path": r["source"], "fingerprint": ""} for r in failed_rows]
    todo = sorted(todo + unreadable, key=lambda item: item["path"])
    rows: list[dict[str, Any]] = []
    # A dead run's lock is taken over even with nothing to do: its flow run is ended
    # Crashed and its records compacted, so neither the UI nor the store keeps its traces.
    if todo or has_stale_lock(store):
        try:
            with stop_on_signals(), writing_store(store, run_id, keep_stages=stages):
                if todo:
                    rows += segment_items(cfg, todo, config_hash=config_hash, run_id=run_id)
                if any(r["status"] == "done" for r in rows) and stop_requested() is None:
                    # While the lock is held: the collection's vectors in one file (or
                    # an earlier run's file brought up to date, never left stale).
                    compact_vectors_task(store, vectors=cfg.output.vectors)
        except StoreError as error:  # occupied, foreign or unwritable: one line, no traceback
            logger.error("%s: %s", cfg.name, error)
            return Failed(message=f"{cfg.name}: {error}", data=error)
    rows += skipped
    rows.sort(key=lambda r: r["id"])
    summary = summarize(cfg, rows)
    report_items_task(cfg.name, store, rows)
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
        logger.warning("%s", message)
        return Cancelled(message=message, data=summary)
    if summary["failed"]:
        logger.error("%s", message)
        return Failed(message=message, data=ItemsFailedError(summary))
    logger.info("%s", message)
    return Completed(message=message, data=summary)


def segment_items(
    cfg: SegflowConfig, todo: list[dict[str, str]], *, config_hash: str, run_id: str
) -> list[dict[str, Any]]:
    """Segment ``todo`` on the run's Dask cluster, recording each item as it finishes."""
    logger = get_run_logger()
    store = cfg.output.store
    rows = []
    with dask_client(cfg.cluster) as client, publish_progress(cfg.name, store, todo):
        address = client.scheduler.address
        logger.info(
            "segmenting %d items on Dask %s (%d workers)%s",
            len(todo),
            address,
            len(client.scheduler_info()["workers"]),
            f", dashboard {link}" if (link := dashboard_link(client)) else "",
            extra={"segflow_console": True},  # shown on the terminal too (flows/_logs.py)
        )
        futures = [
            segment_item_task.submit(
                item["id"],
                item["path"],
                cfg.pipeline,
                store=store,
                block_shape=cfg.blocks.shape,
                chunks=cfg.output.chunks,
                shards=cfg.output.shards,
                regions=cfg.output.regions,
                regions_intensity=cfg.output.regions_intensity,
                vectors=cfg.output.vectors,
                ome=cfg.output.ome,
                pyramid=cfg.output.pyramid,
                dicom_seg=cfg.output.dicom_seg,
                config_hash=config_hash,
                scheduler_address=address,
                run_id=run_id,
                quicklook=position < artifacts.QUICKLOOK_ITEMS,
                reader_options=cfg.input.options,
            )
            for position, item in enumerate(todo)
        ]
        for future in as_completed(futures):
            row = future.result(raise_on_failure=False)  # a failed item's state holds its row
            if isinstance(row, BaseException):  # the task itself broke (a bug): say so
                raise row
            rows.append(row)
            if row["status"] == "interrupted":
                continue  # neither done nor failed: its previous result stays as it was
            # Recorded as each item finishes, after its data is committed: a killed run
            # keeps the records of what it finished.
            record_items_task(store, run_id, [row])
    return rows


def summarize(cfg: SegflowConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The small, JSON-serialisable summary a run returns (and the CLI prints): see
    :func:`segflow.store.select.run_summary`."""
    return run_summary(cfg.name, cfg.output.store, rows)

"""Tasks that plan a collection's run and segment its items: references in, small dicts out.

The work itself is the engine's (:mod:`segflow.engine.collection`); these tasks give it a
Prefect task run each, with a state that says what happened (a failed item is red in the
UI, with its reason as the message) and the log lines a platform team reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Failed

from segflow.config import SegflowConfig
from segflow.engine.collection import Item, ItemPlan, plan_collection, run_item
from segflow.engine.executor import DaskExecutor
from segflow.engine.item import describe_output
from segflow.engine.rows import ITER_BATCH, IndexRows
from segflow.errors import StoreError
from segflow.flows._outcomes import expected
from segflow.store.lock import is_local
from segflow.tasks.artifacts import publish_quicklook
from segflow.tasks.progress import ItemsProgress, report_progress
from segflow.tasks.store import current_run_name

# Ids a run's log names when it speaks of many items at once (the rest are counted).
NAMED_IDS = 5


@task(name="plan-items", retries=0, cache_policy=NO_CACHE)
def plan_items_task(
    cfg: SegflowConfig, overwrite: bool | None = None, item_filter: Sequence[str] | None = None
) -> ItemPlan | StoreError:
    """Discover ``cfg``'s collection and decide what this run does (the store's skip rule,
    its recorded ids, ``item_filter``): :func:`segflow.engine.collection.plan_collection`.

    A store this config may not write (another config's, a damaged one) comes back as the
    ``StoreError``: the flow refuses it in one line, not this task with a traceback at
    ERROR (an expected outcome, not a crash)."""
    logger = get_run_logger()
    notes: list[str] = []
    try:
        plan = plan_collection(cfg, overwrite=overwrite, item_filter=item_filter, notes=notes)
    except StoreError as error:
        return error
    for note in notes:  # left out on purpose (a DICOM folder's RTSTRUCT, say)
        logger.info("%s", note)
    # Each unreadable file's reason is logged by its own (failed) segment task run.
    logger.info(
        "%s: %d items to segment, %d skipped (already done with this input, config and "
        "code%s), %d unreadable",
        cfg.input.path,
        len(plan.todo),
        len(plan.skipped),
        f": {_first_ids(plan.skipped.head(NAMED_IDS), len(plan.skipped))}" if plan.skipped else "",
        len(plan.failed),
    )
    for item_id in _each_id(plan.skipped):  # the command's progress bar counts them
        report_progress(item_id, "skipped", 1, 1)
    return plan


def _each_id(rows: IndexRows) -> Iterator[str]:
    """The rows' ids, a batch of Python strings at a time (not one per row at once)."""
    ids = rows.ids()
    for first in range(0, len(ids), ITER_BATCH):
        yield from (str(i) for i in ids.slice(first, ITER_BATCH).to_pylist())


def batch_run_name(parameters: dict[str, Any]) -> str:
    """``segment-ITEM`` for one item, ``segment-FIRST..LAST (N items)`` for a batch."""
    items = parameters["items"]
    if len(items) == 1:
        return f"segment-{items[0]['id']}"
    return f"segment-{items[0]['id']}..{items[-1]['id']} ({len(items)} items)"


@task(
    name="segment-items",
    # Prefect's protocol for a callable name also asks for a classmethod no function has.
    task_run_name=batch_run_name,  # type: ignore[arg-type]
    retries=0,  # failures are deterministic (bad input, bad config): retrying repeats them
    cache_policy=NO_CACHE,  # skipping done items is decided by the index fingerprints
    # Tags cost an API call per task run (Prefect checks tag concurrency limits), so only
    # this task has them: `prefect concurrency-limit create segment N` caps batches in flight.
    tags=["segflow", "segment"],
)
def segment_items_task(
    cfg: SegflowConfig,
    items: list[Item],
    *,
    config_hash: str,
    scheduler_address: str,
    run_id: str,
    quicklook: Sequence[str] = (),
) -> Any:
    """Segment ``items`` one after another on the Dask cluster at ``scheduler_address``,
    recording each as it finishes; return their index rows.

    The blocks run on the Dask workers; only small rows come back. One item logs a line of
    its own; a batch logs a line per item that failed or was interrupted and one line for
    the batch at its end (the items table and the index have every item). A bad item never stops
    the others: the task run ends *Failed* when any item failed, its message naming them
    and their reasons (*Cancelled* when the run was stopped), with the rows as the state's
    data either way; expected outcomes, logged at WARNING without Prefect's echo of the
    rows (:mod:`segflow.flows._outcomes`). The items whose ids are in ``quicklook`` get a
    quick look, written into the item before its commit, and an artifact linking it when
    done (a failure there is only logged).
    """
    from distributed import get_client

    logger = get_run_logger()
    executor = DaskExecutor(get_client(scheduler_address))
    started = time.perf_counter()
    rows = []
    for item in items:
        row, _reader = run_item(
            cfg,
            item,
            executor=executor,
            run_id=run_id,
            run_name=current_run_name(),
            config_hash=config_hash,
            progress=report_progress,
            quicklook=item["id"] in quicklook,
        )
        rows.append(row)
        # A batch says what each item did once, at its end (below), and only what went wrong
        # item by item: at 100,000 items a line each would be 100,000 log records to store.
        if len(items) == 1 or row["status"] != "done" or row.get("warning"):
            _log_item(logger, cfg.output.store, row, plain_copy=cfg.output.plain_copy)
        if row["status"] == "done" and row["id"] in quicklook:
            try:
                publish_quicklook(cfg.output.store, row)
            except Exception as error:  # a picture never fails the item
                logger.warning(
                    "item %s: no quick look (%s: %s)", row["id"], type(error).__name__, error
                )
    if len(items) > 1:
        counts = {s: sum(r["status"] == s for r in rows) for s in ItemsProgress.FINAL}
        logger.info(
            "%d items: %s, %.1f s -> %s",
            len(rows),
            ", ".join(f"{n} {status}" for status, n in counts.items() if n),
            time.perf_counter() - started,
            cfg.output.store,
        )
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        message = "; ".join(str(row["error"]) for row in failed)
        if len(rows) > 1:
            message = f"{len(failed)} of {len(rows)} items failed: {message}"
        return expected(Failed(message=message, data=rows))
    if interrupted := [row for row in rows if row["status"] == "interrupted"]:
        return expected(Cancelled(message=str(interrupted[0]["error"]), data=rows))
    return rows


def _log_item(logger: Any, store: str, row: dict[str, Any], *, plain_copy: bool = True) -> None:
    if row["status"] == "interrupted" and str(row["error"]).startswith("not started"):
        # Queued when the run was asked to stop: the run's summary counts them (a line
        # each on the terminal would be one per item of the collection).
        logger.info("item %s: %s", row["id"], row["error"])
    elif row["status"] == "interrupted":
        logger.warning("item %s: interrupted, its previous result is unchanged", row["id"])
    elif row["status"] == "done" and row.get("warning"):
        logger.warning("item %s: done, %s", row["id"], row["warning"])
    elif row["status"] == "done":
        logger.info(
            "item %s: done, %s, %d blocks, %.2f s -> %s",
            row["id"],
            describe_output(row["object_count"], row["foreground_fraction"]) or "no count",
            row["n_blocks"],
            row["seconds"],
            _output_at(store, row, plain_copy),
        )
    else:  # a bad item is an expected outcome: WARNING, the alarms are for bugs
        logger.warning("%s", row["error"])


def _output_at(store: str, row: Mapping[str, Any], plain_copy: bool) -> str:
    """Where the item's output is read: ``STORE/ITEM/OUTPUT``, or on an object store
    without a plain copy (``output.plain_copy: false``) the expression that reads it."""
    if plain_copy or is_local(store):
        return f"{store.rstrip('/')}/{row['id']}/{row['output']}"
    return f"segflow.open_store({store.rstrip('/')!r})[{row['id']!r}][{row['output']!r}]"


def _first_ids(rows: Sequence[Mapping[str, Any]], total: int | None = None) -> str:
    """The first :data:`NAMED_IDS` ids of ``rows`` and how many more (of ``total``)."""
    total = len(rows) if total is None else total
    ids = [str(row["id"]) for row in rows[:NAMED_IDS]]
    return ", ".join(ids) + (f", … ({total - NAMED_IDS} more)" if total > NAMED_IDS else "")

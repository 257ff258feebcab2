"""Tasks that find items and segment one item: references in, small dicts out."""

from __future__ import annotations

import functools
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Failed

from segflow.engine.executor import DaskExecutor
from segflow.engine.interrupt import stop_requested
from segflow.engine.item import ItemResult, describe_output, segment_item
from segflow.io import discover_items, open_item
from segflow.store.select import item_references
from segflow.tasks.artifacts import publish_quicklook
from segflow.tasks.progress import report_progress


@task(name="discover-items", retries=0, cache_policy=NO_CACHE)
def discover_items_task(
    input_path: str, options: dict[str, Any] | None = None
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Find the items under ``input_path`` (``options``: the readers' ``input.options``).

    Returns ``(items, failures)``: ``items`` are ``{"id", "path", "fingerprint"}`` references;
    ``failures`` are index rows (status ``failed``) for files that could not be opened.
    """
    notes: list[str] = []
    items, rows = item_references(*discover_items(input_path, notes=notes, **(options or {})))
    logger = get_run_logger()
    # Each unreadable file's reason is logged by its own (failed) segment-item task run.
    logger.info("found %d items under %s (%d unreadable)", len(items), input_path, len(rows))
    for note in notes:  # left out on purpose (a DICOM folder's RTSTRUCT, say)
        logger.info("%s", note)
    return items, rows


@task(
    name="segment-item",
    task_run_name="segment-{item_id}",
    retries=0,  # failures are deterministic (bad input, bad config): retrying repeats them
    cache_policy=NO_CACHE,  # skipping done items is decided by the index fingerprints
    # Tags cost an API call per task run (Prefect checks tag concurrency limits), so only
    # this task has them: `prefect concurrency-limit create segment N` caps items in flight.
    tags=["segflow", "segment"],
)
def segment_item_task(
    item_id: str,
    path: str,
    pipeline: list[dict[str, Any]],
    *,
    store: str,
    block_shape: list[int] | int | None,
    chunks: list[int] | None,
    shards: list[int] | None,
    regions: bool = False,
    regions_intensity: str | None = "input",
    vectors: bool = False,
    ome: bool = True,
    pyramid: int | None = None,
    dicom_seg: bool = False,
    config_hash: str,
    scheduler_address: str,
    run_id: str,
    reader_options: dict[str, Any] | None = None,
    quicklook: bool = False,
) -> Any:
    """Segment one item on the Dask cluster at ``scheduler_address``; return its index row
    (as the data of a Failed or Cancelled state when the item failed or was interrupted).

    The blocks run on the Dask workers; only the small row comes back. Never raises for a
    bad item: the row says ``failed`` and its ``error`` names the item and the reason. With
    ``quicklook``, a done item gets a quick-look artifact (a failure there is only logged).
    """
    from distributed import get_client

    logger = get_run_logger()
    if (reason := stop_requested()) is not None:  # queued when the run was asked to stop
        return ItemResult(
            id=item_id, source=path, status="interrupted", error=f"not started ({reason})"
        ).as_row()
    try:
        reader = open_item(path, item_id, **(reader_options or {}))
    except Exception as error:  # the file changed or vanished since discovery
        reason = (
            str(error)
            if item_id in str(error) or path in str(error)
            else (f"item {item_id!r} ({path}): {type(error).__name__}: {error}")
        )
        row = ItemResult(id=item_id, source=path, status="failed", error=reason).as_row()
    else:
        result = segment_item(
            reader,
            pipeline,
            store=store,
            block_shape=block_shape,
            executor=DaskExecutor(get_client(scheduler_address)),
            chunks=chunks,
            shards=shards,
            regions=regions,
            regions_intensity=regions_intensity,
            vectors=vectors,
            ome=ome,
            pyramid=pyramid,
            dicom_seg=dicom_seg,
            config_hash=config_hash,
            progress=functools.partial(report_progress, item_id),
            run_id=run_id,
            resumable=True,
        )
        row = result.as_row()
    if row["status"] == "interrupted":
        logger.warning("item %s: interrupted, its previous result is unchanged", item_id)
    elif row["status"] == "done":
        logger.info(
            "item %s: done, %s, %d blocks, %.2f s -> %s",
            item_id,
            describe_output(row["object_count"], row["foreground_fraction"]) or "no count",
            row["n_blocks"],
            row["seconds"],
            f"{store.rstrip('/')}/{item_id}/{row['output']}",
        )
        if quicklook:
            try:
                publish_quicklook(reader, store, row)
            except Exception as error:  # a picture never fails the item
                logger.warning(
                    "item %s: no quick look (%s: %s)", item_id, type(error).__name__, error
                )
    else:
        logger.error("%s", row["error"])
    report_progress(item_id, row["status"], 1, 1)
    # The task run's state says what happened to the item (a failed item is red in the UI,
    # with its reason as the message); the row travels as the state's data either way.
    if row["status"] == "failed":
        return Failed(message=str(row["error"]), data=row)
    if row["status"] == "interrupted":
        return Cancelled(message=str(row["error"]), data=row)
    return row

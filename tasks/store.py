"""Tasks that hold and read the output store: its lock, its index, the collection's vectors.

Items record themselves as they finish (:func:`segflow.engine.collection.run_item`, in their
own task runs): no task run per record on the flow's thread."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from segflow.engine.collection import index_rows
from segflow.store import consolidate_store
from segflow.store.commit import (
    check_store,
    discard_trash,
    prepare_store,
)
from segflow.store.index import compact_index
from segflow.store.lock import hold_store_lock


def current_run_id() -> str:
    """The Prefect flow run's id, or a new id outside a flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4().hex)


@contextmanager
def writing_store(store: str, run_id: str, *, keep_stages: Collection[str] = ()) -> Iterator[None]:
    """Hold ``store`` for one run: refuse a foreign folder, take its lock, prepare it
    (keeping the staged items of ``keep_stages`` to resume); at the end fold the run's
    records into the index, consolidate and release the lock (also when the run fails or
    is interrupted).

    The consolidated metadata is brought up to date for the items this run recorded only;
    after a run that died (its lock taken over here), for the whole store, since it may
    have swapped in an item it did not live to record.
    """
    check_store(store)  # before the lock file is written into the folder
    with hold_store_lock(store, run_id=run_id) as lock:
        if lock.broken is not None:
            mark_crashed(lock.broken, store)
        prepare_store(store, keep_stages=keep_stages)
        try:
            yield
        finally:
            discard_trash(store, run_id)
            recorded = compact_index(store)
            consolidate_store(store, items=None if lock.broken is not None else recorded)


def mark_crashed(holder: dict[str, Any], store: str) -> None:
    """End the flow run of a dead lock holder Crashed if Prefect still shows it Running.

    A run killed with SIGKILL (or whose machine went away) cannot report its end, and its
    flow run would stay Running in the UI forever; the next run on its store knows it died.
    """
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    logger = get_run_logger()
    logger.warning(
        "took over the lock of a run that died: run %s (PID %s on %s)",
        holder.get("run_id"),
        holder.get("pid"),
        holder.get("host"),
    )
    try:
        run_id = uuid.UUID(str(holder.get("run_id")))
    except ValueError:
        return  # not a Prefect flow run (a notebook or test holder)
    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(run_id)
            if flow_run.state is not None and not flow_run.state.is_final():
                client.set_flow_run_state(
                    run_id,
                    Crashed(
                        message=f"its process died while writing {store}; the next run "
                        "took over the store"
                    ),
                    force=True,
                )
    except Exception as error:  # another server, or gone: nothing to correct there
        logger.info("could not mark run %s crashed: %s", run_id, error)


@task(name="read-index", retries=0, cache_policy=NO_CACHE)
def read_index_task(store: str) -> list[dict[str, Any]]:
    """The rows of ``STORE/index.parquet`` (none when the store is new), as plain dicts."""
    return index_rows(store)


@task(name="write-index", retries=0, cache_policy=NO_CACHE)
def write_index_task(store: str, rows: list[dict[str, Any]]) -> str:
    """Merge ``rows`` into ``STORE/index.parquet`` (keyed by item id); return its path."""
    from segflow.store import write_index

    return str(write_index(store, rows))


@task(name="compact-vectors", retries=0, cache_policy=NO_CACHE)
def compact_vectors_task(store: str, *, vectors: bool) -> str | None:
    """Write ``STORE/vectors.parquet`` from every committed item's vectors; without
    ``vectors`` (the run's ``output.vectors``) only refresh one an earlier run wrote."""
    from prefect import get_run_logger

    from segflow.store.vectors import compact_vectors

    logger = get_run_logger()
    try:
        path, note = compact_vectors(store, refresh_only=not vectors)
    except Exception as error:  # the items are done and committed: only this file is lost
        logger.error(
            "%s/vectors.parquet not written (%s: %s); each item's vectors.parquet is complete",
            store.rstrip("/"),
            type(error).__name__,
            error,
        )
        return None
    if note:
        logger.info("%s", note)
    return path

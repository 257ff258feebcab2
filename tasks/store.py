"""Tasks that hold and read the output store: its lock, its index, the collection's vectors.

Items record themselves as they finish (:func:`segflow.engine.collection.run_item`, in their
own task runs): no task run per record on the flow's thread."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segflow.engine.collection import index_rows
from segflow.store.commit import (
    check_store,
    discard_trash,
    prepare_store,
)
from segflow.store.index import compact_index, migrate_index
from segflow.store.lock import hold_store_lock, lock_lost
from segflow.store.metadata import migrate_store
from segflow.store.pointers import set_plain_copy
from segflow.store.versions import Retention, apply_retention


def current_run_id() -> str:
    """The Prefect flow run's id, or a new id outside a flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4().hex)


def current_run_name() -> str | None:
    """The Prefect flow run's name (``brave-otter``), or None outside a flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.name) if flow_run.name else None


@contextmanager
def writing_store(
    store: str,
    run_id: str,
    *,
    keep_stages: Collection[str] = (),
    retention: Retention | None = None,
    plain_copy: bool = True,
) -> Iterator[None]:
    """Hold ``store`` for one run: refuse a foreign folder, take its lock, prepare it
    (keeping the staged items of ``keep_stages`` to resume), apply ``plain_copy``
    (``output.plain_copy``, object stores) to every item; at the end prune the old
    versions of the items the run committed (``retention``), fold the run's records into
    the index and release the lock (also when the run fails or is interrupted).

    Each item's metadata is consolidated in its group as it commits; a store an older
    segflow consolidated at its root is migrated here, with one line in the log
    (:func:`segflow.store.metadata.migrate_store`), as is an older single-file index
    (:func:`segflow.store.index.migrate_index`).
    """
    check_store(store)  # before the lock file is written into the folder
    with hold_store_lock(store, run_id=run_id) as lock:
        if lock.broken is not None:
            mark_crashed(lock.broken, store)
        prepare_store(store, keep_stages=keep_stages)
        if (note := migrate_store(store)) is not None:
            _logger().warning("%s", note)
        if (note := migrate_index(store)) is not None:  # a single-file index into parts
            _logger().warning("%s", note)
        if changed := set_plain_copy(store, plain_copy):  # output.plain_copy changed
            what = "copied to STORE/ITEM" if plain_copy else "removed from STORE/ITEM"
            _logger().warning("%s: plain copies of %d item(s) %s", store, changed, what)
        try:
            yield
        finally:
            _end_run(store, run_id, retention)


def _end_run(store: str, run_id: str, retention: Retention | None) -> None:
    """Prune the run's old versions and fold its records into the index, unless another
    run took the store's lock over meanwhile (then the store's bookkeeping is that run's)."""
    if (lost := lock_lost(store)) is not None:
        _logger().error("%s", lost)
        return
    discard_trash(store, run_id)
    if retention is not None and (pruned := apply_retention(store, retention, run_id)):
        _logger().info("%s: %d old item version(s) pruned", store, pruned)
    compact_index(store)


def _logger() -> Any:
    """The flow run's logger, or segflow's outside a flow run (a notebook, a test)."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("segflow")


def mark_crashed(holder: dict[str, Any], store: str) -> None:
    """Close what Prefect still shows of a dead lock holder's run: its flow run and its
    unfinished task runs end *Crashed* and its progress artifact says where it stopped.

    A run killed with SIGKILL (an out-of-memory kill, or a machine that went away) cannot
    report its end: its flow run, the task runs of the items it was segmenting and its
    progress ("3 running") would stay as they were in the UI forever. The lock records the
    run's Prefect flow run id (``run_id``); the next run on its store knows it died.
    """
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client

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
    message = f"its process died while writing {store}; the next run took over the store"
    try:
        with get_client(sync_client=True) as client:
            _crash_unfinished(client, run_id, message)
            _finish_progress(client, run_id)
    except Exception as error:  # another server, or gone: nothing to correct there
        logger.info("could not mark run %s crashed: %s", run_id, error)


def _crash_unfinished(client: Any, run_id: uuid.UUID, message: str) -> None:
    """End the flow run ``run_id`` and its task runs Crashed where they are not final."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    flow_run = client.read_flow_run(run_id)
    if flow_run.state is not None and not flow_run.state.is_final():
        client.set_flow_run_state(run_id, Crashed(message=message), force=True)
    unfinished = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))
        ),
    )
    for task_run in tasks:
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)


def _finish_progress(client: Any, run_id: uuid.UUID) -> None:
    """Say on the dead run's progress artifact that it stopped there (its per cent kept)."""
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )
    from prefect.runtime import flow_run

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            type=ArtifactFilterType(any_=["progress"]),
        )
    )
    for artifact in artifacts:
        last = str(artifact.description or "").replace(" running: ", " were running: ")
        client.update_artifact(
            artifact.id,
            ArtifactUpdate(
                description=f"**Crashed at {artifact.data} %**: the run's process died; run "
                f"{flow_run.name or flow_run.id} took over its store (its unfinished items "
                f"are redone by the runs that follow). When it died: {last}"
            ),
        )


@task(name="read-index", retries=0, cache_policy=NO_CACHE)
def read_index_task(store: str) -> list[dict[str, Any]]:
    """The rows of ``STORE/index.parquet`` (none when the store is new), as plain dicts."""
    return index_rows(store)


@task(name="write-index", retries=0, cache_policy=NO_CACHE)
def write_index_task(store: str, rows: list[dict[str, Any]]) -> str:
    """Merge ``rows`` into ``STORE/index.parquet`` (keyed by item id); return its path."""
    from segflow.store import write_index

    return str(write_index(store, rows))


@task(name="collect-outputs", retries=0, cache_policy=NO_CACHE)
def collect_outputs_task(
    store: str, output: dict[str, Any], items: list[str] | None = None
) -> list[str]:
    """Each output writer's collection-wide step for ``items`` (the items the run did):
    the collection's ``vectors.parquet/`` folder, say (``output``: the run's ``output``
    section; a writer it leaves off only refreshes what an earlier run wrote). Returns
    the paths the steps keep; a step that fails is logged and loses only its own file."""
    from segflow.store.writers import collecting_writers

    logger = get_run_logger()
    paths = []
    for writer, settings in collecting_writers(output):
        assert writer.collect is not None
        try:
            path, note = writer.collect(store, settings, items)
        except Exception as error:  # the items are done and committed: only this file is lost
            logger.error(
                "%s: writer %r's collection file removed (%s: %s); each item's own files "
                "are complete",
                store.rstrip("/"),
                writer.name,
                type(error).__name__,
                error,
            )
            continue
        if note:
            logger.info("%s", note)
        if path is not None:
            paths.append(path)
    return paths

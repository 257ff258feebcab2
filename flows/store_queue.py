"""One queue per store: a run that writes a store waits while another run writes it.

Every flow run that writes a store (a nightly ``segment-collection`` run, a rebuild, a
backfill's child run, a ``segflow run``) holds one slot of a Prefect **global concurrency
limit** named after the store, ``segflow-store-HASH`` (:func:`queue_name`: 8 hex digits of
the store's absolute path or URL, the same digits as the store's artifact keys), created
with one slot on first use. A second run on the same store waits for the slot, saying so in
its log (the store, the limit, and the run that holds the store); runs on other stores
have other limits and never wait for it. The store's own lock
(:mod:`segflow.store.lock`) stays the last line of defence.

The slot is a *lease* (Prefect 3.9's ``prefect.concurrency.sync.concurrency``): renewed
every 45 s while the run lives, so a run killed with SIGKILL (an out-of-memory kill) frees
the store once its lease has expired and the server's repossessor has noticed, within
about :data:`LEASE_SECONDS` + 15 s. Prefect keeps leases in the server's memory unless
``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem``
is set: without it a server restart forgets the leases of running runs and their slots stay
taken (deploy/README.md).

A run waits at most ``run.queue_timeout`` seconds, then ends *Failed* with one line
(:class:`QueueTimeoutError`); a run cancelled while it waits ends at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from segflow.engine.interrupt import Interrupted, stop_requested
from segflow.errors import StoreError

# Prefect's shortest lease (the API refuses less): renewed every 45 s (75 %) while the run
# lives, expired about a minute after its process died.
LEASE_SECONDS = 60.0
# Seconds between two tries for a busy store's slot (and checks for a cancel meanwhile).
POLL_SECONDS = 2.0
QUEUE_PREFIX = "segflow-store-"


class QueueTimeoutError(StoreError, TimeoutError):
    """A run waited longer than ``run.queue_timeout`` for its store."""


def queue_name(store: str) -> str:
    """The name of ``store``'s global concurrency limit: ``segflow-store-`` and 8 hex digits
    of its absolute path or URL (so ``out.zarr``, ``./out.zarr/`` and its absolute path
    are one queue).

    Examples
    --------
    >>> queue_name("s3://bucket/aerial.zarr") == queue_name("s3://bucket/aerial.zarr/")
    True
    >>> queue_name("s3://bucket/aerial.zarr")
    'segflow-store-ab56ed8b'
    """
    from segflow.tasks.artifacts import output_hash

    return QUEUE_PREFIX + output_hash(store)


@contextmanager
def store_queue(store: str, *, timeout: float | None, logger: Any) -> Iterator[float]:
    """Hold ``store``'s slot for the duration; yield the seconds this run waited for it
    (0 when the store was free).

    Raises :class:`QueueTimeoutError` after ``timeout`` seconds of waiting (None: no
    limit) and :class:`~segflow.engine.interrupt.Interrupted` when the run is asked to
    stop (a cancel, a signal) while it waits.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    name = queue_name(store)
    run_id = _flow_run_id()
    holder = None if run_id is None else ConcurrencyLeaseHolder(type="flow_run", id=run_id)
    with get_client(sync_client=True) as client:
        _ensure_limit(client, name, store, logger)
    started = time.monotonic()
    said: str | None = None
    with ExitStack() as stack:
        while True:
            if (reason := stop_requested()) is not None:
                raise Interrupted(f"stopped ({reason}) while waiting for store '{store}'")
            waited = time.monotonic() - started
            if timeout is not None and waited >= timeout:
                raise QueueTimeoutError(_timeout_line(store, name, waited, _holder_name(store)))
            wait = POLL_SECONDS if timeout is None else min(POLL_SECONDS, timeout - waited)
            try:
                stack.enter_context(
                    concurrency(
                        name,
                        timeout_seconds=max(wait, 0.1),
                        lease_duration=LEASE_SECONDS,
                        strict=True,  # the limit exists (made above): never run unqueued
                        holder=holder,
                        # A server that restarts must not kill a run: its lease is renewed
                        # once the server answers again.
                        raise_on_lease_renewal_failure=False,
                    )
                )
                break
            except TimeoutError:
                if (holding := _holder_name(store)) != said:
                    said = holding
                    logger.info("%s", _waiting_line(store, name, holding, timeout))
        if said is None:  # the store was free
            yield 0.0
            return
        waited = time.monotonic() - started
        logger.info("store '%s' is free after %.0f s in its queue: this run goes on", store, waited)
        yield waited


def _ensure_limit(client: Any, name: str, store: str, logger: Any) -> None:
    """Create ``name`` with one slot unless it exists (two runs may race: one creates it)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(name)
        return
    except ObjectNotFound:
        pass
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    except ObjectAlreadyExists:
        return
    logger.info("created Prefect global concurrency limit %s (1 slot) for store '%s'", name, store)


def _flow_run_id() -> uuid.UUID | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return None if context is None or context.flow_run is None else context.flow_run.id


def _holder_name(store: str) -> str:
    """The run that writes ``store`` now, as its lock names it (with its Prefect flow run's
    name when the API knows it), or what is known when no run writes it yet."""
    from segflow.store.lock import live_holder

    try:
        lock = live_holder(store)
    except Exception:  # an unreadable remote store: the queue still says which store
        lock = None
    if lock is None:
        return "another run (planning, not writing yet)"
    run_id = str(lock.get("run_id"))
    where = f"PID {lock.get('pid')} on {lock.get('host')}"
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(uuid.UUID(run_id))
        return f"flow run '{flow_run.name}' ({run_id}, {where})"
    except Exception:  # not a flow run id, or another server's run
        return f"run {run_id} ({where})"


def _waiting_line(store: str, name: str, holder: str, timeout: float | None) -> str:
    """The log line of a run that waits its turn.

    Examples
    --------
    >>> _waiting_line("/data/a.zarr", "segflow-store-1234abcd", "run 7 (PID 9 on h)", 3600)
    "store '/data/a.zarr' is written by run 7 (PID 9 on h): this run waits its turn \
(Prefect concurrency limit segflow-store-1234abcd, at most 3600 s: run.queue_timeout)"
    """
    limit = "no time limit" if timeout is None else f"at most {timeout:.0f} s"
    return (
        f"store '{store}' is written by {holder}: this run waits its turn (Prefect "
        f"concurrency limit {name}, {limit}: run.queue_timeout)"
    )


def _timeout_line(store: str, name: str, waited: float, holder: str) -> str:
    return (
        f"waited {waited:.0f} s for store '{store}' (run.queue_timeout), still written by "
        f"{holder}: not run; the next run does these items (Prefect concurrency limit {name})"
    )

"""One queue per store: a run that writes a store waits while another run writes it.

Every flow run that writes a store (a nightly ``segment-collection`` run, a rebuild, a
backfill's child run, a ``segflow run``) holds one slot of a Prefect **global concurrency
limit** named after the store, ``segflow-store-HASH`` (:func:`queue_name`: 8 hex digits of
the store's absolute path or URL, the same digits as the store's artifact keys), created
with one slot on first use. A second run on the same store waits for the slot, saying so in
its log (the store, the limit, and the run that holds the store); runs on other stores
have other limits and never wait for it. The store's own lock
(:mod:`segflow.store.lock`) stays the last line of defence.

The slot is a *lease* (the API calls of Prefect 3.9's ``prefect.concurrency.sync.concurrency``,
one try at a time here: see :func:`_try_slot`), renewed every 45 s while the run lives, so a
run killed with SIGKILL (an out-of-memory kill) frees the store once its lease has expired
and the server's repossessor has noticed, within about :data:`LEASE_SECONDS` + 15 s. Prefect
keeps leases in the server's memory unless
``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem``
is set: without it a server restart forgets the leases of running runs and their slots stay
taken (deploy/README.md); a waiting run frees such a slot once nobody has written the store
for :data:`LEAKED_AFTER` seconds.

A run waits at most ``run.queue_timeout`` seconds, then ends *Failed* with one line
(:class:`QueueTimeoutError`); a run cancelled while it waits ends at once.
"""

from __future__ import annotations

import contextvars
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segflow.engine.interrupt import Interrupted, stop_requested
from segflow.errors import StoreError

# Prefect's shortest lease (the API refuses less): renewed every 45 s (75 %) while the run
# lives, expired about a minute after its process died.
LEASE_SECONDS = 60.0
# Seconds between two tries for a busy store's slot (and checks for a cancel meanwhile).
POLL_SECONDS = 2.0
# A slot taken while no run has written the store for this long is a leaked one (a server
# that kept its leases in memory restarted, forgetting the lease of a run that ended since):
# it is freed. Far longer than a lease's expiry (60 s + 15 s) and than planning a large
# collection before the lock is taken (about a minute at 100,000 items).
LEAKED_AFTER = 600.0
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

    name = queue_name(store)
    started = time.monotonic()
    said: str | None = None
    unwritten = _Unwritten(store, name, logger)
    with get_client(sync_client=True) as client:
        _ensure_limit(client, name, store, logger)
        while (lease := _try_slot(client, name)) is None:
            waited = time.monotonic() - started
            if timeout is not None and waited >= timeout:
                raise QueueTimeoutError(_timeout_line(store, name, waited, _holder_name(store)))
            if (holding := _holder_name(store)) != said:
                said = holding
                # a WARNING: the terminal shows it, so a run that seems to stall says why
                logger.warning("%s", _waiting_line(store, name, holding, timeout))
            unwritten.check()
            if _free_dead_holder(client, name, store, logger):
                continue  # its slot is free now: try again at once
            time.sleep(POLL_SECONDS if timeout is None else min(POLL_SECONDS, timeout - waited))
            if (reason := stop_requested()) is not None:
                raise Interrupted(f"stopped ({reason}) while waiting for store '{store}'")
    waited = time.monotonic() - started if said is not None else 0.0
    if said is not None:
        logger.info("store '%s' is free after %.0f s in its queue: this run goes on", store, waited)
    record = _record_holder(name, lease)
    try:
        with _renewing(lease, logger):
            yield waited
    finally:
        _forget_holder(record, lease)


def _try_slot(client: Any, name: str) -> uuid.UUID | None:
    """The lease of ``name``'s slot, or None while another run holds it.

    Prefect's ``concurrency()`` context manager waits in a service thread that logs each
    timed-out try at ERROR ("failed to process item"): an alarm every poll of a waiting run.
    These are the same API calls, one try each.
    """
    import httpx
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    run_id = _flow_run_id()
    holder = None if run_id is None else ConcurrencyLeaseHolder(type="flow_run", id=run_id)
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS, holder=holder
        )
    except httpx.HTTPStatusError as error:
        if error.response.status_code == 423:  # locked: the slot is taken
            return None
        raise
    answer = response.json()
    if not answer.get("limits"):  # deleted since it was made: never run unqueued
        raise StoreError(f"Prefect concurrency limit {name} does not exist")
    return uuid.UUID(answer["lease_id"])


@contextmanager
def _renewing(lease: uuid.UUID, logger: Any) -> Iterator[None]:
    """Renew ``lease`` every 3/4 of :data:`LEASE_SECONDS` (every 5 s after a failed try: a
    server restarting) while the block runs, then release it."""
    from prefect.client.orchestration import get_client

    finished = threading.Event()

    def renew() -> None:
        with get_client(sync_client=True) as client:
            wait = 0.75 * LEASE_SECONDS
            while not finished.wait(wait):
                try:
                    client.renew_concurrency_lease(lease, LEASE_SECONDS)
                    wait = 0.75 * LEASE_SECONDS
                except Exception:  # tried again soon; the lease outlives a short outage
                    wait = 5.0

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(renew,), name="segflow-queue", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join(timeout=1.0)
        try:
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(lease)
        except Exception as error:  # the lease expires by itself within LEASE_SECONDS
            logger.warning("could not release the store's queue slot (%s): it expires", error)


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


# --- a holder that died on this machine ---------------------------------------------------
# A run killed with SIGKILL (the OOM killer, `kill -9`, a killed `segflow run`) cannot give
# its slot back; its lease would keep the store for up to LEASE_SECONDS + 15 s. The holder
# records its lease in a small file of this machine (per user, like the cluster registry),
# so a run that waits on the same machine sees that the holder's process is gone and
# releases its lease at once. A holder on another machine is freed by its lease's expiry.


def _holder_file(name: str) -> Path:
    from segflow.engine.cluster import cluster_registry

    return cluster_registry().parent / "queues" / f"{name}.json"


def _record_holder(name: str, lease: uuid.UUID) -> Path:
    path = _holder_file(name)
    record = {"lease_id": str(lease), "pid": os.getpid(), "host": socket.gethostname()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(record))
        os.replace(partial, path)
    except OSError:  # no such record: a dead holder is then freed by its lease's expiry
        pass
    return path


def _forget_holder(path: Path, lease: uuid.UUID) -> None:
    try:
        if json.loads(path.read_text()).get("lease_id") == str(lease):
            path.unlink()
    except (OSError, ValueError):
        pass


def _free_dead_holder(client: Any, name: str, store: str, logger: Any) -> bool:
    """Release the lease of ``name``'s holder if it was a process of this machine that is
    gone; True when one was released."""
    path = _holder_file(name)
    try:
        record = json.loads(path.read_text())
        if record.get("host") != socket.gethostname() or _alive(int(record["pid"])):
            return False
        lease = uuid.UUID(str(record["lease_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    _release_dead_lease(client, name, store, lease)
    path.unlink(missing_ok=True)
    logger.info(
        "the run that held store '%s' (PID %s on this machine) is gone: its slot of %s is freed",
        store,
        record["pid"],
        name,
    )
    return True


def _release_dead_lease(client: Any, name: str, store: str, lease: uuid.UUID) -> None:
    """Release ``lease``; when the server no longer knows it (a server restarted with its
    leases in memory, as every temporary server of ``segflow run`` is) while its slot is
    still counted and nobody writes the store, take that slot off the count."""
    import httpx
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from segflow.store.lock import live_holder

    try:
        client.renew_concurrency_lease(lease, LEASE_SECONDS)  # does the server know it?
    except httpx.HTTPStatusError as error:
        if error.response.status_code != 410:  # 410 Gone: expired, revoked or forgotten
            raise
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots >= limit.limit and live_holder(store) is None:
            slots = GlobalConcurrencyLimitUpdate(active_slots=limit.active_slots - 1)
            client.update_global_concurrency_limit(name, slots)
        return
    client.release_concurrency_slots_with_lease(lease)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class _Unwritten:
    """Frees the store's slot once no run has written the store for :data:`LEAKED_AFTER`
    seconds while this run waited (a leaked slot: see there); the store's lock still keeps
    two runs from writing at once if the slot was not leaked after all."""

    def __init__(self, store: str, name: str, logger: Any) -> None:
        self.store, self.name, self.logger = store, name, logger
        self.since: float | None = None

    def check(self) -> None:
        from segflow.store.lock import live_holder

        try:
            written = live_holder(self.store) is not None
        except Exception:  # an unreadable remote store: never free a slot on a guess
            written = True
        now = time.monotonic()
        self.since = None if written else (self.since if self.since is not None else now)
        if self.since is None or now - self.since < LEAKED_AFTER:
            return
        self.since = None
        _free_leaked_slot(self.name, self.store, self.logger)


def _free_leaked_slot(name: str, store: str, logger: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots < limit.limit:
            return
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    logger.warning(
        "Prefect concurrency limit %s (store '%s') was taken while no run wrote the store for "
        "%.0f s: a leaked slot (a Prefect server restart with its leases in memory; see "
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE in deploy/README.md), freed",
        name,
        store,
        LEAKED_AFTER,
    )


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

"""One writer per store: a lock file with owner, host, PID, run id and a heartbeat.

``STORE/.segflow/lock.json`` is created exclusively (``O_EXCL``) before a run writes
anything, refreshed by a heartbeat thread, and removed when the run ends. A second run is
refused with a message naming the holder. A lock is broken only when it is stale: its
heartbeat is older than ``stale_after`` seconds, or its process is gone (same host only).
Breaking is itself exclusive: the stale file is renamed away first, so of two runs that find
the same stale lock, one takes it and the other is refused.

On object stores the lock is created with a conditional write (S3 ``If-None-Match: *``,
fsspec's ``pipe_file(..., mode="create")``): of two runs starting at once, exactly one
creates it and the other is refused. Breaking a stale lock there first creates a marker
named by the stale lock's token, also conditionally, so one breaker wins. An S3-compatible
server that ignores the condition (check yours) gives no exclusion.

The heartbeat rewrites the lock only while it is still this run's (its ``token``): a run
judged dead (stalled past ``stale_after``, its lock broken and taken by another run) finds
another token at its next beat, stops beating and never writes the lock again; the run's
remaining items then fail with one line (:func:`lock_lost`, checked before each item and
at each commit). On S3 the beat's write is conditional on the ETag it read (``If-Match``),
so a takeover between the read and the write makes the write fail, never overwrite. On a
local disk and other object stores the check and the write are two steps: a takeover in
the instant between them (this process stalled exactly there for ``stale_after`` seconds)
is overwritten once: the run that took over finds its own token gone at its next beat and
stops, so the two may both write for up to one heartbeat interval.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from segflow.errors import StoreError
from segflow.store.fs import fresh_fs
from segflow.store.names import SEGFLOW_DIR

LOCK_NAME = "lock.json"
STALE_AFTER = 60.0  # seconds without a heartbeat after which a lock may be broken
HEARTBEAT_EVERY = 5.0
# Store -> why this process lost the store's lock (set by a heartbeat that found another
# run's token): its runs write nothing more there.
_LOST: dict[str, str] = {}


class StoreLockedError(StoreError):
    """Another run holds the store's lock; ``holder`` is what its lock file says."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        self.holder = holder
        super().__init__(message)


def bookkeeping_path(store: str, *parts: str) -> str:
    """``STORE/.segflow/PARTS...`` (a path or URL)."""
    return "/".join([str(store).rstrip("/"), SEGFLOW_DIR, *parts])


def is_local(store: str) -> bool:
    """True for a local path (or ``file://`` URL), where renames are atomic."""
    return "://" not in str(store) or str(store).startswith("file://")


def local_path(store: str) -> str:
    return str(store)[len("file://") :] if str(store).startswith("file://") else str(store)


class StoreLock:
    """The lock of one store, held by this process until :meth:`release`.

    Parameters
    ----------
    store : str
        Path or URL of the store.
    run_id : str
        The run that holds it (a Prefect flow run id, or any unique string).
    stale_after : float
        Seconds without a heartbeat after which another run may break the lock.
    heartbeat_every : float
        Seconds between heartbeats.
    what : str
        What ``store`` is, for messages ("store", "training output").

    Examples
    --------
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/out.zarr"
    >>> with hold_store_lock(store, run_id="run-1") as lock:
    ...     read_lock(store)["run_id"]
    'run-1'
    >>> read_lock(store) is None
    True
    """

    def __init__(
        self,
        store: str,
        *,
        run_id: str,
        stale_after: float = STALE_AFTER,
        heartbeat_every: float = HEARTBEAT_EVERY,
        what: str = "store",
    ) -> None:
        self.store = str(store)
        self.what = what
        self.run_id = run_id
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.path = bookkeeping_path(self.store, LOCK_NAME)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.broken: dict[str, Any] | None = None  # the stale lock this one replaced
        now = _now()
        self.record = {
            "run_id": run_id,
            "owner": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; start the heartbeat.

        Raises
        ------
        StoreLockedError
            If another live run holds it.
        """
        for _ in range(3):
            try:
                created = self._create()
            except OSError as exc:
                raise StoreError(
                    f"store '{self.store}' cannot be written ({exc.strerror or exc}: "
                    f"{exc.filename or self.path}); choose a writable output.store"
                ) from exc
            if created:
                break
            holder = read_lock(self.store)
            if holder is None:
                continue  # released between our attempt and the read
            if not self.is_stale(holder):
                raise StoreLockedError(locked_message(self.store, holder, self.what), holder)
            self._break(holder)
            self.broken = holder
        else:
            raise StoreError(f"store '{self.store}': could not take its lock {self.path}")
        _LOST.pop(_key(self.store), None)
        self._thread = threading.Thread(target=self._beat, name="segflow-store-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = read_lock(self.store)
        if holder is not None and holder.get("token") == self.record["token"]:
            _remove(self.path)

    def _create(self) -> bool:
        data = json.dumps(self.record).encode()
        if is_local(self.store):
            path = local_path(self.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True

        return _create_remote(self.path, data)

    def is_stale(self, holder: dict[str, Any]) -> bool:
        """Whether ``holder``'s lock may be broken (see :func:`is_stale`)."""
        return is_stale(holder, stale_after=self.stale_after)

    def _break(self, holder: dict[str, Any]) -> None:
        if is_local(self.store):
            stale = f"{local_path(self.path)}.stale-{uuid.uuid4().hex}"
            try:
                os.rename(local_path(self.path), stale)  # only one breaker wins the rename
            except FileNotFoundError:
                return
            os.unlink(stale)
        elif _create_remote(f"{self.path}.break-{holder.get('token')}", b"{}"):
            # One breaker per stale lock: the marker is named by the stale lock's token
            # and created exclusively; it stays, so a late breaker cannot remove a new lock.
            _remove(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                holder = self._refresh()
            except OSError:
                continue  # a missed beat is retried; staleness needs many in a row
            if holder is not None:  # taken over: never write the other run's lock
                message = taken_over_message(self.store, holder, self.stale_after)
                _LOST[_key(self.store)] = message
                return

    def _refresh(self) -> dict[str, Any] | None:
        """Write a new heartbeat if the lock is still ours; else return what it says now
        (``{}`` when it is gone)."""
        self.record["heartbeat"] = _now()
        data = json.dumps(self.record).encode()
        if is_local(self.store):
            holder = read_lock(self.store)
            if holder is None or holder.get("token") != self.record["token"]:
                return holder or {}
            _write_atomic(self.path, data)
            return None
        fs, path = fresh_fs(self.path)
        try:
            etag = fs.info(path).get("ETag")  # before the read: a later change fails the write
            holder = _parse_lock(fs.cat_file(path))
        except FileNotFoundError:
            return {}
        if holder.get("token") != self.record["token"]:
            return holder
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        conditional = {"IfMatch": etag} if etag and "s3" in protocols else {}
        fs.pipe_file(path, data, **conditional)  # a failed condition: OSError, next beat sees
        return None


@contextmanager
def hold_store_lock(
    store: str, *, run_id: str, stale_after: float = STALE_AFTER, what: str = "store"
) -> Iterator[StoreLock]:
    """Hold the store's lock for the duration of the ``with`` block (see :class:`StoreLock`)."""
    lock = StoreLock(store, run_id=run_id, stale_after=stale_after, what=what)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def is_stale(holder: dict[str, Any], *, stale_after: float = STALE_AFTER) -> bool:
    """Whether a lock may be broken: its process is gone (same host), or its heartbeat is
    older than ``stale_after`` seconds (or unreadable; a time without a zone is UTC)."""
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
        return True
    age = _heartbeat_age(holder)
    return age is None or age > stale_after  # unreadable: nobody refreshes it properly


def _heartbeat_age(holder: dict[str, Any]) -> float | None:
    """Seconds since the lock's heartbeat (a time without a zone is UTC), or None when it
    has none or it is unreadable."""
    try:
        beat = dt.datetime.fromisoformat(str(holder["heartbeat"]))
    except (KeyError, ValueError):
        return None
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=dt.UTC)
    return (dt.datetime.now(dt.UTC) - beat).total_seconds()


def lock_lost(store: str) -> str | None:
    """Why this process's run lost the lock of ``store`` (one line), or None while it holds
    it or holds none: a run that lost it writes nothing more there."""
    return _LOST.get(_key(store))


def taken_over_message(store: str, holder: dict[str, Any], stale_after: float = STALE_AFTER) -> str:
    """The line a run whose lock another run took over ends its items with."""
    other = (
        f"run {holder.get('run_id')} of {holder.get('owner')}@{holder.get('host')}, PID "
        f"{holder.get('pid')}"
        if holder
        else "its lock file is gone"
    )
    return (
        f"store '{store}': this run's lock was taken over ({other}) after its heartbeat "
        f"stalled past {stale_after:g} s; this run stopped writing there: run it again "
        "once the other run has ended"
    )


def _key(store: str) -> str:
    return str(store).rstrip("/")


def live_holder(store: str) -> dict[str, Any] | None:
    """What the lock of a live run on ``store`` says, or None (no lock, or a stale one)."""
    holder = read_lock(store)
    return None if holder is None or is_stale(holder) else holder


def has_stale_lock(store: str) -> bool:
    """True when ``store`` holds the lock of a run that died (see :func:`is_stale`)."""
    holder = read_lock(store)
    return holder is not None and is_stale(holder)


def read_lock(store: str) -> dict[str, Any] | None:
    """What the store's lock file says, or None when there is none."""

    fs, path = fresh_fs(bookkeeping_path(str(store), LOCK_NAME))
    try:
        with fs.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    return _parse_lock(raw)


def _parse_lock(raw: bytes) -> dict[str, Any]:
    """A lock file's content; torn or foreign content reads as a stale lock."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {"heartbeat": ""}
    return value if isinstance(value, dict) else {"heartbeat": ""}


def locked_message(store: str, holder: dict[str, Any], what: str = "store") -> str:
    """Why ``store`` cannot be written now: ``holder``'s run has it (``what`` names the
    kind of place: a store, a training output)."""
    seconds = _heartbeat_age(holder)
    age = "" if seconds is None else f", last heartbeat {seconds:.0f} s ago"
    return (
        f"{what} '{store}' is in use by another segflow run (run {holder.get('run_id')} of "
        f"{holder.get('owner')}@{holder.get('host')}, PID {holder.get('pid')}, started "
        f"{holder.get('started')}{age}); wait for it to end (its lock is taken over once its "
        f"heartbeat is {STALE_AFTER:.0f} s old or its process is gone)"
    )


def _create_remote(url: str, data: bytes) -> bool:
    """Create the object ``url`` only if absent (S3 ``If-None-Match: *``, through fsspec's
    ``mode="create"``); False when it exists. Of two writers racing, exactly one wins."""
    fs, path = fresh_fs(url)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _write_atomic(path: str, data: bytes) -> None:
    if is_local(path):
        local = local_path(path)
        tmp = f"{local}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, local)
        return

    fs, target = fresh_fs(path)
    fs.pipe_file(target, data)  # one PUT: atomic on object stores


def _remove(path: str) -> None:

    fs, target = fresh_fs(path)
    try:
        fs.rm(target)
    except FileNotFoundError:
        pass


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or unreadable: assume alive
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

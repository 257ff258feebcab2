"""A process-wide stop request (the first Ctrl-C or SIGTERM, or a lost orchestrator) and
a per-item time limit.

Whoever owns the process (the ``segflow`` command, a flow run) calls :func:`request_stop`;
the engine checks :func:`should_stop` wherever it waits for blocks, cancels what is still
running and raises (:func:`raise_if_stopped`) :class:`Interrupted`. An interrupted item is
neither ``done`` nor ``failed``: it is not recorded, and its previous committed result
stays as it was.

An item run under :func:`item_deadline` that is still waiting for blocks when its time is
up gets :class:`ItemTimedOut` instead, at the same points: its blocks are cancelled and
the item fails (a hung read or a pathological item must not hold a nightly run forever),
while the other items go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from segflow.errors import SegflowError

_stop = threading.Event()
_reason: list[str] = []
_item = threading.local()  # the deadline of the item this thread runs, if any


class Interrupted(SegflowError, RuntimeError):
    """The run was asked to stop (signal, cancellation, lost orchestrator)."""


class ItemTimedOut(SegflowError, TimeoutError):
    """The item ran longer than its time limit (``run.item_timeout``)."""


@contextmanager
def item_deadline(seconds: float | None) -> Iterator[None]:
    """Limit the item this thread runs inside the block to ``seconds`` (None: no limit).

    Examples
    --------
    >>> with item_deadline(0.01):
    ...     time.sleep(0.02)
    ...     should_stop()
    True
    >>> should_stop()
    False
    """
    previous = getattr(_item, "deadline", None)
    _item.deadline = None if seconds is None else (time.monotonic() + seconds, seconds)
    try:
        yield
    finally:
        _item.deadline = previous


def _timed_out() -> float | None:
    """This thread's item limit in seconds once it has passed, else None."""
    deadline = getattr(_item, "deadline", None)
    return deadline[1] if deadline is not None and time.monotonic() >= deadline[0] else None


def should_stop() -> bool:
    """Whether the work of this thread should stop: a stop request, or its item's limit."""
    return _stop.is_set() or _timed_out() is not None


def request_stop(reason: str) -> None:
    """Ask every item of this process to stop; the first reason is kept.

    Examples
    --------
    >>> request_stop("SIGINT"); stop_requested()
    'SIGINT'
    >>> clear_stop(); stop_requested() is None
    True
    """
    if not _stop.is_set():
        _reason.append(reason)
        _stop.set()


def stop_requested() -> str | None:
    """The reason a stop was requested, or None."""
    return _reason[0] if _stop.is_set() and _reason else None


def raise_if_stopped() -> None:
    """Raise :class:`Interrupted` when a stop was requested, :class:`ItemTimedOut` when this
    thread's item is past its limit."""
    reason = stop_requested()
    if reason is not None:
        raise Interrupted(f"interrupted ({reason})")
    if (limit := _timed_out()) is not None:
        raise ItemTimedOut(f"still running after its time limit of {limit:g} s (run.item_timeout)")


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process)."""
    _stop.clear()
    _reason.clear()

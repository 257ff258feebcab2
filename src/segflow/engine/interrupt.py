"""A process-wide stop request: the first Ctrl-C or SIGTERM, or a lost orchestrator.

Whoever owns the process (the ``segflow`` command, a flow run) calls :func:`request_stop`;
the engine checks :func:`stop_requested` wherever it waits for blocks, cancels what is
still running and raises :class:`Interrupted`. An interrupted item is neither ``done`` nor
``failed``: it is not recorded, and its previous committed result stays as it was.
"""

from __future__ import annotations

import threading

from segflow.errors import SegflowError

_stop = threading.Event()
_reason: list[str] = []


class Interrupted(SegflowError, RuntimeError):
    """The run was asked to stop (signal, cancellation, lost orchestrator)."""


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
    """Raise :class:`Interrupted` when a stop was requested."""
    reason = stop_requested()
    if reason is not None:
        raise Interrupted(f"interrupted ({reason})")


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process)."""
    _stop.clear()
    _reason.clear()

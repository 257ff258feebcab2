"""Block progress from the engine to whoever listens in this process (the CLI's progress bar).

The engine reports ``progress(phase, done, total)`` per item; tasks forward it here with the
item id. Listeners are process-local callables, never Prefect parameters: nothing is sent to
the Prefect API per block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# listener(item_id, phase, done, total); phase is "phase k/n" or "done"/"failed"/"skipped".
ProgressListener = Callable[[str, str, int, int], None]

_lock = threading.Lock()
_listeners: list[ProgressListener] = []


@contextmanager
def listen_progress(listener: ProgressListener) -> Iterator[None]:
    """Call ``listener`` for every progress report made while the block is active."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def report_progress(item_id: str, phase: str, done: int, total: int) -> None:
    """Send one report to every listener; a failing listener never stops the work."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(item_id, phase, done, total)
        except Exception:  # a display problem must not fail a segmentation
            pass

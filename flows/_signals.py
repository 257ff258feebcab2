"""Clean interruption: the first Ctrl-C or SIGTERM asks the run to stop, a second exits.

On the first signal the engine stops submitting, cancels running blocks and raises
``Interrupted`` in each item; the flow records what finished, consolidates the store and
ends Cancelled. A second signal (an impatient user) exits at once: everything committed is
already durable, and the next run breaks the dead process's lock and redoes the rest.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from segflow.engine.interrupt import request_stop, stop_requested

# Exit statuses of a run ended by a signal, as a shell reports them (128 + signal number).
EXIT_SIGNAL = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into a stop request for the duration (main thread only;
    elsewhere, as in a thread pool, the caller's handlers stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop_requested():
            os._exit(128 + signum)  # the second signal: now
        request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

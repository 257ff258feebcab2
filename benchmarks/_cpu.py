"""CPU seconds a Dask run used: on a machine shared with other work, wall time varies by
tens of percent between runs, CPU time much less (it counts what the run did, not what it
waited for)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def cpu_seconds(client: Any) -> float:
    """CPU seconds used so far by this process (the client and the local scheduler) and
    every worker process of ``client``."""
    workers = client.run(time.process_time)
    return time.process_time() + sum(workers.values())


def with_cpu(client: Any, run: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``run(*args, **kwargs)``'s result and the CPU seconds it used, here and on the
    workers."""
    before = cpu_seconds(client)
    value = run(*args, **kwargs)
    return value, cpu_seconds(client) - before

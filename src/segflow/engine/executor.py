"""Where block tasks run: threads in this process, or a Dask cluster.

The engine speaks to an :class:`Executor` only: ``map`` a function over blocks (arguments may
be handles returned by an earlier ``map``, which stay where they were computed) and
``gather`` small results. With Dask, intermediate blocks live on the worker that made them and
the scheduler places the next task there; only the small results travel.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from segflow.engine.interrupt import raise_if_stopped, stop_requested
from segflow.faults import fault_point

ProgressCallback = Callable[[str, int, int], None]
# How often a wait for blocks checks for a stop request (segflow.engine.interrupt).
POLL_SECONDS = 0.25


class Executor(Protocol):
    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        """Submit ``fn(*args, **kwargs)`` for each tuple of arguments; return handles."""
        ...

    def gather(
        self,
        handles: Sequence[Any],
        *,
        label: str = "",
        progress: ProgressCallback | None = None,
    ) -> list[Any]:
        """Wait for handles and return their values, in order."""
        ...

    def wait(
        self, handles: Sequence[Any], *, label: str, progress: ProgressCallback | None
    ) -> None:
        """Report ``progress`` as handles finish, without fetching their values; raise
        :class:`~segflow.engine.interrupt.Interrupted` (after cancelling what is left) when
        a stop is requested."""
        ...


class LocalExecutor:
    """Run block tasks on a thread pool in this process (numpy and scipy release the GIL)."""

    def __init__(self, n_threads: int | None = None) -> None:
        self.n_threads = n_threads or min(os.cpu_count() or 1, 8)
        self._pool = cf.ThreadPoolExecutor(self.n_threads, thread_name_prefix="segflow")

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        return [
            self._pool.submit(_resolve_call, fn, args, kwargs)
            for args in zip(*iterables, strict=True)
        ]

    def gather(
        self,
        handles: Sequence[Any],
        *,
        label: str = "",
        progress: ProgressCallback | None = None,
    ) -> list[Any]:
        self.wait(handles, label=label, progress=progress)
        return [h.result() for h in handles]

    def wait(
        self, handles: Sequence[Any], *, label: str, progress: ProgressCallback | None
    ) -> None:
        pending, finished = set(handles), 0
        while pending:
            if stop_requested():
                for handle in pending:
                    handle.cancel()
                raise_if_stopped()
            done, pending = cf.wait(pending, timeout=POLL_SECONDS, return_when=cf.FIRST_COMPLETED)
            finished += len(done)
            for _ in done:
                fault_point("block-done")
            if done and progress is not None:
                progress(label, finished, len(handles))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    resolved = [a.result() if isinstance(a, cf.Future) else _resolve_list(a) for a in args]
    return fn(*resolved, **kwargs)


def _resolve_list(value: Any) -> Any:
    if isinstance(value, list | tuple) and any(isinstance(v, cf.Future) for v in value):
        return type(value)(v.result() if isinstance(v, cf.Future) else v for v in value)
    return value


class DaskExecutor:
    """Run block tasks on a ``distributed.Client``; handles are Dask futures."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        columns = [list(it) for it in iterables]
        if not columns or not columns[0]:
            return []
        return list(self.client.map(fn, *columns, pure=False, **kwargs))

    def gather(
        self,
        handles: Sequence[Any],
        *,
        label: str = "",
        progress: ProgressCallback | None = None,
    ) -> list[Any]:
        self.wait(handles, label=label, progress=progress)
        return list(self.client.gather(list(handles)))

    def wait(
        self, handles: Sequence[Any], *, label: str, progress: ProgressCallback | None
    ) -> None:
        from distributed import wait

        pending, finished = set(handles), 0
        while pending:
            if stop_requested():
                self.client.cancel(list(pending))
                raise_if_stopped()
            try:
                done, pending = wait(pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            finished += len(done)
            for _ in done:
                fault_point("block-done")
            if done and progress is not None:
                progress(label, finished, len(handles))

"""Retries with backoff for block tasks that hit a transient error.

A block task reads its input window and writes its storage units: on an object store or a
network filesystem, a dropped connection or a timeout there is no fault of the item, and
failing the item for it would leave it undone until the next scheduled run. Each block task
is a pure function of (item, grid index, config) whose writes cover whole storage units, so
running it again is safe: :func:`call_with_retries` does so, after a growing delay, for the
errors :func:`is_transient` recognises, and lets every other error through at once (a
damaged file fails its item on the first try).
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from segflow.engine.interrupt import stop_requested

logger = logging.getLogger("segflow.retry")

# OSError numbers of conditions that pass: busy, timed out, connection lost, stale NFS handle.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ESTALE,
    }
)

# Transient errors of the libraries under fsspec's object stores and HTTP, by qualified name
# (so none of them is imported here). Their subclasses count too.
TRANSIENT_NAMES = frozenset(
    {
        "aiohttp.client_exceptions.ClientConnectionError",
        "aiohttp.client_exceptions.ClientPayloadError",
        "botocore.exceptions.ConnectionError",
        "botocore.exceptions.HTTPClientError",
        "requests.exceptions.ConnectionError",
        "requests.exceptions.Timeout",
        "urllib3.exceptions.ProtocolError",
        "urllib3.exceptions.TimeoutError",
    }
)


def is_transient(error: BaseException) -> bool:
    """Whether trying again may succeed: lost connections, timeouts, busy or stale files.

    Also true for an error raised ``from`` a transient one (a reader's ``ItemReadError``
    wrapping a dropped connection). A missing file, a permission error or bad data is not.

    Examples
    --------
    >>> is_transient(ConnectionResetError("reset by peer"))
    True
    >>> is_transient(OSError(errno.ETIMEDOUT, "timed out"))
    True
    >>> is_transient(FileNotFoundError(errno.ENOENT, "no such file"))
    False
    >>> is_transient(ValueError("band count 1, config expects 3"))
    False
    """
    names = {f"{kind.__module__}.{kind.__qualname__}" for kind in type(error).__mro__}
    if names & TRANSIENT_NAMES or isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    return error.__cause__ is not None and is_transient(error.__cause__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a block task is tried again after a transient error.

    ``attempts`` tries in all; the ``k``-th retry waits ``first_delay * 2**(k-1)`` seconds
    (at most ``max_delay``), times a random factor in [0.5, 1] so that the blocks of many
    workers that lost the same connection do not come back all at once. The default waits
    at most 2 + 4 + 8 + 16 = 30 s in all before the block, and its item, fail.
    """

    attempts: int = 5
    first_delay: float = 2.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"`attempts` ({self.attempts}) must be at least 1")
        if self.first_delay < 0 or self.max_delay < 0:
            raise ValueError(
                f"`first_delay` ({self.first_delay}) and `max_delay` ({self.max_delay}) "
                f"must not be negative"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        full = min(self.first_delay * 2 ** (retry - 1), self.max_delay)
        return full * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


class Retrying:
    """``fn`` as a block task that :func:`call_with_retries` runs. It keeps ``fn``'s name,
    which Dask gives its tasks (the dashboard shows ``run_block``, not a wrapper)."""

    def __init__(self, fn: Callable[..., Any], policy: RetryPolicy) -> None:
        self.fn = fn
        self.policy = policy
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_with_retries(self.fn, self.policy, *args, **kwargs)


def call_with_retries(
    fn: Callable[..., Any], policy: RetryPolicy, *args: Any, **kwargs: Any
) -> Any:
    """``fn(*args, **kwargs)``, tried again after a transient error as ``policy`` says.

    The last error (or the first that is not transient) is raised as it is; each retry is
    logged as a warning on the ``segflow.retry`` logger. No retry once a stop is requested.
    """
    for retry in range(1, policy.attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if retry == policy.attempts or not is_transient(error) or stop_requested():
                raise
            delay = policy.delay(retry)
            logger.warning(
                "%s: %s: %s; trying again in %.1f s (retry %d of %d)",
                getattr(fn, "__name__", "block task"),
                type(error).__name__,
                error,
                delay,
                retry,
                policy.attempts - 1,
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")

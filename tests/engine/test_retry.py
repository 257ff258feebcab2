"""Block tasks are tried again after transient errors, with backoff, and only after those."""

from __future__ import annotations

import errno
import logging
import pathlib
import threading
from typing import Any

import numpy as np
import pytest
import requests
import urllib3
import zarr

from segflow.engine.executor import DaskExecutor, LocalExecutor
from segflow.engine.item import segment_item
from segflow.engine.retry import NO_RETRY, RetryPolicy, call_with_retries, is_transient
from segflow.errors import ItemReadError
from segflow.io import ArrayReader

FAST = RetryPolicy(attempts=3, first_delay=0.0)  # no waiting in tests


def _wrapped(error: BaseException) -> ItemReadError:
    try:
        raise ItemReadError("item 'tile': read failed") from error
    except ItemReadError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (OSError(errno.ESTALE, "stale file handle"), True),
        (requests.exceptions.ConnectionError("connection aborted"), True),  # an OSError, no errno
        (urllib3.exceptions.ProtocolError("connection broken"), True),
        (_wrapped(ConnectionAbortedError()), True),
        (FileNotFoundError(errno.ENOENT, "no such file"), False),
        (PermissionError(errno.EACCES, "permission denied"), False),
        (OSError("input/output error"), False),
        (ItemReadError("item 'tile': not a TIFF file"), False),
        (_wrapped(ValueError("bad header")), False),
        (ValueError("band count 1, config expects 3"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, r"`attempts` \(0\) must be at least 1"),
        ({"first_delay": -1.0}, r"`first_delay` \(-1.0\) and `max_delay` \(60.0\) must not be"),
    ],
)
def test_a_bad_policy_names_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_delays_double_up_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(attempts=6, first_delay=2.0, max_delay=10.0)
    for retry, full in enumerate([2.0, 4.0, 8.0, 10.0, 10.0], start=1):
        delays = [policy.delay(retry) for _ in range(50)]
        assert all(0.5 * full <= d <= full for d in delays), (retry, min(delays), max(delays))


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns its argument doubled.

    Calls are counted in a file, so the count holds for the copies Dask makes (pickled)."""

    def __init__(self, folder: pathlib.Path, failures: int, error: Exception) -> None:
        self.counter = folder / f"calls-{id(self)}"
        self.counter.touch()
        self.failures, self.error = failures, error
        self.__name__ = "flaky"

    @property
    def calls(self) -> int:
        return len(self.counter.read_text())

    def __call__(self, x: int) -> int:
        with self.counter.open("a") as counter:  # one character per call (O_APPEND)
            counter.write(".")
        if self.calls <= self.failures:
            raise self.error
        return 2 * x


def test_transient_errors_are_retried_and_logged(
    caplog: pytest.LogCaptureFixture, tmp_path: pathlib.Path
) -> None:
    flaky = Flaky(tmp_path, 2, ConnectionResetError("reset by peer"))

    with caplog.at_level(logging.WARNING, logger="segflow.retry"):
        assert call_with_retries(flaky, FAST, 21) == 42

    assert flaky.calls == 3
    assert [r.getMessage() for r in caplog.records] == [
        "flaky: ConnectionResetError: reset by peer; trying again in 0.0 s (retry 1 of 2)",
        "flaky: ConnectionResetError: reset by peer; trying again in 0.0 s (retry 2 of 2)",
    ]


def test_the_last_transient_error_and_any_other_error_are_raised(tmp_path: pathlib.Path) -> None:
    lasting = Flaky(tmp_path, 5, TimeoutError("timed out"))
    broken = Flaky(tmp_path, 1, ValueError("bad data"))

    with pytest.raises(TimeoutError, match="timed out"):
        call_with_retries(lasting, FAST, 1)
    with pytest.raises(ValueError, match="bad data"):
        call_with_retries(broken, FAST, 1)

    assert (lasting.calls, broken.calls) == (3, 1)


def test_local_and_dask_executors_retry_block_tasks(tmp_path: pathlib.Path) -> None:
    from distributed import Client, LocalCluster

    with LocalExecutor(2, retry=FAST) as local:
        flaky = Flaky(tmp_path, 2, ConnectionResetError())
        assert local.gather(local.map(flaky, [1])) == [2]
        assert flaky.calls == 3
    with LocalExecutor(2, retry=NO_RETRY) as local:
        with pytest.raises(ConnectionResetError):
            local.gather(local.map(Flaky(tmp_path, 1, ConnectionResetError()), [1]))

    with (
        LocalCluster(n_workers=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        flaky = Flaky(tmp_path, 2, OSError(errno.ECONNRESET, "reset"))
        handles = DaskExecutor(client, retry=FAST).map(flaky, [1])
        assert DaskExecutor(client).gather(handles) == [2]
        assert flaky.calls == 3  # in the worker process, counted in the file
        assert handles[0].key.startswith("flaky-")  # Dask names the task after fn
        once = DaskExecutor(client, retry=NO_RETRY)
        with pytest.raises(OSError, match="reset"):
            once.gather(once.map(Flaky(tmp_path, 1, OSError(errno.ECONNRESET, "reset")), [1]))


class _DroppingReader(ArrayReader):
    """An input whose connection drops on the first read of each of two windows."""

    def __init__(self, array: np.ndarray, item_id: str) -> None:
        super().__init__(array, item_id)
        self.dropped: set[tuple[int, ...]] = set()
        self.lock = threading.Lock()

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.start for s in region)
        with self.lock:
            first = key not in self.dropped and region[-1].start >= 16
            self.dropped.add(key)
        if first:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return super().read(region)


def test_an_item_whose_reads_drop_once_is_done_and_equals_a_clean_run(
    tmp_path: pathlib.Path,
) -> None:
    rng = np.random.default_rng(3)
    image = (rng.random((40, 50)) > 0.7).astype(np.float32)
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]

    def run(store: str, reader: ArrayReader, retry: RetryPolicy) -> Any:
        with LocalExecutor(2, retry=retry) as executor:
            return segment_item(reader, pipeline, store=store, block_shape=16, executor=executor)

    clean = run(str(tmp_path / "clean.zarr"), ArrayReader(image, "tile"), NO_RETRY)
    dropping = _DroppingReader(image, "tile")
    retried = run(str(tmp_path / "retried.zarr"), dropping, FAST)
    failed = run(str(tmp_path / "failed.zarr"), _DroppingReader(image, "tile"), NO_RETRY)

    assert clean.status == retried.status == "done", retried.error
    assert dropping.dropped  # the reads did drop
    np.testing.assert_array_equal(
        zarr.open_array(tmp_path / "retried.zarr", path="tile/labels", mode="r")[:],
        zarr.open_array(tmp_path / "clean.zarr", path="tile/labels", mode="r")[:],
    )
    assert failed.status == "failed" and "ConnectionResetError" in str(failed.error)

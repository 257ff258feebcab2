"""Per-worker resources: built once per process, never per block; device units respected."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from segflow import segment
from segflow.engine import resources
from segflow.engine.executor import DaskExecutor, LocalExecutor
from segflow.engine.pipeline import Step
from segflow.ops.registry import Operation, OpParams, get_operation, register


class _OffsetParams(OpParams):
    offset: float = 1.0


class _Offset:
    """A stand-in for a loaded model: an object that must be built once per process."""

    def __init__(self, offset: float) -> None:
        self.offset = np.float32(offset)


def _apply(image: np.ndarray, params: _OffsetParams, ctx: Any) -> np.ndarray:
    assert isinstance(ctx.resource, _Offset)  # the engine handed the built resource over
    return image + ctx.resource.offset


NAME = "_test_offset_resource"
try:
    get_operation(NAME)
except KeyError:
    register(
        Operation(
            name=NAME,
            kind="pointwise",
            params=_OffsetParams,
            apply=_apply,
            summary="adds an offset held by a per-process resource (test only)",
            setup=lambda p: _Offset(p.offset),
            resources=lambda p: {"GPU": 1},
        )
    )


def _pipeline(offset: float) -> list[Step]:
    # A private operation (its name starts with "_") is given as a Step, not by name.
    return [Step(0, get_operation(NAME), _OffsetParams(offset=offset))]


def test_setup_runs_once_per_process_and_key_not_per_block() -> None:
    resources.clear_resources()
    before = resources.builds()
    image = np.arange(24 * 20, dtype=np.float32).reshape(24, 20)
    out = segment(image, _pipeline(2.5), block_shape=(5, 6), n_threads=4)
    np.testing.assert_array_equal(out, image + np.float32(2.5))  # 5 x 4 = 20 blocks
    assert resources.builds() - before == 1
    segment(image, _pipeline(2.5), block_shape=(5, 6), n_threads=4)
    assert resources.builds() - before == 1  # cached across runs of the same process
    segment(image, _pipeline(3.0), block_shape=(5, 6), n_threads=4)
    assert resources.builds() - before == 2  # another key: another build


def test_local_executor_runs_one_gpu_task_at_a_time() -> None:
    running, peak, lock = [0], [0], threading.Lock()

    def task(_: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    with LocalExecutor(4, units={"GPU": 1}) as executor:
        executor.gather(executor.map(task, range(8), resources={"GPU": 1}))
    assert peak[0] == 1
    # Without the annotation the same pool runs tasks side by side: a barrier of two
    # parties passes only if two tasks run at once.
    barrier = threading.Barrier(2, timeout=10)
    with LocalExecutor(4, units={"GPU": 1}) as executor:
        executor.gather(executor.map(lambda _: barrier.wait(), range(2)))


def test_local_executor_refuses_more_units_than_it_has() -> None:
    with LocalExecutor(2, units={"GPU": 1}) as executor:
        with pytest.raises(ValueError, match="asks for 2 GPU, this process has 1"):
            executor.map(abs, [1], resources={"GPU": 2})


@pytest.mark.parametrize("gpu_workers", [True, False])
def test_dask_tasks_carry_resources_only_where_workers_advertise_them(
    gpu_workers: bool,
) -> None:
    from distributed import Client, LocalCluster

    extra = {"resources": {"GPU": 1}} if gpu_workers else {}
    with (
        LocalCluster(
            n_workers=1, processes=False, dashboard_address=":0", threads_per_worker=2, **extra
        ) as cluster,
        Client(cluster) as client,
    ):
        executor = DaskExecutor(client)
        handles = executor.map(abs, [-1, -2, -3], resources={"GPU": 1})
        assert executor.gather(handles) == [1, 2, 3]  # never waits for a missing GPU
        restrictions = client.run_on_scheduler(
            lambda dask_scheduler: [
                dask_scheduler.tasks[h.key].resource_restrictions for h in handles
            ]
        )
    assert restrictions == ([{"GPU": 1}] * 3 if gpu_workers else [None] * 3)

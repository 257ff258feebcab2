"""One queue per store, and a cancel that lands after a server restart, on a real
``prefect server start`` with flow runs in processes of their own (as a worker starts them).

Skipped, with the reason, when the server does not answer within its start-up time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _geodata import blob_image, write_geotiff
from _prefect_server import PROCESS_TIMEOUT, PrefectServer, Run, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server-home"))
    try:
        if (why := server.start()) is not None:
            pytest.skip(why)
        yield server
    finally:
        server.stop()


def write_config(path: Path, store: Path, tiles: Path, address: str) -> Path:
    path.write_text(
        yaml.safe_dump({
            "name": path.stem,
            "input": {"path": str(tiles)},
            "output": {"store": str(store), "chunks": [32, 32]},
            "blocks": {"shape": [32, 32]},
            "pipeline": [{"op": "threshold", "value": 100}, {"op": "label"}],
            "cluster": {"address": address},
        })
    )  # fmt: skip
    return path


@pytest.fixture
def tiles(tmp_path: Path) -> Path:
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    return folder


def test_runs_on_one_store_take_turns_and_runs_on_another_store_do_not_wait(
    server: PrefectServer, tmp_path: Path, tiles: Path, dask_address: str
) -> None:
    from segflow.store.lock import read_lock

    shared, other = tmp_path / "shared.zarr", tmp_path / "other.zarr"
    config = write_config(tmp_path / "nightly.yaml", shared, tiles, dask_address)
    elsewhere_config = write_config(tmp_path / "elsewhere.yaml", other, tiles, dask_address)
    ready, gate = tmp_path / "holding", tmp_path / "release"
    runs = [holder := Run(server, tmp_path, "holder", "hold", str(shared), str(ready), str(gate))]
    try:
        wait_for(ready.exists, "slot and lock taken by the holding run")
        holder_id = read_lock(str(shared))["run_id"]  # type: ignore[index]
        runs += [
            queued := Run(server, tmp_path, "queued", "segment", str(config)),
            impatient := Run(server, tmp_path, "impatient", "segment", str(config),
                             "run.queue_timeout=3"),
            elsewhere := Run(server, tmp_path, "elsewhere", "segment", str(elsewhere_config)),
        ]  # fmt: skip

        # Another store: never waits for this one.
        assert elsewhere.finish()["type"] == "COMPLETED", elsewhere.text()[-3000:]
        # The same store, with a time limit: ends with one line naming the store and holder.
        ended = impatient.finish()
        assert ended["type"] == "FAILED"
        # (3 s or a little more: a loaded machine answers the last try late)
        assert re.match(
            rf"nightly: waited \d+ s for store '{re.escape(str(shared))}' \(run.queue_timeout\), "
            r"still written by flow run '",
            ended["message"],
        ), ended
        assert holder_id in ended["message"] and "\n" not in ended["message"]
        # The same store, no limit reached: waits, saying for whom, then runs.
        wait_for(lambda: "this run waits its turn" in queued.text(), "waiting line")
        assert f"store '{shared}' is written by flow run '" in queued.text()
        assert holder_id in queued.text() and queued.process.poll() is None
        assert holder.process.poll() is None  # still holding: nothing ran on its store
        gate.touch()
        assert holder.process.wait(timeout=PROCESS_TIMEOUT) == 0, holder.text()[-3000:]
        assert queued.finish()["type"] == "COMPLETED", queued.text()[-3000:]
        assert "in its queue: this run goes on" in queued.text()
        assert "| ERROR" not in queued.text()  # waiting is no alarm (nor each poll of it)
    finally:
        for run in runs:
            run.stop()


def test_a_cancel_after_a_server_restart_ends_the_run_cancelled_within_seconds(
    server: PrefectServer, tmp_path: Path, tiles: Path
) -> None:
    from distributed import LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from segflow.store.lock import read_lock

    store = tmp_path / "out.zarr"
    # A scheduler without workers: the run's blocks wait, so it runs until it is stopped.
    with LocalCluster(n_workers=0, dashboard_address=":0") as idle:
        config = write_config(tmp_path / "stuck.yaml", store, tiles, idle.scheduler_address)
        run = Run(server, tmp_path, "stuck", "segment", str(config))
        try:
            lock = wait_for(lambda: read_lock(str(store)), "store lock of the running run")
            wait_for(lambda: "segmenting 1 items" in run.text(), "items submitted")
            # The item's task is running once its blocks reach the scheduler: a server that
            # stops before that fails the task's own concurrency-slot call in Prefect (seen
            # under load: the run then ends in Cancelling, not Cancelled), which is not what
            # this test is about.
            wait_for(lambda: len(idle.scheduler.tasks) > 0, "blocks on the scheduler")
            server.stop()
            if (why := server.start()) is not None:
                pytest.fail(why)
            assert run.process.poll() is None  # the run lived through the restart

            with temporary_settings({PREFECT_API_URL: server.url}):
                with get_client(sync_client=True) as client:
                    flow_run_id = uuid.UUID(lock["run_id"])
                    client.set_flow_run_state(flow_run_id, Cancelling())  # as the CLI does
                    asked = time.monotonic()

                    def ended() -> Any:
                        state = client.read_flow_run(flow_run_id).state
                        return state if state is not None and state.is_final() else None

                    state = wait_for(ended, "final state", timeout=60)
                    took = time.monotonic() - asked
            assert state.type == StateType.CANCELLED, (state, run.text()[-3000:])
            # POLL_SECONDS (2 s) to notice, then the items stop and the run records them;
            # a loaded 2-core machine takes a few seconds more.
            assert took < 20, took
            assert "stuck: interrupted (cancelled)" in str(state.message), state.message
            assert run.finish()["type"] == "CANCELLED"
        finally:
            run.stop()


def test_a_leaked_slot_is_freed_once_no_run_has_written_the_store_for_a_while(
    server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that kept its leases in memory and restarted leaves the slot of a run that
    ended since taken for ever; a waiting run frees it once nobody has written the store
    for LEAKED_AFTER seconds, and never while a run writes it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from segflow.flows import store_queue
    from segflow.store.lock import hold_store_lock

    store = str(tmp_path / "out.zarr")
    name = store_queue.queue_name(store)
    lines: list[str] = []

    class Logger:
        def info(self, message: str, *args: Any) -> None:
            lines.append(message % args)

        warning = info

    def active_slots() -> int:
        with get_client(sync_client=True) as client:
            return int(client.read_global_concurrency_limit_by_name(name).active_slots)

    monkeypatch.setattr(store_queue, "LEAKED_AFTER", 2.0)
    with temporary_settings({PREFECT_API_URL: server.url}):
        with get_client(sync_client=True) as client:  # a slot whose lease the server forgot
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active_slots=1)
            )

        with hold_store_lock(store, run_id="another-run"):  # a run writes the store
            with pytest.raises(store_queue.QueueTimeoutError, match=r"^waited 5 s for store"):
                with store_queue.store_queue(store, timeout=5, logger=Logger()):
                    pass
            assert active_slots() == 1 and not any("leaked slot" in line for line in lines)

        with store_queue.store_queue(store, timeout=60, logger=Logger()) as waited:
            held = active_slots()
        assert held == 1 and waited >= 2  # freed, then taken by this run
        assert active_slots() == 0  # and given back
    [freed] = [line for line in lines if "leaked slot" in line]
    assert freed.startswith(f"Prefect concurrency limit {name} (store '{store}') was taken")


def test_the_slot_of_a_run_killed_on_this_machine_is_freed_at_once(
    server: PrefectServer, tmp_path: Path
) -> None:
    """A run killed with SIGKILL cannot give its slot back: its lease would hold the store
    for a minute more; a run waiting on the same machine sees its process gone and frees it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from segflow.flows.store_queue import queue_name, store_queue

    store = str(tmp_path / "out.zarr")
    ready, gate = tmp_path / "holding", tmp_path / "release"
    holder = Run(server, tmp_path, "holder", "hold", store, str(ready), str(gate))
    try:
        wait_for(ready.exists, "slot and lock taken by the holding run")
        holder.process.kill()  # as the OOM killer does
        holder.process.wait()
    finally:
        holder.stop()
    lines: list[str] = []

    class Logger:
        def info(self, message: str, *args: Any) -> None:
            lines.append(message % args)

        warning = info

    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: server.url}):
        with store_queue(store, timeout=60, logger=Logger()):
            took = time.monotonic() - started
    assert took < 20, (took, lines)  # not the 60 s of the lease and the 15 s repossessor
    assert any(
        line.startswith(f"the run that held store '{store}' (PID {holder.process.pid} on this ")
        and line.endswith(f"its slot of {queue_name(store)} is freed")
        for line in lines
    ), lines


def test_a_dead_holders_slot_is_freed_even_when_the_server_forgot_its_lease(
    server: PrefectServer, tmp_path: Path
) -> None:
    """`segflow run`'s temporary server keeps leases in memory and its database on disk: a
    run killed with it leaves its slot counted and its lease unknown to the next server."""
    import json
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from segflow.flows import store_queue

    store = str(tmp_path / "out.zarr")
    name = store_queue.queue_name(store)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process of this machine that is gone
    record = store_queue._holder_file(name)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps({"lease_id": str(uuid.uuid4()), "pid": dead.pid, "host": os.uname().nodename})
    )
    lines: list[str] = []

    class Logger:
        def info(self, message: str, *args: Any) -> None:
            lines.append(message % args)

        warning = info

    with temporary_settings({PREFECT_API_URL: server.url}):
        with get_client(sync_client=True) as client:  # its slot, its lease forgotten
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active_slots=1)
            )
        started = time.monotonic()
        with store_queue.store_queue(store, timeout=30, logger=Logger()):
            took = time.monotonic() - started
        with get_client(sync_client=True) as client:
            after = client.read_global_concurrency_limit_by_name(name).active_slots

    assert took < 15 and after == 0, (took, after, lines)
    assert any("is gone: its slot of" in line for line in lines), lines
    assert not record.exists()  # this run's own record is gone with its slot

"""The cluster of a flow run: a LocalCluster sized by the config, or by default by the usable
cores shared with the other segflow local clusters of the machine, closed after the run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from distributed import Client, LocalCluster

from segflow.config import ClusterConfig
from segflow.engine import cluster as engine_cluster
from segflow.engine.cluster import (
    RunningCluster,
    claim_local_cluster,
    default_workers,
    running_clusters,
    size_local_cluster,
    usable_cores,
)
from segflow.flows.cluster import dashboard_link, dask_client

TEXT: dict[str, Any] = {"capture_output": True, "text": True, "check": True}


def test_local_cluster_follows_the_config_and_is_closed_after() -> None:
    config = ClusterConfig(n_workers=1, threads_per_worker=1, memory_limit="1GiB")

    with dask_client(config) as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [1]
        assert [w["memory_limit"] for w in workers] == [2**30]
        assert client.submit(sum, [1, 2]).result() == 3
        cluster = client.cluster

    assert client.status == "closed"
    assert cluster.status.name == "closed"


def test_without_an_address_dasks_scheduler_address_setting_is_used(dask_address: str) -> None:
    import dask

    with dask.config.set({"scheduler-address": dask_address}):  # DASK_SCHEDULER_ADDRESS
        with dask_client(ClusterConfig(n_workers=3)) as client:
            assert client.scheduler.address == dask_address
            assert client.cluster is None  # connected, nothing started here

    with Client(dask_address) as other:  # the shared cluster is left running
        assert other.submit(sum, [1, 2]).result() == 3


def test_dashboard_link_is_given_only_where_the_dashboard_answers() -> None:
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1)) as client:
        link = dashboard_link(client)
        assert link is not None and link.endswith("/status")
        assert "Dask" in httpx.get(link, timeout=5).text

    # The scheduler's HTTP server runs without the dashboard (as where bokeh is missing):
    # its "dashboard" service is there, the dashboard is not.
    with (
        LocalCluster(
            n_workers=1,
            processes=False,
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": False},
        ) as bare,
        Client(bare) as client,
    ):
        assert "dashboard" in client.scheduler_info()["services"]
        assert dashboard_link(client) is None


# --- the default size of a local cluster --------------------------------------------------


def test_default_workers_share_the_usable_cores_among_the_running_clusters() -> None:
    assert [default_workers(8, running) for running in range(5)] == [8, 4, 2, 2, 1]
    assert default_workers(2, 7) == 1  # never none
    assert default_workers(1, 0) == 1
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_explicit_settings_are_kept_and_auto_memory_is_shared_with_the_running_clusters() -> None:
    others = [RunningCluster(pid=1, n_workers=2, path=Path("a")), RunningCluster(2, 1, Path("b"))]
    size = partial(size_local_cluster, usable_cores=6, memory=12 * 2**30)

    alone = size(n_workers=None, memory_limit="auto", running=[])
    shared = size(n_workers=None, memory_limit="auto", running=others)
    explicit = size(n_workers=5, memory_limit="3GiB", running=others)

    assert (alone.n_workers, alone.memory_limit, alone.reason) == (6, "auto", "")
    assert (shared.n_workers, shared.memory_limit) == (2, 12 * 2**30 // 5)  # 2 new + 3 running
    assert "2 other segflow local cluster(s) of 3 worker(s)" in shared.reason
    assert "(6 usable cores // 3)" in shared.reason
    assert (explicit.n_workers, explicit.memory_limit) == (5, "3GiB")
    assert size(n_workers=None, memory_limit="auto", running=others, min_workers=3).n_workers == 3


def test_the_registry_ignores_and_removes_the_files_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **TEXT)
    stale = tmp_path / f"{dead.stdout.strip()}-0.json"
    stale.write_text(json.dumps({"pid": int(dead.stdout), "started": 0.0, "n_workers": 8}))
    reused = tmp_path / f"{os.getpid()}-0.json"  # our PID, another process's start time
    reused.write_text(json.dumps({"pid": os.getpid(), "started": 1.0, "n_workers": 8}))
    (tmp_path / "broken.json").write_text("{")

    with claim_local_cluster(n_workers=None, memory_limit="auto", registry=tmp_path) as first:
        with claim_local_cluster(n_workers=2, memory_limit="1GiB", registry=tmp_path):
            running = running_clusters(tmp_path)
            assert sorted(c.n_workers for c in running) == sorted([first.n_workers, 2])
            assert {c.pid for c in running} == {os.getpid()}
        assert first.reason == ""  # the stale files did not count

    assert list(tmp_path.glob("*.json")) == []  # the stale ones and both of ours


def test_a_second_local_cluster_shares_the_cores_with_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # this test's clusters only
    monkeypatch.setattr(engine_cluster, "usable_cores", lambda: 4)
    caplog.set_level(logging.INFO, logger="segflow")

    with dask_client(ClusterConfig(n_workers=1)) as first:  # one worker: a cheap start
        assert [r for r in caplog.records if r.name == "segflow"] == []  # alone: nothing said
        with dask_client(ClusterConfig()) as second:
            workers = second.scheduler_info()["workers"].values()
            assert len(workers) == 2  # 4 cores // (1 + 1 running cluster)
            share = engine_cluster.usable_memory() // 3  # 1 running worker + 2 new ones
            assert [w["memory_limit"] for w in workers] == [share, share]
            assert len(first.scheduler_info()["workers"]) == 1
        assert len(list((tmp_path / "segflow" / "clusters").glob("*.json"))) == 1

    assert list((tmp_path / "segflow" / "clusters").glob("*.json")) == []
    said = [r.getMessage() for r in caplog.records if r.name == "segflow"]
    assert len(said) == 1 and "1 other segflow local cluster(s) of 1 worker(s) run here" in said[0]
    assert "2 worker(s) (4 usable cores // 2)" in said[0]

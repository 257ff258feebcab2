"""The cluster of a flow run: a LocalCluster sized by the config, closed after the run."""

from __future__ import annotations

import httpx
from distributed import Client, LocalCluster

from segflow.config import ClusterConfig
from segflow.flows.cluster import dashboard_link, dask_client


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

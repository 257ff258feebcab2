"""The cluster of a flow run: a LocalCluster sized by the config, closed after the run."""

from __future__ import annotations

from flows.cluster import dask_client
from segflow.config import ClusterConfig


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

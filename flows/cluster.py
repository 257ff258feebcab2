"""The Dask cluster of a flow run: an existing scheduler, or a LocalCluster for the run."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from segflow.config import ClusterConfig
from segflow.engine.cluster import claim_local_cluster, start_local_cluster, visible_gpus
from segflow.flows import _quiet

logger = logging.getLogger("segflow")


@contextmanager
def dask_client(cluster: ClusterConfig) -> Iterator[Any]:
    """Yield a ``distributed.Client``; close what was started here on exit.

    With ``cluster.address`` it connects to that scheduler (Kubernetes, dask-jobqueue, a cloud
    service) and leaves it running; without, to Dask's own ``scheduler-address`` setting
    (``DASK_SCHEDULER_ADDRESS``) when that is set, so every flow run of a Prefect worker with
    that variable shares one cluster. Otherwise it starts a process-based ``LocalCluster`` with
    ``n_workers`` of ``threads_per_worker`` threads, and shuts it down after the run. By
    default (``claim_local_cluster``) it takes one worker per usable core (CPU affinity,
    cgroup quota) shared equally with the other segflow local clusters running on the
    machine, and with ``memory_limit="auto"`` and such others, an equal share of the memory
    among all their workers; the first ``gpu_workers`` of them (default: one per visible CUDA
    device) each own one GPU and take the model steps' block tasks. Its HTTP server (the
    dashboard, when bokeh is installed) takes a free port, so two runs or another cluster on
    8787 never clash. Its scheduler and nannies live in this process; its worker processes
    exit when this process dies, even by SIGKILL (Dask closes a pipe each worker watches;
    measured: gone within 0.1 s), so nothing of it outlives the command.
    """
    import dask
    from distributed import Client

    address = cluster.address or dask.config.get("scheduler-address", None)
    if address:
        client = Client(address)
        try:
            yield client
        finally:
            client.close()
        return
    gpus = visible_gpus()
    if cluster.gpu_workers is not None:  # more than the devices: ids repeat (tests, MIG)
        gpus = [gpus[i % len(gpus)] if gpus else str(i) for i in range(cluster.gpu_workers)]
    with claim_local_cluster(
        n_workers=cluster.n_workers,
        memory_limit=cluster.memory_limit,
        min_workers=max(1, len(gpus)),
    ) as size:
        if size.reason:
            logger.info("Dask LocalCluster: %s", size.reason)
        with _quiet_dask():
            with _workers_ignore_sigint():
                local = start_local_cluster(
                    size.n_workers,
                    gpus=gpus,
                    threads_per_worker=cluster.threads_per_worker,
                    memory_limit=size.memory_limit,
                    # None would still bind the HTTP server to 8787; ":0" picks a free port.
                    dashboard_address=":0",
                    silence_logs=logging.CRITICAL if _quiet.QUIET_WORKERS else logging.WARNING,
                    preload=["segflow.flows._quiet"] if _quiet.QUIET_WORKERS else [],
                )
            try:
                with Client(local) as client:
                    yield client
            finally:
                local.close()


@contextmanager
def _quiet_dask() -> Iterator[None]:
    """Keep the cluster's start/stop chatter (INFO) out of the run's log; warnings stay.

    Worker processes configure logging when they import distributed, from the environment
    they inherit, so the level is passed to them through ``DASK_LOGGING__DISTRIBUTED``.
    """
    logger = logging.getLogger("distributed")
    old_level = logger.level
    old_env = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    logger.setLevel(logging.WARNING)
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if old_env is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
        else:
            os.environ["DASK_LOGGING__DISTRIBUTED"] = old_env


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start local worker processes with SIGINT ignored (Python keeps an inherited ignore).

    A Ctrl-C reaches every process of the terminal's foreground group: the workers died of
    it with a KeyboardInterrupt traceback each, while the ``segflow`` process was still
    stopping the run cleanly. Only that process should decide; it closes the cluster.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def dashboard_link(client: Any, *, timeout: float = 2.0) -> str | None:
    """The Dask dashboard URL, or None unless the dashboard answers there.

    A scheduler always runs its HTTP server (and reports it as its ``dashboard``
    service), but serves the dashboard only where bokeh is installed, on the scheduler's
    machine; elsewhere its status page says bokeh is missing. So the link is given only
    when the list of the dashboard's plots (``individual-plots.json``, empty without the
    dashboard) answers from here with some.
    """
    import httpx

    try:
        link = str(client.dashboard_link)
    except Exception:  # no dashboard service at all
        return None
    root = link.removesuffix("status") if link.endswith("/status") else link.rstrip("/") + "/"
    try:
        plots = httpx.get(root + "individual-plots.json", timeout=timeout).json()
    except (httpx.HTTPError, ValueError):
        return None
    return link if plots else None

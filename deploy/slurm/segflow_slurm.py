"""A Dask cluster on SLURM that segflow runs share: start it once, give runs its address.

On a login node (or in a long job) of the cluster, in the Python environment that has
segflow and dask-jobqueue installed (the same one the batch jobs will use)::

    python deploy/slurm/segflow_slurm.py --jobs 4 --queue cpu
    python deploy/slurm/segflow_slurm.py --jobs 2 --queue gpu --gpu      # one GPU per job

It submits ``--jobs`` batch jobs of Dask workers, prints the scheduler's address (on a free
port unless ``--port`` names one, as a firewall rule or an SSH tunnel may need), and keeps
the cluster up until Ctrl-C (then cancels the jobs). Give that address to every run, so
they share these workers instead of each starting its own local cluster::

    DASK_SCHEDULER_ADDRESS=tcp://10.1.2.3:40331 segflow run configs/aerial.yaml
    segflow run configs/aerial.yaml --set cluster.address=tcp://10.1.2.3:40331

(a Prefect worker started with ``DASK_SCHEDULER_ADDRESS`` set passes it to its flow runs).
``--print-job-script`` shows the batch script without starting anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any


def make_cluster(
    *,
    queue: str,
    cores: int = 8,
    memory: str = "32GiB",
    walltime: str = "08:00:00",
    account: str | None = None,
    gpu: bool = False,
    prologue: Sequence[str] = (),
    port: int = 0,
    dashboard_port: int = 0,
) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` whose jobs each run segflow's Dask workers.

    A CPU job runs two worker processes of ``cores / 2`` threads (segflow's blocks release
    the GIL in numpy/scipy, and two processes keep one slow block from holding a whole
    job). A GPU job (``gpu=True``) asks SLURM for one GPU and runs one worker process that
    advertises ``GPU=1``, so model blocks run only there, one at a time per GPU.

    The scheduler listens on ``port`` and serves its dashboard on ``dashboard_port``; 0 (the
    default) takes a free one, so a second cluster, a test, or another user's Dask on the
    login node never clashes. Name a port where a firewall rule or an SSH tunnel needs it.
    """
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,
        processes=1 if gpu else 2,
        memory=memory,
        walltime=walltime,
        job_name="segflow-dask",
        job_extra_directives=["--gres=gpu:1"] if gpu else [],
        worker_extra_args=["--resources", "GPU=1"] if gpu else [],
        job_script_prologue=list(prologue),
        scheduler_options={"port": port, "dashboard_address": f":{dashboard_port}"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="batch jobs of workers (default 2)")
    parser.add_argument("--queue", required=True, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account, if your site needs one")
    parser.add_argument("--cores", type=int, default=8, help="cores per job (default 8)")
    parser.add_argument("--memory", default="32GiB", help="memory per job (default 32GiB)")
    parser.add_argument("--walltime", default="08:00:00", help="per job (default 08:00:00)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per job, GPU=1 workers")
    parser.add_argument(
        "--prologue",
        action="append",
        default=[],
        help="a line run before the worker in each job, e.g. 'source /path/venv/bin/activate'",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="the scheduler's port (default 0: a free one)"
    )
    parser.add_argument(
        "--dashboard-port", type=int, default=0, help="the dashboard's (default 0: a free one)"
    )
    parser.add_argument("--print-job-script", action="store_true", help="show it and exit")
    args = parser.parse_args(argv)

    cluster = make_cluster(
        queue=args.queue,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        account=args.account,
        gpu=args.gpu,
        prologue=args.prologue,
        port=args.port,
        dashboard_port=args.dashboard_port,
    )
    with cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return
        cluster.scale(jobs=args.jobs)
        print(f"DASK_SCHEDULER_ADDRESS={cluster.scheduler_address}", flush=True)
        print(f"dashboard: {cluster.dashboard_link}  (Ctrl-C stops the cluster)", file=sys.stderr)
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

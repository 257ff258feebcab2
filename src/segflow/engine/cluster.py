"""A local Dask cluster tuned for block work.

Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also turns off glibc's
adaptive mmap threshold: every temporary above 128 KiB is then a fresh ``mmap`` and its pages
fault in again on each use. Measured here, ``numpy.histogram`` of a 1040^2 float32 block took
35-48 ms in such a worker against 12-15 ms with ``MALLOC_MMAP_THRESHOLD_`` at 64 MiB and
``MALLOC_TRIM_THRESHOLD_`` at 128 MiB: block-sized temporaries (a few MiB) then come from the
heap and are reused, at the price of up to 128 MiB of freed memory kept per worker.

Several flow runs on one machine each start a local cluster: :func:`claim_local_cluster`
sizes a new one by the cores this process may use, shared with the other segflow local
clusters running here, which each register a small file in :func:`cluster_registry`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER_ENV: dict[str, int] = {
    "MALLOC_TRIM_THRESHOLD_": 128 * 2**20,
    "MALLOC_MMAP_THRESHOLD_": 64 * 2**20,
    "OMP_NUM_THREADS": 1,
    "MKL_NUM_THREADS": 1,
    "OPENBLAS_NUM_THREADS": 1,
}


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, without importing torch.

    ``CUDA_VISIBLE_DEVICES`` when it is set (empty: none), else one id per NVIDIA GPU the
    driver lists in ``/proc/driver/nvidia/gpus`` (none where there is no driver).
    """
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    listed = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(listed.iterdir())))] if listed.is_dir() else []


def start_local_cluster(
    n_workers: int,
    *,
    threads_per_worker: int = 1,
    memory_limit: str | int = "auto",
    dashboard_address: str = ":0",
    silence_logs: int = logging.WARNING,
    resources: Mapping[str, float] | None = None,
    gpus: Sequence[str] = (),
    preload: Sequence[str] = (),
) -> Any:
    """Start a process-based ``distributed.LocalCluster`` with :data:`WORKER_ENV`.

    ``resources`` are what every worker advertises. ``gpus`` (CUDA device ids) make the
    first ``len(gpus)`` workers GPU workers: worker ``i`` advertises ``{"GPU": 1}`` and sees
    only device ``gpus[i]`` (``CUDA_VISIBLE_DEVICES``), so the block tasks of model steps,
    submitted with ``resources={"GPU": 1}``, run one at a time per GPU and never two models
    share one; the other workers see no GPU (``CUDA_VISIBLE_DEVICES=""``) and run the rest,
    as do the GPU workers between model tasks.
    ``preload`` names modules each worker imports at start (Dask's ``dask_setup`` hook).
    ``dashboard_address`` is where the scheduler's HTTP server (the dashboard) listens:
    ``":0"``, a free port, by default; Dask binds 8787 for ``None``, so it is not accepted.

    Examples
    --------
    >>> cluster = start_local_cluster(2, gpus=["0"])  # doctest: +SKIP
    >>> cluster.close()  # doctest: +SKIP
    """
    import dask
    from distributed import LocalCluster

    if len(gpus) > n_workers:
        raise ValueError(f"{len(gpus)} GPUs need at least as many workers, got {n_workers}")
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.update(WORKER_ENV)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=0 if gpus else n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            processes=True,
            dashboard_address=dashboard_address,
            silence_logs=silence_logs,
            **({"resources": dict(resources)} if resources else {}),
            **({"preload": list(preload)} if preload else {}),
        )
        if not gpus:
            return cluster
        try:
            # LocalCluster gives every worker the same options: lay the workers out by hand
            # from its template, then start them (SpecCluster's worker_spec + scale).
            for i in range(n_workers):
                spec = copy.deepcopy(cluster.new_spec)
                options = spec["options"]
                # The other workers see no GPU at all: nothing they run can land on one.
                device = gpus[i] if i < len(gpus) else ""
                options["env"] = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": device}
                if i < len(gpus):
                    options["resources"] = {**options.get("resources", {}), "GPU": 1}
                cluster.worker_spec[i] = spec
            cluster.scale(n_workers)
            cluster.wait_for_workers(n_workers, timeout=120)
        except BaseException:
            cluster.close()
            raise
        return cluster


# --- the size of a new local cluster -------------------------------------------------------


@dataclass(frozen=True)
class RunningCluster:
    """A segflow local cluster of a live process on this machine, as its registry file says."""

    pid: int
    n_workers: int
    path: Path


@dataclass(frozen=True)
class ClusterSize:
    """Workers and per-worker memory limit of a new local cluster, and why (``""`` when
    nothing else runs)."""

    n_workers: int
    memory_limit: str | int
    reason: str = ""


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    Dask's ``dask.system.cpu_count`` reads both (``os.sched_getaffinity``, and the quota of
    cgroup v1 or of this process's cgroup v2 ``cpu.max``, rounded up).
    """
    from dask.system import cpu_count

    return int(cpu_count())


def usable_memory() -> int:
    """Bytes of memory this process may use (RAM, capped by a cgroup limit and RLIMIT_RSS):
    what Dask's ``memory_limit="auto"`` shares out."""
    from distributed.system import memory_limit

    return int(memory_limit())


def default_workers(usable_cores: int, running_clusters: int) -> int:
    """Workers of a new local cluster: the usable cores shared equally with the segflow
    local clusters already running here, at least one.

    Examples
    --------
    >>> default_workers(8, 0), default_workers(8, 1), default_workers(8, 2), default_workers(2, 3)
    (8, 4, 2, 1)
    """
    return max(1, usable_cores // (1 + running_clusters))


def size_local_cluster(
    *,
    n_workers: int | None,
    memory_limit: str,
    usable_cores: int,
    memory: int,
    running: Sequence[RunningCluster],
    min_workers: int = 1,
) -> ClusterSize:
    """The size of a new local cluster; explicit ``n_workers`` and ``memory_limit`` are kept.

    Without ``n_workers``: :func:`default_workers`; either way at least ``min_workers`` (one
    per GPU worker).
    With ``memory_limit="auto"`` and other clusters ``running``: ``memory`` shared equally
    among all their workers and the new ones (Dask's own ``"auto"`` would give each cluster
    the whole machine's memory); alone, ``"auto"`` is left to Dask.

    Examples
    --------
    >>> other = RunningCluster(pid=1, n_workers=2, path=Path("1.json"))
    >>> size = size_local_cluster(
    ...     n_workers=None, memory_limit="auto", usable_cores=4, memory=8 * 2**30, running=[other]
    ... )
    >>> size.n_workers, size.memory_limit / 2**30
    (2, 2.0)
    """
    workers = max(min_workers, n_workers or default_workers(usable_cores, len(running)))
    if not running:
        return ClusterSize(workers, memory_limit)
    others = sum(c.n_workers for c in running)
    limit: str | int = memory_limit
    if memory_limit == "auto":
        limit = memory // (workers + others)
    reason = (
        f"{len(running)} other segflow local cluster(s) of {others} worker(s) run here: "
        f"{workers} worker(s)"
        + ("" if n_workers else f" ({usable_cores} usable cores // {1 + len(running)})")
        + f", memory limit {_format_limit(limit)} per worker"
        + (f" ({memory / 2**30:.1f} GiB // {workers + others})" if memory_limit == "auto" else "")
    )
    return ClusterSize(workers, limit, reason)


def _format_limit(limit: str | int) -> str:
    return f"{limit / 2**30:.1f} GiB" if isinstance(limit, int) else str(limit)


# --- the registry of running local clusters ------------------------------------------------


def cluster_registry() -> Path:
    """Where segflow's local clusters register: ``$XDG_RUNTIME_DIR/segflow/clusters`` (a
    per-user folder emptied at logout and reboot), else ``$XDG_CACHE_HOME/segflow/clusters``
    or ``~/.cache/segflow/clusters``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segflow" / "clusters"


def running_clusters(registry: Path) -> list[RunningCluster]:
    """The clusters registered in ``registry`` whose process still runs.

    A file whose process is gone (killed before it could remove it) or unreadable is removed.
    A process counts as the same only with the start time its file recorded, so a reused PID
    does not keep a dead cluster's file alive.
    """
    clusters = []
    for path in sorted(registry.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            pid, n_workers, started = int(entry["pid"]), int(entry["n_workers"]), entry["started"]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if _alive(pid, started):
            clusters.append(RunningCluster(pid=pid, n_workers=n_workers, path=path))
        else:
            path.unlink(missing_ok=True)
    return clusters


@contextlib.contextmanager
def claim_local_cluster(
    *,
    n_workers: int | None,
    memory_limit: str,
    min_workers: int = 1,
    registry: Path | None = None,
) -> Iterator[ClusterSize]:
    """Size a new local cluster (:func:`size_local_cluster`) and register it until exit.

    Reading the others and registering happen under a lock of the registry, so two runs
    starting at once see each other. Where the registry cannot be written (a read-only home),
    the cluster is sized as if it were alone.
    """
    registry = registry or cluster_registry()
    try:
        path, size = _register(registry, n_workers, memory_limit, min_workers)
    except OSError:
        path, size = None, _size(n_workers, memory_limit, min_workers, [])
    try:
        yield size
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def _register(
    registry: Path, n_workers: int | None, memory_limit: str, min_workers: int
) -> tuple[Path, ClusterSize]:
    """Size a new cluster by the running ones and write its file (``PID-RANDOM.json``: one
    process may run several clusters) under the registry's lock."""
    registry.mkdir(parents=True, exist_ok=True)
    with _locked(registry):
        size = _size(n_workers, memory_limit, min_workers, running_clusters(registry))
        path = registry / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        entry = {
            "pid": os.getpid(),
            "started": _process_start_time(os.getpid()),
            "n_workers": size.n_workers,
            "memory_limit": size.memory_limit,
        }
        path.write_text(json.dumps(entry))
    return path, size


def _size(
    n_workers: int | None, memory_limit: str, min_workers: int, running: list[RunningCluster]
) -> ClusterSize:
    return size_local_cluster(
        n_workers=n_workers,
        memory_limit=memory_limit,
        usable_cores=usable_cores(),
        memory=usable_memory(),
        running=running,
        min_workers=min_workers,
    )


@contextlib.contextmanager
def _locked(registry: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``registry`` (``fcntl.flock`` of its ``.lock`` file)."""
    with (registry / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None when there is none."""
    import psutil  # a dependency of distributed

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None


def _alive(pid: int, started: Any) -> bool:
    """Whether process ``pid`` runs and started at ``started`` (within a second: psutil
    derives start times from clock ticks since boot)."""
    now = _process_start_time(pid)
    return now is not None and isinstance(started, int | float) and abs(now - started) < 1.0

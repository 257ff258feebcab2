"""Expected outcomes as a platform team sees them: a deployment's flow process (``python -m
prefect.engine``, what a process worker starts) against the session's Prefect test server.

A run whose only failures are bad items ends *Failed* and a stopped run *Cancelled*, each
with one line as its state message, no ERROR-level record in the run's logs (alerting on
ERROR must not page for a damaged tile), no traceback, and the process exits 0 (the
outcome is in the run's state). The progress of a stopped run stays below 100 %; a run that
takes over a killed run's store closes that run's task runs and its progress; a run's
artifacts stay small whatever the number of quick looks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import yaml
from _geodata import blob_image, write_geotiff

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def api_url(prefect_harness: None) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _config(tmp_path: Path, folder: Path, dask_address: str | None, **output: Any) -> Path:
    path = tmp_path / "outcomes.yaml"
    path.write_text(
        yaml.safe_dump({
            "name": "outcomes",
            "input": {"path": str(folder)},
            "output": {"store": str(tmp_path / "out.zarr"), "chunks": [32, 32], **output},
            "blocks": {"shape": [32, 32]},
            "pipeline": [{"op": "threshold", "value": 100}, {"op": "label"}],
            **({"cluster": {"address": dask_address}} if dask_address else {}),
        })
    )  # fmt: skip
    return path


def _deployment_run(config: Path, **parameters: Any) -> UUID:
    """A flow run of a deployment of ``segment-collection`` whose pull step works in the
    config's folder (as ``deploy/prefect.yaml``'s does in SEGFLOW_REPO)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("segment-collection")
        deployment = client.create_deployment(
            flow_id=flow_id,
            name=f"outcomes-{config.parent.name}",
            entrypoint="segflow.flows.segment:segment_collection",
            pull_steps=[
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": str(config.parent)
                    }
                }
            ],
        )
        run = client.create_flow_run_from_deployment(
            deployment, parameters={"config": str(config), **parameters}
        )
    return run.id


def _engine(flow_run_id: UUID, api_url: str, cwd: Path) -> subprocess.Popen[str]:
    """The flow run's process as a process worker starts it."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT__FLOW_RUN_ID": str(flow_run_id),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "prefect.engine"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _logs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


def _flow_run(flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _task_runs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _artifacts(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _errors(flow_run_id: UUID, output: str) -> list[str]:
    """ERROR-level records of the run (its API logs) and of its process's terminal."""
    records = [f"{r.name}: {r.message}" for r in _logs(flow_run_id) if r.level >= 40]
    lines = [line for line in output.splitlines() if "| ERROR" in line or "| CRITICAL" in line]
    return records + lines


def test_a_run_failed_only_on_bad_items_is_failed_without_alarms(
    tmp_path: Path, dask_address: str, api_url: str
) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    good = (folder / "good.tif").read_bytes()
    (folder / "damaged.tif").write_bytes(good[: len(good) // 2])  # cut short
    config = _config(tmp_path, folder, dask_address)
    flow_run_id = _deployment_run(config)

    process = _engine(flow_run_id, api_url, tmp_path)
    output, _ = process.communicate(timeout=180)

    print(output)
    assert process.returncode == 0, output
    flow_run = _flow_run(flow_run_id)
    assert flow_run.state.type.value == "FAILED", flow_run.state
    assert flow_run.state.message == (
        f"outcomes: 1 done, 0 skipped, 1 failed -> {tmp_path / 'out.zarr'}"
    )
    assert _errors(flow_run_id, output) == [], "\n".join(_errors(flow_run_id, output))
    assert "Traceback" not in output
    assert not [r for r in _logs(flow_run_id) if "Traceback" in r.message]
    # The damaged item's task run: Failed, with its reason as one readable line.
    [damaged] = [r for r in _task_runs(flow_run_id) if r.name == "segment-damaged"]
    assert damaged.state.type.value == "FAILED"
    assert damaged.state.message.startswith("item 'damaged'")
    item_lines = [r.message for r in _logs(flow_run_id) if r.task_run_id == damaged.id]
    assert item_lines and not [m for m in item_lines if "'status'" in m], item_lines
    # The items table is on the run, as an artifact.
    [table] = [a for a in _artifacts(flow_run_id) if a.type == "table" and a.key]
    assert {r["id"]: r["status"] for r in json.loads(str(table.data))} == {
        "damaged": "failed",
        "good": "done",
    }


def _slow_collection(tmp_path: Path, n_items: int = 6, side: int = 256) -> Path:
    """Tiles that take a second or more each on the session's one-thread Dask worker."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "slow"
    folder.mkdir()
    for i in range(n_items):
        image = (rng.random((1, side, side)) * 255).astype(np.uint8)
        write_geotiff(folder / f"s{i}.tif", image, x0=500_000.0 + 20_000 * i)
    return folder


def _wait_for(condition: Any, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # gone or stuck: collect its output, leave no pipe open
            raise AssertionError(f"never saw {what}: {process.communicate()[0]}")
        time.sleep(0.05)


def _progress(flow_run_id: UUID) -> Any:
    [progress] = [a for a in _artifacts(flow_run_id) if a.type == "progress"]
    return progress


def test_a_cancelled_run_is_cancelled_with_its_summary_and_true_progress(
    tmp_path: Path, dask_address: str, api_url: str
) -> None:
    config = _config(tmp_path, _slow_collection(tmp_path), dask_address)
    flow_run_id = _deployment_run(config)
    process = _engine(flow_run_id, api_url, tmp_path)
    lock = tmp_path / "out.zarr" / ".segflow" / "lock.json"
    _wait_for(lock.exists, process, "the run's store lock")
    time.sleep(1.0)  # some blocks of the first items done

    process.send_signal(signal.SIGTERM)  # what a worker does to cancel a flow run
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 0, output
    state = _flow_run(flow_run_id).state
    assert state.type.value == "CANCELLED", state
    assert state.message.startswith("outcomes: interrupted (SIGTERM): "), state.message
    assert _errors(flow_run_id, output) == [], "\n".join(_errors(flow_run_id, output))
    assert "Traceback" not in output and "Unexpected result" not in output
    # The progress stays where the run stopped, with its counts.
    progress = _progress(flow_run_id)
    assert progress.data < 100.0, progress
    assert "interrupted" in progress.description, progress.description
    assert not lock.exists()


def test_the_run_that_takes_over_a_killed_runs_store_closes_its_task_runs_and_progress(
    tmp_path: Path, dask_address: str, api_url: str
) -> None:
    config = _config(tmp_path, _slow_collection(tmp_path, n_items=3), dask_address)
    killed = _deployment_run(config)
    process = _engine(killed, api_url, tmp_path)
    lock = tmp_path / "out.zarr" / ".segflow" / "lock.json"
    _wait_for(lock.exists, process, "the run's store lock")
    # Killed as the kernel's out-of-memory killer does, while its items run.
    _wait_for(
        lambda: any(
            r.state is not None and r.state.is_running()  # a new task run may have none yet
            for r in _task_runs(killed)
            if r.name.startswith("segment-")
        ),
        process,
        "a running item",
    )
    process.kill()
    process.communicate()
    assert [r for r in _task_runs(killed) if r.state is not None and r.state.is_running()]

    taker = _deployment_run(config)
    process = _engine(taker, api_url, tmp_path)
    output, _ = process.communicate(timeout=180)

    assert process.returncode == 0, output
    assert _flow_run(taker).state.type.value == "COMPLETED", output
    assert _flow_run(killed).state.type.value == "CRASHED"
    left = {r.name: r.state.type.value for r in _task_runs(killed)}
    assert "RUNNING" not in left.values() and "CRASHED" in left.values(), left
    progress = _progress(killed)
    assert progress.description.startswith(f"**Crashed at {progress.data} %**"), progress
    assert _flow_run(taker).name in progress.description


def test_a_runs_artifacts_stay_small_whatever_the_number_of_quick_looks(
    tmp_path: Path, dask_address: str, api_url: str
) -> None:
    from segflow.flows.segment import segment_collection
    from segflow.store.quicklook import QUICKLOOK_NAME

    n_items = 12  # more than the default 10, each 1024 px at most
    folder = tmp_path / "tiles"
    folder.mkdir()
    for k in range(n_items):
        write_geotiff(folder / f"t{k:02d}.tif", blob_image(), x0=500_000.0 + 720 * k)
    config = yaml.safe_load(_config(tmp_path, folder, dask_address).read_text())
    config["run"] = {"quicklooks": n_items, "quicklook_size": 1024}

    state = segment_collection(config, return_state=True)

    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    artifacts = _artifacts(flow_run_id)
    looks = [a for a in artifacts if "quick look" in str(a.description)]
    assert len(looks) == n_items
    assert len(list((tmp_path / "out.zarr").glob(f"*/{QUICKLOOK_NAME}"))) == n_items
    # What Prefect's database holds of the run's artifacts: data, description, key.
    sizes = [
        len(json.dumps(a.data).encode()) + len((a.description or "").encode()) + len(a.key or "")
        for a in artifacts
    ]
    looks_bytes = [s for a, s in zip(artifacts, sizes, strict=True) if a in looks]
    print(
        f"{len(artifacts)} artifacts, {sum(sizes)} bytes; {n_items} quick looks, "
        f"{min(looks_bytes)}-{max(looks_bytes)} bytes each"
    )
    assert sum(sizes) < 100_000, sizes

"""deploy/prefect.yaml: every deployment loads its flow, its parameters validate, cron parses;
its pull step, stored by a real ``prefect deploy``, works in the worker's SEGFLOW_REPO."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOYMENTS: list[dict[str, Any]] = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())[
    "deployments"
]


def test_there_is_a_scheduled_incremental_run_and_a_backfill() -> None:
    scheduled = [d for d in DEPLOYMENTS if d.get("schedules")]
    assert scheduled and all("overwrite" not in d["parameters"] for d in scheduled)
    assert any(d["entrypoint"] == "segflow.flows.backfill:backfill" for d in DEPLOYMENTS)
    assert any(d["parameters"].get("overwrite") is True for d in DEPLOYMENTS)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_loads_and_validates(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # entrypoints and config paths are relative to the repository
    flow = load_flow_from_entrypoint(deployment["entrypoint"])

    flow.validate_parameters(deployment["parameters"])
    assert (ROOT / deployment["parameters"]["config"]).is_file()
    for schedule in deployment.get("schedules", []):
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_runs_are_named_and_tagged_after_their_config(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.flows import load_flow_from_entrypoint

    from segflow.config import load_config

    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    config_name = load_config(ROOT / deployment["parameters"]["config"]).name
    nightly = datetime(2026, 11, 30, 2, 0, 3, tzinfo=UTC)  # a run starts a few s late

    name = flow.flow_run_name.name_for(deployment["parameters"], nightly)  # type: ignore[union-attr]

    # What each run does is in its name: a backfill, a rebuild, or a nightly (no word).
    kind = "-backfill" if deployment["entrypoint"].endswith(":backfill") else ""
    kind = "-rebuild" if deployment["parameters"].get("overwrite") is True else kind
    assert name == f"{config_name}{kind}-2026-11-30T02:00Z"
    assert f"config:{config_name}" in deployment["tags"]


# --- the pull step: SEGFLOW_REPO ----------------------------------------------------------


def deploy_pull_steps(tmp_path: Path, *, repo: Path | None) -> list[Any]:
    """The pull steps the API stores for ``aerial-nightly`` after a real ``prefect deploy``
    of deploy/prefect.yaml, run with SEGFLOW_REPO set to ``repo`` (unset when None).

    The command runs in a process of its own, as on a deploying machine (in this process its
    API client leaves a connection open, which ``filterwarnings = error`` turns into an error).
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    env["PREFECT_DEFAULT_WORK_POOL_NAME"] = "segflow"  # the one variable naming the pool
    env.pop("SEGFLOW_REPO", None)
    if repo is not None:
        env["SEGFLOW_REPO"] = str(repo)
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    command += ["--prefect-file", str(ROOT / "deploy" / "prefect.yaml"), "--name", "aerial-nightly"]
    deployed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("segment-collection/aerial-nightly")
    assert deployment.work_pool_name == "segflow"
    return list(deployment.pull_steps or [])


def run_pull_steps(
    steps: list[Any], monkeypatch: pytest.MonkeyPatch, *, worker_repo: Path | None
) -> Path:
    """The working directory after running ``steps`` as a flow run of a worker does, with the
    worker's SEGFLOW_REPO set to ``worker_repo`` (unset when None)."""
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.asyncutils import run_coro_as_sync

    if worker_repo is None:
        monkeypatch.delenv("SEGFLOW_REPO", raising=False)
    else:
        monkeypatch.setenv("SEGFLOW_REPO", str(worker_repo))
    monkeypatch.chdir(ROOT)  # restored after the test: the step changes the process's folder
    run_coro_as_sync(run_steps(steps, print_function=lambda *args, **kwargs: None))
    return Path.cwd()


@pytest.fixture(scope="module")
def segflow_pool(prefect_harness: None) -> None:
    """The work pool the deployments name, in the session's temporary Prefect API."""
    from prefect.testing.cli import invoke_and_assert

    invoke_and_assert(["work-pool", "create", "segflow", "--type", "process"], echo=False)


@pytest.mark.usefixtures("segflow_pool")
def test_segflow_repo_unset_at_deploy_time_is_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.deployments.steps.core import StepExecutionError

    worker = tmp_path / "worker-checkout"
    worker.mkdir()

    steps = deploy_pull_steps(tmp_path, repo=None)

    assert "{{ $SEGFLOW_REPO }}" in str(steps)  # stored as written, filled in by the flow run
    assert run_pull_steps(steps, monkeypatch, worker_repo=worker) == worker
    with pytest.raises(StepExecutionError) as raised:
        run_pull_steps(steps, monkeypatch, worker_repo=None)
    assert isinstance(raised.value.__cause__, ValueError)
    assert "SEGFLOW_REPO is not set in this flow run's environment" in str(raised.value.__cause__)


@pytest.mark.usefixtures("segflow_pool")
def test_segflow_repo_set_at_deploy_time_is_used_where_the_worker_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, deployer = tmp_path / "worker-checkout", tmp_path / "deploy-checkout"
    worker.mkdir()
    deployer.mkdir()

    steps = deploy_pull_steps(tmp_path, repo=deployer)

    assert str(deployer) in str(steps) and "$SEGFLOW_REPO" not in str(steps)
    assert run_pull_steps(steps, monkeypatch, worker_repo=worker) == worker  # the worker's wins
    assert run_pull_steps(steps, monkeypatch, worker_repo=None) == deployer


def test_the_pull_step_names_segflow_repo_when_it_cannot_be_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segflow.flows.deploy_steps import set_working_directory_from_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGFLOW_REPO", raising=False)
    with pytest.raises(ValueError, match=r"^SEGFLOW_REPO is not set in this flow run's env"):
        set_working_directory_from_env("")
    with pytest.raises(NotADirectoryError, match=r"SEGFLOW_REPO \('/nowhere', from `prefect dep"):
        set_working_directory_from_env("/nowhere")
    monkeypatch.setenv("SEGFLOW_REPO", str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError, match=r"missing', from this flow run's environment"):
        set_working_directory_from_env(str(tmp_path))

"""deploy/prefect.yaml: every deployment loads its flow, its parameters validate, cron parses."""

from __future__ import annotations

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

    kind = "-backfill" if deployment["entrypoint"].endswith(":backfill") else ""
    assert name == f"{config_name}{kind}-2026-11-30T02:00Z"
    assert f"config:{config_name}" in deployment["tags"]

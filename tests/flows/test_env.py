"""Prefect isolation: the CLI never writes ~/.prefect unless the user configured Prefect."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflow.flows._env import isolate_prefect


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    return home


def test_unconfigured_prefect_gets_a_segflow_home(clean_env: Path, tmp_path: Path) -> None:
    import os

    isolate_prefect()

    assert os.environ["PREFECT_HOME"] == str(tmp_path / "cache" / "segflow" / "prefect")
    assert (tmp_path / "cache" / "segflow" / "prefect").is_dir()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert not (clean_env / ".prefect").exists()


@pytest.mark.parametrize("variable", ["PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH"])
def test_a_configured_prefect_is_left_alone(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    import os

    monkeypatch.setenv(variable, "http://server:4200/api" if variable.endswith("URL") else "/x")

    isolate_prefect()

    assert os.environ.get("PREFECT_HOME") == (None if variable != "PREFECT_HOME" else "/x")


def test_a_user_profile_file_counts_as_configured(clean_env: Path) -> None:
    import os

    (clean_env / ".prefect").mkdir()
    (clean_env / ".prefect" / "profiles.toml").write_text('active = "default"\n')

    isolate_prefect()

    assert "PREFECT_HOME" not in os.environ


def test_a_temporary_server_may_take_two_minutes_unless_the_user_says(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    isolate_prefect()
    default = os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    isolate_prefect()

    assert default == "120"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"

"""The command's temporary Prefect server: one per command, a start-up limit, and what it says.

Each case runs in a subprocess with its own ``PREFECT_HOME`` and no ``PREFECT_API_URL``, so a
real temporary server starts (the session's test harness would otherwise be "configured").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _geodata import blob_image, write_geotiff


def unconfigured_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "COLUMNS": "200"}
    for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        env.pop(name, None)
    return {**env, **extra}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


SERVE = """
import httpx
from segflow.flows import _server
_server.WAIT_NOTE_EVERY = 0.5  # the server takes seconds: some notes are due
lines = []
with _server.prefect_api(say=lines.append) as url:
    print("URL", url, httpx.get(url + "/health").status_code)
for line in lines:
    print("SAY", line)
"""


def test_a_temporary_server_says_what_it_waits_for_and_stops_after(tmp_path: Path) -> None:
    env = unconfigured_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")

    done = run_python(SERVE, env)

    assert done.returncode == 0, done.stderr
    url, status = next(line.split()[1:] for line in done.stdout.splitlines() if line[:3] == "URL")
    said = [line.removeprefix("SAY ") for line in done.stdout.splitlines() if line[:3] == "SAY"]
    assert status == "200"
    assert said[0] == (
        "segflow: starting a temporary Prefect server (PREFECT_API_URL is not set); "
        f"waiting up to 90 s for {url}/health to answer"
    )
    assert said[1].startswith("segflow: still waiting for the temporary Prefect server (")
    assert said[1].endswith(" s of 90 s)")
    assert said[-1].startswith("segflow: temporary Prefect server ready after ")
    with pytest.raises(httpx.ConnectError):  # stopped with the context
        httpx.get(f"{url}/health", timeout=2.0)


def test_a_server_slower_than_the_limit_fails_with_the_setting_to_raise(tmp_path: Path) -> None:
    # Prefect's server needs seconds to import and start: 1 s is always too little.
    env = unconfigured_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")

    done = run_python(
        "from segflow.flows._server import prefect_api\nprefect_api().__enter__()", env
    )

    assert done.returncode == 1
    assert "waiting up to 1 s for http://127.0.0.1:" in done.stderr
    assert "RuntimeError: the temporary Prefect server did not answer at http://127.0.0.1:" in (
        done.stderr
    )
    assert (
        "within 1 s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set "
        "PREFECT_API_URL to use a running server" in done.stderr
    )


@pytest.mark.slow
def test_one_command_starts_one_server_for_all_its_configs(
    tmp_path: Path, dask_address: str
) -> None:
    write_geotiff(tmp_path / "tile.tif", blob_image())
    configs = []
    for name in ("first", "second", "third"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            f"name: {name}\n"
            "input: {path: tile.tif}\n"
            f"output: {{store: {name}.zarr, chunks: [64, 64]}}\n"
            "blocks: {shape: [64, 64]}\n"
            "pipeline: [{op: otsu}, {op: label}]\n"
            f"cluster: {{address: '{dask_address}'}}\n"
        )
        configs.append(str(config))

    done = subprocess.run(
        [sys.executable, "-m", "segflow.flows", "run", *configs],
        env=unconfigured_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )

    assert done.returncode == 0, done.stderr
    for name in ("first", "second", "third"):
        assert f"{name}: 1 done, 0 skipped (already done), 0 failed" in done.stdout
    assert done.stderr.count("segflow: starting a temporary Prefect server") == 1
    assert "waiting up to 120 s" in done.stderr  # the command's limit, not Prefect's 20 s
    assert done.stderr.count("segflow: temporary Prefect server ready after") == 1

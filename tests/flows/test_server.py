"""The command's temporary Prefect server: one per command, a start-up limit, and what it says.

Each case runs in a subprocess with its own ``PREFECT_HOME`` and no ``PREFECT_API_URL``, so a
real temporary server starts (the session's test harness would otherwise be "configured").
Nothing a command starts outlives it, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
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


def _descendants(process: psutil.Process) -> dict[int, tuple[float, str]]:
    """PID -> (start time, command line) of every live descendant of ``process``."""
    found = {}
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found[child.pid] = (child.create_time(), " ".join(child.cmdline()))
    return found


def _alive(pid: int, started: float) -> bool:
    """Whether ``pid`` still runs as the process that started at ``started`` (a reused PID
    is another process; a zombie has ended)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - started) < 1
    except psutil.NoSuchProcess:
        return False


def test_nothing_outlives_a_command_killed_with_sigkill(tmp_path: Path) -> None:
    # Eight 512 x 512 tiles: the run is still busy when its server and cluster are up.
    rng = np.random.default_rng(0)
    (tmp_path / "tiles").mkdir()
    for i in range(8):
        image = (rng.random((1, 512, 512)) * 255).astype(np.uint8)
        write_geotiff(tmp_path / "tiles" / f"t{i}.tif", image, x0=500_000.0 + 10_000 * i)
    (tmp_path / "kill.yaml").write_text(
        "name: kill\n"
        "input: {path: tiles}\n"
        "output: {store: out.zarr, chunks: [128, 128]}\n"
        "blocks: {shape: [128, 128]}\n"
        "pipeline: [{op: gaussian, sigma: 2}, {op: otsu}, {op: label}]\n"
        "cluster: {n_workers: 2}\n"  # a LocalCluster of this command's own
    )
    command = subprocess.Popen(
        [sys.executable, "-m", "segflow.flows", "run", "kill.yaml"],
        cwd=tmp_path,
        env=unconfigured_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        root = psutil.Process(command.pid)
        deadline = time.monotonic() + 240
        while True:  # until the temporary server and both Dask workers run
            assert command.poll() is None, "the run ended before its cluster was seen"
            assert time.monotonic() < deadline, _descendants(root)
            tree = _descendants(root)
            servers = [pid for pid, (_, line) in tree.items() if "uvicorn" in line]
            workers = [pid for pid, (_, line) in tree.items() if "spawn_main" in line]
            if servers and len(workers) == 2:
                break
            time.sleep(0.1)
        tree = _descendants(root)  # the last look before the kill
    finally:
        command.kill()
        command.wait()

    deadline = time.monotonic() + 10
    while (alive := [pid for pid, (t, _) in tree.items() if _alive(pid, t)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in alive:  # not to leave them to the next test
        psutil.Process(pid).kill()
    assert not alive, [tree[pid][1] for pid in alive]

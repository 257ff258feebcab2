"""What the Prefect UI shows, checked through the API of a real ``prefect server start``.

The test starts a server on a free port of 127.0.0.1 (its own PREFECT_HOME), runs the real
``segflow run`` command against it (PREFECT_API_URL) on a collection of one good tile and
one unreadable file, and asks the API what a platform engineer would see: the run's name
and tags, a Failed task run for the unreadable file, the artifacts and their keys, the
persisted summary. Skipped, with the reason, when the server does not answer within
:data:`STARTUP_TIMEOUT` seconds (a loaded machine).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from _geodata import blob_image, write_geotiff

from segflow.tasks.artifacts import output_hash

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
STARTUP_TIMEOUT = 60.0  # measured: about 7 s on an idle 2-core machine


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API URL of a ``prefect server start`` of this module's own."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",  # the API is what is checked; the UI costs start-up
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = (home / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (home / "server.log").read_text()[-500:]
                pytest.skip(
                    f"`prefect server start` did not answer {url}/health within "
                    f"{STARTUP_TIMEOUT:.0f} s (exit status {server.poll()}): {tail}"
                )
            time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_run_against_a_real_server_shows_names_tags_failed_items_and_artifacts(
    prefect_server: str, tmp_path: Path, dask_address: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    from segflow.flows.segment import ItemsFailedError

    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    (folder / "broken.tif").write_bytes(b"this is not a TIFF file")
    store = tmp_path / "out.zarr"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump({
            "name": "tiny",
            "input": {"path": str(folder)},
            "output": {"store": str(store), "chunks": [32, 32]},
            "blocks": {"shape": [32, 32]},
            "pipeline": [{"op": "threshold", "value": 100}, {"op": "label"}],
            "cluster": {"address": dask_address},
        })
    )  # fmt: skip
    results = tmp_path / "results"  # where the command persists its flow result
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "client-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(results),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }

    command = subprocess.run(
        [sys.executable, "-m", "segflow.flows", "run", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = command.stdout + command.stderr
    assert command.returncode == 1, output  # one item failed, the other is done
    assert "tiny: 1 done, 0 skipped (already done), 1 failed" in output
    assert re.search(r"dashboard http://\S+/status", output), output

    settings = {PREFECT_API_URL: prefect_server, PREFECT_LOCAL_STORAGE_PATH: results}
    with temporary_settings(updates=settings), get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs()
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        result = flow_run.state.result(raise_on_failure=False)  # type: ignore[union-attr]

    # The runs list: named after the config and the time, tagged with config and store.
    assert re.fullmatch(r"tiny-\d{4}-\d\d-\d\dT\d\d:\d\dZ", flow_run.name), flow_run.name
    assert {"segflow", "config:tiny", f"store:{store}"} <= set(flow_run.tags)
    assert flow_run.state is not None and flow_run.state.type.value == "FAILED"
    # One task run per item: the unreadable file's is Failed with its reason.
    states = {r.name: r.state for r in task_runs if r.name.startswith("segment-")}
    assert {name: s.type.value for name, s in states.items() if s} == {
        "segment-broken": "FAILED",
        "segment-good": "COMPLETED",
    }
    assert "not a readable GeoTIFF/TIFF" in str(states["segment-broken"].message)  # type: ignore[union-attr]
    # Artifacts keyed by config and store; the progress ends at 100 %.
    digest = output_hash(str(store))
    assert {a.key for a in artifacts if a.key} == {
        f"segflow-tiny-{digest}-{suffix}" for suffix in ("items", "output", "progress")
    }
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert progress.data == 100.0
    assert progress.description == "**2 of 2 items finished** (1 done, 1 failed)"
    [items] = [a for a in artifacts if a.type == "table" and a.key]
    rows = json.loads(str(items.data))  # a table artifact's data is its JSON text
    assert {row["id"]: row["status"] for row in rows} == {
        "broken": "failed",
        "good": "done",
    }
    # The persisted result, read back in another process: the failure's message.
    assert isinstance(result, ItemsFailedError)
    assert "1 item(s) of 'tiny' failed" in str(result)

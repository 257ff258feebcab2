"""Fault injection: ``segflow run`` killed at the points where a store is half written.

Each case runs the real command in a subprocess (against the session's Prefect test server
and its Dask cluster), kills it (SIGKILL at a named point through ``SEGFLOW_FAULT``, or
SIGINT to its process group as a terminal's Ctrl-C does), then reruns it plainly and checks
that every item is done and bit-identical to a clean run, and that no item was ever
``done`` without its data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _geodata import lock_held_elsewhere, write_geotiff

from segflow.store import read_index
from segflow.store.commit import read_commit

pytestmark = pytest.mark.slow

N_ITEMS = 3


@pytest.fixture(scope="module")
def api_url(prefect_harness: None) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture
def config(tmp_path: Path, dask_address: str) -> Path:
    rng = np.random.default_rng(7)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(N_ITEMS):
        image = (rng.random((1, 96, 112)) * 255).astype(np.uint8)
        write_geotiff(folder / f"t{i}.tif", image, x0=500_000.0 + 2_000 * i)
    path = tmp_path / "faults.yaml"
    path.write_text(
        "name: faults\n"
        "input: {path: tiles}\n"
        "output: {store: out.zarr, chunks: [32, 32], regions: true, vectors: true}\n"
        "blocks: {shape: [32, 32]}\n"
        "pipeline: [{op: gaussian, sigma: 1}, {op: otsu}, {op: label}]\n"
        f"cluster: {{address: '{dask_address}'}}\n"
    )
    return path


def _segflow(
    config: Path,
    api_url: str,
    *args: str,
    fault: str | None = None,
    wait: bool = True,
    once: Path | None = None,
) -> Any:
    env = {**os.environ, "PREFECT_API_URL": api_url, "COLUMNS": "200"}
    env.pop("SEGFLOW_FAULT", None)
    env.pop("SEGFLOW_FAULT_ONCE", None)
    if fault:
        env["SEGFLOW_FAULT"] = fault
    if once:
        env["SEGFLOW_FAULT_ONCE"] = str(once)
    command = [sys.executable, "-m", "segflow.flows", "run", str(config), *args]
    process = subprocess.Popen(
        command,
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if not wait:
        return process
    output, _ = process.communicate(timeout=240)
    return process.returncode, output


def _outputs(store: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Each done item's labels and region row count; asserts done items have their data."""
    frame = read_index(str(store))
    found = {}
    for item_id in frame.loc[frame["status"] == "done", "id"]:
        labels = zarr.open_array(str(store), path=f"{item_id}/labels", mode="r")[:]
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(store / item_id / "regions.parquet").metadata.num_rows
        assert rows == labels.max(), item_id
        polygons = pq.ParquetFile(store / item_id / "vectors.parquet").metadata.num_rows
        assert polygons == rows, item_id
        found[item_id] = (labels, rows)
    return found


@pytest.fixture(scope="module")
def clean_outputs() -> dict[str, Any]:
    """The outputs of the first complete run (every case makes the same images), which
    every recovered store must equal."""
    return {}


def _assert_complete(store: Path, reference: dict[str, Any]) -> None:
    outputs = _outputs(store)
    assert sorted(outputs) == [f"t{i}" for i in range(N_ITEMS)]
    for item_id, (labels, rows) in outputs.items():
        assert read_commit(str(store), item_id) is not None
        if item_id in reference:
            np.testing.assert_array_equal(labels, reference[item_id][0])
            assert rows == reference[item_id][1]
        else:
            reference[item_id] = (labels, rows)


@pytest.mark.parametrize(
    ("fault", "overwrite"),
    [
        ("block-done@5", False),  # during the blocks of the first item
        ("item-staged", True),  # data written and checked, not yet swapped in
        ("item-swap@2", True),  # between the two renames of the second item's swap
        ("item-committed", False),  # swapped in, not yet recorded
        ("record-written@2", True),
        ("regions-joined@2", True),  # the second item's region table written, not committed
        ("vectors-joined@2", True),  # the same for its vector table
        ("index-compact", False),  # index.parquet parts written, records not yet removed
    ],
)
def test_a_killed_run_never_leaves_done_without_data_and_a_rerun_completes(
    config: Path, api_url: str, clean_outputs: dict[str, Any], fault: str, overwrite: bool
) -> None:
    store = config.parent / "out.zarr"
    if overwrite:  # an overwrite run over a complete store
        code, output = _segflow(config, api_url)
        assert code == 0, output
        _assert_complete(store, clean_outputs)
    extra = ["--set", "output.overwrite=true"] if overwrite else []

    code, output = _segflow(config, api_url, *extra, fault=fault)

    assert code == -signal.SIGKILL, output
    _outputs(store)  # whatever the index says done has its data
    code, output = _segflow(config, api_url)
    assert code == 0, output
    _assert_complete(store, clean_outputs)
    # The killed run's flow run was ended Crashed by the run that took over its store.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        running = [r.name for r in client.read_flow_runs() if r.state and r.state.is_running()]
    assert running == [], output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_within_seconds_and_keeps_the_previous_results(
    config: Path, api_url: str, clean_outputs: dict[str, Any], signum: int
) -> None:
    store = config.parent / "out.zarr"
    code, output = _segflow(config, api_url)
    assert code == 0, output
    process = _segflow(config, api_url, "--set", "output.overwrite=true", wait=False)
    deadline = time.monotonic() + 120
    while not (store / ".segflow" / "lock.json").exists():  # the run has started writing
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signum)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=60)

    assert time.monotonic() - sent < 15, output
    assert process.returncode == 128 + signum, output
    name = signal.Signals(signum).name
    assert f"segflow: stopped ({name}); committed items are kept" in output
    assert "Traceback" not in output
    _assert_complete(store, clean_outputs)
    assert not (store / ".segflow" / "lock.json").exists()


def test_a_second_run_on_the_same_store_waits_its_turn(config: Path, api_url: str) -> None:
    # The first writer is another live process holding the store's lock (as a run does
    # from its first write to its end); a real run on these tiny items ends too fast to
    # be caught reliably. Held past run.queue_timeout: refused, nothing written; released
    # while the second run waits: it goes on.
    store = config.parent / "out.zarr"
    with lock_held_elsewhere(store, "nightly"):
        code, output = _segflow(config, api_url, "--set", "run.queue_timeout=2")

    assert code == 1, output
    assert "gave up after 2 s: store" in output
    assert "is in use by another segflow run (run nightly of" in output
    assert not (store / "t0").exists()  # nothing was written

    with lock_held_elsewhere(store, "nightly"):
        process = _segflow(config, api_url, wait=False)
        first = process.stdout.readline()  # the command's first line: it waits
    output, _ = process.communicate(timeout=240)  # the holder is gone: it goes on
    output = first + output
    assert process.returncode == 0, output
    assert "waiting (at most 43200 s, run.queue_timeout): store" in first
    assert "is free after" in output
    assert (store / "t0").exists()


def _big_config(tmp_path: Path, n_items: int = 2, side: int = 768) -> Path:
    """A collection that takes seconds per item on the command's own local cluster."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(n_items):
        image = (rng.random((1, side, side)) * 255).astype(np.uint8)
        write_geotiff(folder / f"b{i}.tif", image, x0=500_000.0 + 20_000 * i)
    path = tmp_path / "big.yaml"
    path.write_text(
        "name: big\n"
        "input: {path: big}\n"
        "output: {store: big.zarr, chunks: [64, 64]}\n"
        "blocks: {shape: [64, 64]}\n"
        "pipeline: [{op: gaussian, sigma: 3}, {op: otsu}, {op: label}]\n"
        "cluster: {n_workers: 2}\n"
    )
    return path


def test_a_dask_worker_killed_mid_item_never_leaves_done_without_data(
    tmp_path: Path, api_url: str
) -> None:
    config = _big_config(tmp_path, side=512)
    store = tmp_path / "big.zarr"

    # The first worker process to reach its 20th block write is killed (SIGKILL).
    once = tmp_path / "killed-once"
    code, output = _segflow(config, api_url, fault="block-write@20", once=once)

    assert once.exists(), output  # a worker was killed
    assert code in (0, 1), output  # its blocks rerun on the restarted worker, or the item fails
    frame = read_index(str(store))
    for item_id in frame.loc[frame["status"] == "done", "id"]:
        assert read_commit(str(store), item_id) is not None
        zarr.open_array(str(store), path=f"{item_id}/labels", mode="r")[:]
    code, output = _segflow(config, api_url)
    assert code == 0, output
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "big").symlink_to(tmp_path / "big")
    (clean / "big.yaml").write_text(config.read_text())
    assert _segflow(clean / "big.yaml", api_url)[0] == 0
    for item_id in ("b0", "b1"):
        np.testing.assert_array_equal(
            zarr.open_array(str(store), path=f"{item_id}/labels", mode="r")[:],
            zarr.open_array(str(clean / "big.zarr"), path=f"{item_id}/labels", mode="r")[:],
        )


def test_a_prefect_server_that_goes_away_stops_the_run_within_30_s(tmp_path: Path) -> None:
    import httpx
    import prefect

    config = _big_config(tmp_path, n_items=4, side=1024)
    store = tmp_path / "big.zarr"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
        process = _segflow(config, url, wait=False)
        while not (store / ".segflow" / "lock.json").exists():
            assert time.monotonic() < deadline + 60 and process.poll() is None
            time.sleep(0.05)
        server.kill()
        server.wait()
        killed = time.monotonic()
        output, _ = process.communicate(timeout=90)
    finally:
        server.kill()
        server.wait()

    assert time.monotonic() - killed < 30, output
    assert process.returncode == 1, output
    assert "stopped answering" in output
    frame = read_index(str(store))  # what finished is recorded and complete
    for item_id in frame.loc[frame["status"] == "done", "id"]:
        assert read_commit(str(store), item_id) is not None
    assert not (store / ".segflow" / "lock.json").exists() or _lock_pid_dead(store)


def _lock_pid_dead(store: Path) -> bool:
    import json

    pid = json.loads((store / ".segflow" / "lock.json").read_text())["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_run_killed_halfway_through_an_item_resumes_from_its_written_blocks(
    tmp_path: Path, api_url: str
) -> None:
    config = _big_config(tmp_path, n_items=1, side=512)  # 64 blocks of 64^2
    store = tmp_path / "big.zarr"

    code, output = _segflow(config, api_url, fault="output-block-done@32")
    assert code == -signal.SIGKILL, output
    code, output = _segflow(config, api_url)

    assert code == 0, output
    row = read_index(str(store)).set_index("id").loc["b0"]
    redone = int(row["n_blocks"]) - int(row["n_resumed"])
    assert int(row["n_blocks"]) == 64 and redone < 0.6 * 64, (redone, output)
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "big").symlink_to(tmp_path / "big")
    (clean / "big.yaml").write_text(config.read_text())
    assert _segflow(clean / "big.yaml", api_url)[0] == 0
    np.testing.assert_array_equal(
        zarr.open_array(str(store), path="b0/labels", mode="r")[:],
        zarr.open_array(str(clean / "big.zarr"), path="b0/labels", mode="r")[:],
    )

"""`segflow run` from s3:// to s3:// against a real local S3 server (moto's server mode).

The server is a separate process on 127.0.0.1 speaking the S3 HTTP API; segflow reaches it
through fsspec/s3fs (and GDAL through fsspec) exactly as it would reach AWS, given the
endpoint in ``AWS_ENDPOINT_URL``. The run's store must hold what the same run writes to a
local folder, and a second run must find nothing to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import zarr
from affine import Affine

from segflow.store.index import read_index
from segflow.store.regions import read_regions

pytest.importorskip("moto", reason="moto[server] is a dev dependency (the local S3 server)")
s3fs = pytest.importorskip("s3fs", reason="s3fs is a dev dependency (s3:// through fsspec)")

ROOT = Path(__file__).resolve().parents[2]


def _write_tiles(folder: Path) -> None:
    """Two one-band uint16 GeoTIFFs in UTM 33N (not the bundled RGB sample's layout)."""
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True)
    for i in range(2):
        field = rng.normal(1000, 200, size=(150, 170))
        field[40:80, 30 + 20 * i : 90 + 20 * i] += 2500  # a bright field per tile
        profile = {
            "driver": "GTiff", "width": 170, "height": 150, "count": 1, "dtype": "uint16",
            "crs": "EPSG:32633",
            "transform": Affine(2.5, 0, 400_000 + 3_000 * i, 0, -3.0, 5_600_000),
            "tiled": True, "blockxsize": 64, "blockysize": 64,
        }  # fmt: skip
        with rasterio.open(folder / f"tile{i}.tif", "w", **profile) as out:
            out.write(np.clip(field, 0, 65535).astype(np.uint16)[np.newaxis])


@pytest.fixture(scope="module")
def api_url(prefect_harness: None) -> str:
    """The session's Prefect test server: the runs here test S3, not starting a server
    (tests/flows/test_server.py does that)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _run(config: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    full = {**os.environ, **env, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "segflow.flows", "run", str(config), *args],
        cwd=config.parent,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


def _contents(store: str) -> dict[str, Any]:
    """What a store holds: every item's labels, region table and index row."""
    index = read_index(store)
    found: dict[str, Any] = {"index": index[["id", "status", "object_count"]].to_dict("records")}
    for item in index["id"]:
        labels = zarr.open_array(store, path=f"{item}/labels", mode="r")[:]
        found[item] = (labels, read_regions(store, item))
    return found


def test_s3_input_and_store_give_the_local_run_and_rerun_nothing(
    tmp_path: Path, s3_env: dict[str, str], api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env.items():  # this process reads the store as the runs do
        monkeypatch.setenv(key, value)
    s3_env = {**s3_env, "PREFECT_API_URL": api_url}
    tiles = tmp_path / "tiles"
    _write_tiles(tiles)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("segflow-in")
    fs.mkdir("segflow-out")
    fs.put(str(tiles) + "/", "segflow-in/tiles/", recursive=True)
    config = tmp_path / "tiles.yaml"
    config.write_text(
        "name: tiles\n"
        "input: {path: tiles}\n"
        "output: {store: local.zarr, chunks: [64, 64], regions: true}\n"
        "blocks: {shape: [64, 64]}\n"
        "pipeline: [{op: gaussian, sigma: 1.5}, {op: otsu}, {op: binary_opening, radius: 1},\n"
        "           {op: label}]\n"
    )

    code, output = _run(config, s3_env)
    assert code == 0, output
    remote = ["--set", "input.path=s3://segflow-in/tiles"]
    remote += ["--set", "output.store=s3://segflow-out/tiles.zarr"]
    code, output = _run(config, s3_env, *remote)
    assert code == 0, output
    assert "tiles: 2 done" in output, output

    local = _contents(str(tmp_path / "local.zarr"))
    on_s3 = _contents("s3://segflow-out/tiles.zarr")
    assert (
        local["index"] == on_s3["index"] and [r["status"] for r in local["index"]] == ["done"] * 2
    )
    for item in ("tile0", "tile1"):
        np.testing.assert_array_equal(on_s3[item][0], local[item][0])
        assert on_s3[item][0].max() > 0
        pd.testing.assert_frame_equal(on_s3[item][1], local[item][1])
    assert not fs.exists("segflow-out/tiles.zarr/.segflow/lock.json")  # released
    # The STAC view on S3: the local run's Items and spatial extent.
    stac = "segflow-out/tiles.zarr/stac"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{stac}/items")) == [
        "tile0.json",
        "tile1.json",
    ]
    local_collection = json.loads((tmp_path / "local.zarr/stac/collection.json").read_text())
    collection = json.loads(fs.cat(f"{stac}/collection.json"))
    assert collection["extent"]["spatial"] == local_collection["extent"]["spatial"]

    code, output = _run(config, s3_env, *remote)  # incremental: nothing changed
    assert code == 0, output
    assert "nothing to do" in output, output

    fs.put(str(tiles / "tile0.tif"), "segflow-in/tiles/tile2.tif")  # a new tile arrives
    code, output = _run(config, s3_env, *remote)
    assert code == 0, output
    assert "tiles: 1 done, 2 skipped" in output, output
    fs.invalidate_cache()  # s3fs answers from its listing of stac/items above otherwise
    assert fs.exists(f"{stac}/items/tile2.json")
    # Each run's commits are journalled on S3 too: the two runs that committed, in order.
    from segflow.store.versions import read_history

    runs = read_history("s3://segflow-out/tiles.zarr")
    assert [r["items"] for r in runs] == [2, 1] and all(r["run_name"] for r in runs), runs


def _race(locks: list[Any]) -> list[str]:
    """Acquire ``locks`` from threads released together: "held", or the refusal's line."""
    import threading

    from segflow.store.lock import StoreLockedError

    start, outcomes = threading.Barrier(len(locks)), [""] * len(locks)

    def take(k: int) -> None:
        start.wait()
        try:
            locks[k].acquire()
            outcomes[k] = "held"
        except StoreLockedError as error:
            outcomes[k] = str(error)

    threads = [threading.Thread(target=take, args=(k,)) for k in range(len(locks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_two_writers_starting_at_once_on_s3_one_holds_the_store_the_other_is_told(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from segflow.store.lock import StoreLock, read_lock

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("segflow-race")
    store = "s3://segflow-race/out.zarr"
    for attempt in range(5):  # each round: two runs start together; one wins, one is told
        locks = [StoreLock(store, run_id=f"run-{attempt}-{k}") for k in range(2)]
        outcomes = _race(locks)
        winner = outcomes.index("held")
        refused = outcomes[1 - winner]
        assert refused.startswith(f"store '{store}' is in use by another segflow run (run ")
        assert f"run run-{attempt}-{winner} of" in refused and "\n" not in refused
        assert read_lock(store)["run_id"] == f"run-{attempt}-{winner}"  # type: ignore[index]
        locks[winner].release()


def test_a_stale_lock_on_s3_is_broken_by_one_of_two_runs(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from segflow.store.lock import StoreLock, read_lock

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("segflow-stale")
    store = "s3://segflow-stale/out.zarr"
    dead = {"run_id": "dead", "host": "elsewhere", "pid": 1, "token": "t"}
    dead["heartbeat"] = "2000-01-01T00:00:00+00:00"
    fs.pipe_file("segflow-stale/out.zarr/.segflow/lock.json", json.dumps(dead).encode())
    locks = [StoreLock(store, run_id=f"run-{k}") for k in range(2)]

    outcomes = _race(locks)

    assert sorted(o == "held" for o in outcomes) == [False, True], outcomes
    winner = outcomes.index("held")
    assert "is in use by another segflow run (run run-" in outcomes[1 - winner]
    assert locks[winner].broken is not None and locks[winner].broken["run_id"] == "dead"
    assert read_lock(store)["run_id"] == f"run-{winner}"  # type: ignore[index]
    locks[winner].release()


def test_a_heartbeat_on_s3_never_overwrites_the_lock_of_the_run_that_took_over(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also when the takeover lands between the beat's read and its write: the write is
    conditional on the ETag read (If-Match), so it fails and the next beat stops."""
    import json

    from segflow.store import lock as locks
    from segflow.store.lock import StoreLock, lock_lost, read_lock

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("segflow-beat")
    store = "s3://segflow-beat/out.zarr"
    taker = {"run_id": "taker", "owner": "o", "host": "elsewhere", "pid": 1,
             "heartbeat": "2999-01-01T00:00:00+00:00", "token": "takers"}  # fmt: skip
    parse = locks._parse_lock
    reads: list[int] = []

    def read_then_taken_over(raw: bytes) -> dict[str, Any]:
        reads.append(1)
        if len(reads) == 2:  # the second beat: taken over right after its read
            fs.pipe_file("segflow-beat/out.zarr/.segflow/lock.json", json.dumps(taker).encode())
        return parse(raw)

    monkeypatch.setattr(locks, "_parse_lock", read_then_taken_over)
    lock = StoreLock(store, run_id="stalled", heartbeat_every=0.05)
    lock.acquire()
    for _ in range(200):
        if lock_lost(store) is not None:
            break
        time.sleep(0.05)
    lock.release()

    assert len(reads) >= 3, reads  # a beat refreshed it, one was refused, one saw the taker
    assert read_lock(store) == taker
    assert "this run's lock was taken over (run taker of o@elsewhere" in str(lock_lost(store))


def test_a_run_without_the_plain_copy_on_s3_prints_an_open_line_that_opens(
    tmp_path: Path, s3_env: dict[str, str], api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex

    import segflow

    for key, value in s3_env.items():  # this process reads the store as the runs do
        monkeypatch.setenv(key, value)
    s3_env = {**s3_env, "PREFECT_API_URL": api_url}
    tiles = tmp_path / "tiles"
    _write_tiles(tiles)
    (tiles / "tile1.tif").unlink()  # one item is enough
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("segflow-plain")
    store = "s3://segflow-plain/tiles.zarr"
    config = tmp_path / "tiles.yaml"
    config.write_text(
        "name: tiles\n"
        "input: {path: tiles}\n"
        f"output: {{store: {store}, chunks: [64, 64], ome: false, plain_copy: false}}\n"
        "blocks: {shape: [64, 64]}\n"
        "pipeline: [{op: otsu}, {op: label}]\n"
    )

    code, output = _run(config, s3_env)
    assert code == 0 and "tiles: 1 done" in output, output
    assert not fs.exists("segflow-plain/tiles.zarr/tile0")  # stored once, in its version
    (line,) = [s.split("open:", 1)[1] for s in output.splitlines() if "open:" in s]
    opener = f"segflow.open_store({store!r})['tile0']"
    assert line.strip() == f'{sys.executable} -c "import segflow; print({opener})"'
    shown = subprocess.run(
        shlex.split(line), env={**os.environ, **s3_env}, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "labels" in shown.stdout, shown.stderr
    labels = segflow.open_store(store)["tile0"]["labels"].values
    assert labels.max() > 0
    # Switching the setting back (the copies made again under the lock, the next run with
    # nothing to do) is tested on the engine in tests/engine/test_versions_s3.py.

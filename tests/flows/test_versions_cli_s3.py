"""A store's versions through the command on an object store (moto's S3 server):
history, tag, prune (--dry-run) and export --as-of."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import segflow
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.flows.cli import app
from segflow.io import ArrayReader
from segflow.store.versions import current_version, list_versions, version_path

s3fs = pytest.importorskip("s3fs", reason="s3fs is a dev dependency (s3:// through fsspec)")
rasterio = pytest.importorskip("rasterio", reason="rasterio writes the COG exports")
runner = CliRunner()


@pytest.fixture
def store(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's moto server, with two versions of the item ``tile``
    (runs ``run-a`` "brave-otter", then ``run-b`` "calm-heron", another threshold)."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"segflow-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/out.zarr"
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    for threshold, run_id, name in ((0.5, "run-a", "brave-otter"), (0.8, "run-b", "calm-heron")):
        pipeline = [{"op": "threshold", "value": threshold}, {"op": "label"}]
        with LocalExecutor(1) as executor:
            result = segment_item(ArrayReader(image, "tile"), pipeline, store=url,
                                  block_shape=32, executor=executor, run_id=run_id,
                                  run_name=name, ome=False)  # fmt: skip
        assert result.status == "done", result.error
    return url


def _invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output)
    return result


def _exists(url: str) -> bool:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return bool(fs.exists(url.removeprefix("s3://")))


def test_history_tag_prune_and_export_as_of_work_on_an_s3_store(store: str, tmp_path: Path) -> None:
    first, second = list_versions(store, "tile")
    before = segflow.open_store(store, as_of="run-a")["tile"]["labels"].values
    latest = segflow.open_store(store)["tile"]["labels"].values
    assert not np.array_equal(before, latest)

    runs = _invoke("history", store).stdout.splitlines()
    assert len(runs) == 2, runs
    assert "run run-a (brave-otter)  1 item(s)" in runs[0]
    assert "run run-b (calm-heron)  1 item(s)" in runs[1]
    versions = _invoke("history", store, "tile").stdout.splitlines()
    assert [line.split()[0] for line in versions] == [first, second]
    assert "run run-a brave-otter" in versions[0] and versions[1].endswith("(latest)")
    assert not versions[0].endswith("(latest)")

    tagged = _invoke("tag", store, "night-1", "--as-of", "run-a").stdout.strip()
    assert tagged == f"tag night-1: {first.split('-')[0]}"  # run-a's commit time
    assert _invoke("history", store).stdout.splitlines()[-1] == tagged

    cog = ["export", store, "--format", "cog", "--array", "labels"]
    old, new = tmp_path / "old.tif", tmp_path / "new.tif"
    said = _invoke(*cog, "--out", str(old), "--as-of", "night-1").stdout
    assert said.startswith(f"tile labels -> {old} (50 x 40")
    _invoke(*cog, "--out", str(new))
    with rasterio.open(old) as then, rasterio.open(new) as now:
        np.testing.assert_array_equal(then.read(1), before)  # bit for bit
        np.testing.assert_array_equal(now.read(1), latest)

    policy = ("--keep-last", "1", "--keep-days", "0")
    kept = _invoke("prune", store, *policy, "--dry-run").stdout.splitlines()
    assert kept == [f"{store}: 0 old version(s) to remove (keep_last 1, keep_days 0, "
                    "keep_tags true)"]  # fmt: skip
    dry = _invoke("prune", store, *policy, "--no-keep-tags", "--dry-run").stdout.splitlines()
    assert dry[0] == f"would remove tile {first}" and "1 old version(s) to remove" in dry[1]
    assert list_versions(store, "tile") == [first, second]
    assert _exists(f"{version_path(store, 'tile', first)}/zarr.json")

    # The tag keeps the first version through a prune that would otherwise remove it.
    assert "0 old version(s) removed" in _invoke("prune", store, *policy).stdout
    assert list_versions(store, "tile") == [first, second]
    _invoke(*cog, "--out", str(old), "--as-of", "night-1")
    with rasterio.open(old) as then:
        np.testing.assert_array_equal(then.read(1), before)

    done = _invoke("prune", store, *policy, "--no-keep-tags").stdout.splitlines()
    assert done[0] == f"remove tile {first}" and "1 old version(s) removed" in done[1]
    assert list_versions(store, "tile") == [second] and current_version(store, "tile") == second
    assert not _exists(version_path(store, "tile", first))
    np.testing.assert_array_equal(segflow.open_store(store)["tile"]["labels"].values, latest)
    missing = runner.invoke(app, [*cog, "--out", str(old), "--as-of", "night-1"])
    assert missing.exit_code == 2, missing.output
    assert "kept no version of any item committed by" in missing.output

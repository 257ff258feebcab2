"""Item versions: snapshot reads, time travel, history, tags, retention, older stores."""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

import segflow
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader
from segflow.store.commit import prepare_store, read_commit
from segflow.store.versions import (
    Retention,
    current_version,
    list_versions,
    plan_prune,
    prune_versions,
    read_history,
    read_tags,
    tag_store,
)

PIPELINE = [{"op": "threshold", "value": 0.5}, {"op": "label"}]


def _image(seed: int, density: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((40, 50)) > density).astype(np.float32)


def _segment(store: str, image: np.ndarray, run_id: str, item: str = "tile", **kw: Any) -> Any:
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, item),
            PIPELINE,
            store=store,
            block_shape=16,
            executor=executor,
            run_id=run_id,
            **kw,
        )
    assert result.status == "done", result.error
    return result


def test_an_open_item_keeps_its_version_across_an_overwrite_and_a_reopen_sees_the_new(
    tmp_path: pathlib.Path,
) -> None:
    store = str(tmp_path / "out.zarr")
    _segment(store, _image(0), "night-1")
    opened = segflow.open_store(store)["tile"]
    first = opened["labels"].values
    # The next night's result has other labels and another shape: read under the old
    # metadata, its chunks would decode as garbage.
    big = np.zeros((60, 70), np.float32)
    big[::2, ::2] = 1  # 1,050 separate objects
    _segment(store, big, "night-2")

    np.testing.assert_array_equal(opened["labels"].values, first)  # the same version
    again = segflow.open_store(store)["tile"]
    assert again["labels"].shape == (60, 70) and int(again["labels"].max()) == 1050
    # The documented plain way opens the latest version too.
    plain = xr.open_zarr(f"{store}/tile")
    np.testing.assert_array_equal(plain["labels"].values, again["labels"].values)


def test_as_of_reads_a_result_from_before_a_rerun_bit_for_bit(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "out.zarr")
    _segment(store, _image(0), "run-a", run_name="brave-otter")
    _segment(store, _image(0), "run-a", item="other", run_name="brave-otter")
    before = zarr.open_array(store, path="tile/labels", mode="r")[:]
    between = dt.datetime.now(dt.UTC)
    tag_store(store, "before-rerun")
    _segment(store, _image(1), "run-b", run_name="calm-heron")
    after = zarr.open_array(store, path="tile/labels", mode="r")[:]
    assert not np.array_equal(before, after)

    for as_of in ("run-a", "brave-otter", "before-rerun", between, between.isoformat()):
        old = segflow.open_store(store, as_of=as_of)
        assert sorted(old) == ["other", "tile"]
        np.testing.assert_array_equal(old["tile"]["labels"].values, before)
        assert old["tile"]["labels"].dtype == before.dtype
    latest = segflow.open_store(store, as_of="run-b")["tile"]["labels"].values
    np.testing.assert_array_equal(latest, after)
    early = segflow.open_store(store, as_of=dt.datetime(2000, 1, 1))
    assert list(early) == []
    with pytest.raises(KeyError, match="kept no version of item 'tile'"):
        early["tile"]
    with pytest.raises(ValueError, match="as_of 'nope': not a tag, run id, run name or ISO"):
        segflow.open_store(store, as_of="nope")


def test_history_lists_the_runs_with_their_ids_and_each_version_of_an_item(
    tmp_path: pathlib.Path,
) -> None:
    store = str(tmp_path / "out.zarr")
    _segment(store, _image(0), "run-a", run_name="brave-otter", config_hash="h1")
    _segment(store, _image(0), "run-a", item="other", run_name="brave-otter", config_hash="h1")
    _segment(store, _image(1), "run-b", run_name="calm-heron", config_hash="h2")

    runs = read_history(store)
    assert [(r["run_id"], r["run_name"], r["config_hash"], r["items"]) for r in runs] == [
        ("run-a", "brave-otter", "h1", 2),
        ("run-b", "calm-heron", "h2", 1),
    ]
    assert all(r["code_version"] and r["first"] <= r["last"] for r in runs)
    versions = read_history(store, "tile")
    assert [(v["run_id"], v["latest"]) for v in versions] == [("run-a", False), ("run-b", True)]
    assert versions[-1]["version"] == current_version(store, "tile")
    assert read_commit(store, "tile")["version"] == versions[-1]["version"]  # type: ignore[index]


def test_prune_keeps_the_latest_and_tagged_versions_and_removes_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    store = str(tmp_path / "out.zarr")
    for k in range(4):
        _segment(store, _image(k), f"run-{k}")
        if k == 1:
            tag_store(store, "keep-me")
    versions = list_versions(store, "tile")
    assert len(versions) == 4
    tagged = segflow.open_store(store, as_of="keep-me")["tile"]["labels"].values

    policy = Retention(keep_last=1, keep_days=0, keep_tags=True)
    plan = plan_prune(store, policy)
    assert plan == [("tile", versions[0]), ("tile", versions[2])]
    assert prune_versions(store, plan) == 2
    assert list_versions(store, "tile") == [versions[1], versions[3]]
    again = segflow.open_store(store, as_of="keep-me")["tile"]["labels"].values
    np.testing.assert_array_equal(again, tagged)
    # Young versions stay under keep_days; without tags only the latest is left.
    assert plan_prune(store, Retention(keep_last=1, keep_days=1)) == []
    assert plan_prune(store, Retention(keep_last=1, keep_days=0, keep_tags=False)) == [
        ("tile", versions[1])
    ]
    assert set(read_tags(store)) == {"keep-me"}
    with pytest.raises(ValueError, match=r"tag 'keep-me' names a state of .* already"):
        tag_store(store, "keep-me")


def test_an_older_stores_item_folder_becomes_a_version_at_its_next_commit(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    _segment(str(store), _image(0), "run-old")
    before = zarr.open_array(str(store), path="tile/labels", mode="r")[:]
    # What an earlier segflow left: the item a folder at STORE/ITEM, no versions.
    target = os.path.realpath(store / "tile")
    (store / "tile").unlink()
    shutil.move(target, store / "tile")
    shutil.rmtree(store / ".segflow" / "versions")
    foreign = store / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not segflow's")
    assert segflow.open_store(str(store), as_of=dt.datetime.now(dt.UTC))["tile"] is not None

    _segment(str(store), _image(1), "run-new")

    assert (store / "tile").is_symlink()
    old, new = list_versions(str(store), "tile")
    assert current_version(str(store), "tile") == new and old < new
    np.testing.assert_array_equal(
        segflow.open_store(str(store), as_of="run-old")["tile"]["labels"].values, before
    )
    assert (foreign / "mine.txt").read_text() == "not segflow's"  # never touched
    with LocalExecutor(1) as executor:
        refused = segment_item(
            ArrayReader(_image(1), "notes"), PIPELINE, store=str(store), block_shape=16,
            executor=executor,
        )  # fmt: skip
    assert refused.status == "failed"
    assert f"item 'notes': '{foreign}' exists and is not a segflow item group" in str(refused.error)
    assert (foreign / "mine.txt").exists()


def test_a_commit_killed_between_its_version_and_its_link_is_completed_by_the_next_run(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    _segment(str(store), _image(0), "run-a")
    first = current_version(str(store), "tile")
    script = (
        "import numpy as np\n"
        "from segflow.engine.executor import LocalExecutor\n"
        "from segflow.engine.item import segment_item\n"
        "from segflow.io import ArrayReader\n"
        "image = (np.random.default_rng(1).random((40, 50)) > 0.7).astype(np.float32)\n"
        "with LocalExecutor(1) as executor:\n"
        f"    segment_item(ArrayReader(image, 'tile'), {PIPELINE!r}, store={str(store)!r},\n"
        "        block_shape=16, executor=executor, run_id='run-b')\n"
    )
    env = {**os.environ, "SEGFLOW_FAULT": "item-swap"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert killed.returncode == -9
    assert current_version(str(store), "tile") == first  # readers still see the old one
    assert len(list_versions(str(store), "tile")) == 2

    prepare_store(str(store))

    assert current_version(str(store), "tile") == list_versions(str(store), "tile")[-1] != first
    assert not os.listdir(store / ".segflow" / "links")


def _files(folder: str) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (size, modification time in ns)."""
    return {
        os.path.relpath(os.path.join(parent, name), folder): (
            os.stat(os.path.join(parent, name)).st_size,
            os.stat(os.path.join(parent, name)).st_mtime_ns,
        )
        for parent, _, names in os.walk(folder)
        for name in names
    }


def test_consolidating_or_migrating_a_store_never_writes_a_committed_version(
    tmp_path: pathlib.Path,
) -> None:
    from segflow.store.layout import consolidate_store
    from segflow.store.metadata import migrate_store

    store = str(tmp_path / "out.zarr")
    result = _segment(store, _image(1), "run-1", quicklook=24)
    version = os.path.realpath(os.path.join(store, "tile"))
    before = _files(version)
    assert "quicklook.png" in before and result.warning is None  # drawn before the commit

    consolidate_store(store)
    migrate_store(store, ["tile"])

    assert _files(version) == before

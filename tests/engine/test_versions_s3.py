"""Item versions on an object store (moto's S3 server): snapshot reads, time travel,
retention, an older store's in-place item, two writers, a commit cut before its pointer."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

import segflow
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader
from segflow.store.commit import commit_item, prepare_store, read_commit
from segflow.store.lock import bookkeeping_path
from segflow.store.pointers import (
    PLAIN_COPY_FILE,
    ItemConflictError,
    copy_tree,
    plain_copy_changes,
    plain_copy_wanted,
    pointer_url,
    read_pointer,
    version_url,
)
from segflow.store.versions import (
    Retention,
    current_version,
    list_versions,
    plan_prune,
    prune_versions,
    read_history,
    resolve_item,
    tag_store,
)

s3fs = pytest.importorskip("s3fs", reason="s3fs is a dev dependency (s3:// through fsspec)")


def _pipeline(threshold: float) -> list[dict[str, Any]]:
    return [{"op": "threshold", "value": threshold}, {"op": "label"}]


def _image(shape: tuple[int, int] = (40, 50)) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(np.float32)


@pytest.fixture
def store(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's moto server; this process reads it as runs do."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"segflow-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/out.zarr"


def _segment(store: str, threshold: float, run_id: str, **kw: Any) -> Any:
    """Commit the item ``tile`` (without the OME view unless asked: each S3 request
    costs, and one test with nested groups is enough)."""
    image = kw.pop("image", None)
    with LocalExecutor(1) as executor:
        result = segment_item(
            ArrayReader(_image() if image is None else image, "tile"),
            _pipeline(threshold),
            store=store,
            block_shape=kw.pop("block_shape", 32),
            executor=executor,
            run_id=run_id,
            ome=kw.pop("ome", False),
            **kw,
        )
    assert result.status == "done", result.error
    return result


def _fs() -> Any:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_an_open_item_on_s3_keeps_its_version_across_an_overwrite_and_a_reopen_sees_the_new(
    store: str,
) -> None:
    _segment(store, 0.5, "night-1", ome=True)
    opened = segflow.open_store(store)["tile"]  # lazy: no chunk read yet
    first = segflow.open_store(store)["tile"]["labels"].values
    # The next night's result: another threshold, more objects, another label dtype
    # (read under the old metadata its chunks would decode as garbage).
    _segment(store, 0.97, "night-2", image=_image((60, 70)), ome=True)

    # Every chunk of the Dataset opened before the commit is read after it: the old ones.
    np.testing.assert_array_equal(opened["labels"].values, first)
    again = segflow.open_store(store)["tile"]["labels"]
    assert again.shape == (60, 70) and not np.array_equal(again.values[:40, :50], first)
    # The plain copy at STORE/ITEM is the new version too, with no chunk of the old left.
    plain = xr.open_zarr(f"{store}/tile")
    np.testing.assert_array_equal(plain["labels"].values, again.values)
    version = resolve_item(store, "tile").rsplit("/", 1)[1]
    fs = _fs()
    bare = store.removeprefix("s3://")
    copied = {k.removeprefix(f"{bare}/tile/") for k in fs.find(f"{bare}/tile")}
    kept = f"{bare}/.segflow/versions/tile/{version}/"
    assert copied == {k.removeprefix(kept) for k in fs.find(kept)}


def test_as_of_and_history_on_s3_read_the_result_from_before_a_rerun_bit_for_bit(
    store: str,
) -> None:
    _segment(store, 0.5, "run-a", run_name="brave-otter")
    before = segflow.open_store(store)["tile"]["labels"].values
    between = dt.datetime.now(dt.UTC)
    _segment(store, 0.8, "run-b", run_name="calm-heron")
    after = segflow.open_store(store)["tile"]["labels"].values
    assert not np.array_equal(before, after)

    for as_of in ("run-a", "brave-otter", between):
        old = segflow.open_store(store, as_of=as_of)
        assert list(old) == ["tile"]
        np.testing.assert_array_equal(old["tile"]["labels"].values, before)
    np.testing.assert_array_equal(
        segflow.open_store(store, as_of="run-b")["tile"]["labels"].values, after
    )
    versions = read_history(store, "tile")
    assert [(v["run_id"], v["latest"]) for v in versions] == [("run-a", False), ("run-b", True)]
    assert versions[-1]["version"] == current_version(store, "tile")
    assert read_commit(store, "tile")["version"] == versions[-1]["version"]  # type: ignore[index]


def test_prune_on_s3_keeps_the_latest_and_tagged_versions_and_removes_the_rest(
    store: str,
) -> None:
    for k in range(3):
        _segment(store, 0.5 + 0.1 * k, f"run-{k}")
        if k == 0:
            tag_store(store, "keep-me")
    versions = list_versions(store, "tile")
    assert len(versions) == 3
    tagged = segflow.open_store(store, as_of="keep-me")["tile"]["labels"].values

    plan = plan_prune(store, Retention(keep_last=1, keep_days=0, keep_tags=True))
    assert plan == [("tile", versions[1])]
    assert prune_versions(store, plan) == 1

    assert list_versions(store, "tile") == [versions[0], versions[2]]
    left = _fs().ls(f"{store.removeprefix('s3://')}/.segflow/versions/tile", detail=False)
    assert sorted(p.rsplit("/", 1)[1] for p in left) == sorted(["LATEST", *versions[::2]])
    again = segflow.open_store(store, as_of="keep-me")["tile"]["labels"].values
    np.testing.assert_array_equal(again, tagged)
    assert current_version(store, "tile") == versions[2]


def _make_legacy(store: str) -> None:
    """What a segflow before object-store versions left: the item written in place at
    STORE/ITEM with its commit record, no pointer, no versions."""
    fs, bare = _fs(), store.removeprefix("s3://")
    fs.rm(f"{bare}/.segflow/versions", recursive=True)


def test_an_s3_item_written_in_place_still_opens_and_becomes_a_version_at_its_next_commit(
    store: str,
) -> None:
    _segment(store, 0.5, "run-old")
    _make_legacy(store)
    assert resolve_item(store, "tile") == f"{store}/tile" and read_pointer(store, "tile") is None
    before = segflow.open_store(store)["tile"]["labels"].values
    now = dt.datetime.now(dt.UTC)
    np.testing.assert_array_equal(
        segflow.open_store(store, as_of=now)["tile"]["labels"].values, before
    )

    _segment(store, 0.8, "run-new")

    old, new = list_versions(store, "tile")
    assert current_version(store, "tile") == new and old < new
    np.testing.assert_array_equal(
        segflow.open_store(store, as_of="run-old")["tile"]["labels"].values, before
    )
    latest = segflow.open_store(store)["tile"]["labels"].values
    assert not np.array_equal(latest, before)
    np.testing.assert_array_equal(xr.open_zarr(f"{store}/tile")["labels"].values, latest)


def _stage_copy(store: str, name: str) -> str:
    """A staged group of the item ``tile`` (a copy of its latest version), as a run leaves
    it before its commit; returns its staging root."""
    root = f"{store}/.segflow/staging/{name}"
    copy_tree(resolve_item(store, "tile"), f"{root}/tile")
    return root


def test_two_writers_on_s3_publishing_one_item_at_once_one_wins_the_other_is_told(
    store: str,
) -> None:
    _segment(store, 0.5, "run-0")
    parent = current_version(store, "tile")
    roots = [_stage_copy(store, f"w{k}") for k in range(2)]
    start, outcomes = threading.Barrier(2), [""] * 2

    def commit(k: int) -> None:
        record = {**read_commit(store, "tile"), "run_id": f"w{k}", "version": None}  # type: ignore[dict-item]
        start.wait()
        try:
            commit_item(store, roots[k], "tile", record, parent=parent)
            outcomes[k] = "published"
        except ItemConflictError as error:
            outcomes[k] = str(error)

    threads = [threading.Thread(target=commit, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(o == "published" for o in outcomes) == [False, True], outcomes
    winner = outcomes.index("published")
    told = outcomes[1 - winner]
    assert told.startswith("item 'tile': another run published version ") and "\n" not in told
    assert f"since this run began it from version {parent}" in told
    assert read_commit(store, "tile")["run_id"] == f"w{winner}"  # type: ignore[index]
    assert len(list_versions(store, "tile")) == 2  # the loser's version was removed
    fs = _fs()
    names = fs.ls(f"{store.removeprefix('s3://')}/.segflow/versions/tile", detail=False)
    assert len(names) == 3  # two versions and the pointer
    # A writer that began from the old version after the winner published is told too.
    late = {**read_commit(store, "tile"), "run_id": "late", "version": None}  # type: ignore[dict-item]
    with pytest.raises(ItemConflictError, match="another run published version"):
        commit_item(store, _stage_copy(store, "late"), "tile", late, parent=parent)


def test_an_s3_commit_killed_before_its_pointer_leaves_the_old_version_and_is_undone(
    store: str, s3_env: dict[str, str]
) -> None:
    _segment(store, 0.5, "run-a")
    first = current_version(store, "tile")
    before = segflow.open_store(store)["tile"]["labels"].values
    script = (
        "import numpy as np\n"
        "from segflow.engine.executor import LocalExecutor\n"
        "from segflow.engine.item import segment_item\n"
        "from segflow.io import ArrayReader\n"
        "image = np.random.default_rng(0).random((40, 50)).astype(np.float32)\n"
        "with LocalExecutor(1) as executor:\n"
        f"    segment_item(ArrayReader(image, 'tile'), {_pipeline(0.8)!r}, store={store!r},\n"
        "        block_shape=16, executor=executor, run_id='run-b')\n"
    )
    env = {**os.environ, **s3_env, "SEGFLOW_FAULT": "item-swap"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert killed.returncode == -9
    fs, bare = _fs(), store.removeprefix("s3://")
    kept = [p.rsplit("/", 1)[1] for p in fs.ls(f"{bare}/.segflow/versions/tile", detail=False)]
    assert len(kept) == 3  # the cut commit's version is there, complete, unnamed
    assert current_version(store, "tile") == first and list_versions(store, "tile") == [first]
    np.testing.assert_array_equal(segflow.open_store(store)["tile"]["labels"].values, before)

    prepare_store(store)

    fs.invalidate_cache()  # this client's listings are cached
    kept = [p.rsplit("/", 1)[1] for p in fs.ls(f"{bare}/.segflow/versions/tile", detail=False)]
    assert sorted(kept) == sorted(["LATEST", first])  # type: ignore[list-item]
    assert not fs.exists(f"{bare}/.segflow/publishing/tile")
    assert (
        json.loads(fs.cat_file(pointer_url(store, "tile").removeprefix("s3://")))["version"]
        == first
    )
    np.testing.assert_array_equal(zarr.open_array(store, path="tile/labels", mode="r")[:], before)


def _plain(store: str) -> list[str]:
    """The objects at ``STORE/tile`` (the plain copy), relative to it."""
    bare = f"{store.removeprefix('s3://')}/tile"
    return sorted(k.removeprefix(f"{bare}/") for k in _fs().find(bare))


def test_without_a_plain_copy_s3_items_are_stored_once_and_open_through_segflow(
    store: str,
) -> None:
    from segflow.engine.collection import open_line, plan_items
    from segflow.store.metadata import item_groups
    from segflow.tasks.store import writing_store

    _segment(store, 0.5, "run-old")
    _make_legacy(store)  # an in-place item, as a segflow before versions left it
    before = segflow.open_store(store)["tile"]["labels"].values
    plan = plan_items([], [], store, config_hash="h", overwrite=False, plain_copy=False)
    assert plan.plain_copy_changes and not plan.nothing_to_do  # a run is due to apply it

    sibling = f"{store.removeprefix('s3://')}/tile-notes/read.me"  # shares the prefix
    _fs().pipe_file(sibling, b"not segflow's")
    with writing_store(store, "run-new", plain_copy=False):
        assert _plain(store)  # the in-place item is its only copy: kept
        _segment(store, 0.8, "run-new", ome=True)

    assert _plain(store) == []  # the latest version is stored once, in its version folder
    assert _fs().cat_file(sibling) == b"not segflow's"
    assert "tile" in item_groups(store)  # listed without a group at the root
    again = plan_items([], [], store, config_hash="h", overwrite=False, plain_copy=False)
    assert not again.plain_copy_changes and again.nothing_to_do
    old, new = list_versions(store, "tile")
    assert current_version(store, "tile") == new and old < new
    latest = segflow.open_store(store)["tile"]["labels"].values
    assert not np.array_equal(latest, before)
    np.testing.assert_array_equal(
        segflow.open_store(store, as_of="run-old")["tile"]["labels"].values, before
    )
    # The run's `open:` line opens the item without a plain copy.
    line = open_line(store, "tile", plain_copy=False)
    assert line.startswith("segflow.open_store(")
    np.testing.assert_array_equal(eval(line, {"segflow": segflow})["labels"].values, latest)
    with pytest.raises(FileNotFoundError):  # a plain reader finds nothing at STORE/ITEM
        xr.open_zarr(f"{store}/tile")

    # Switched back on, the next run copies every item's latest version back (also an
    # item it skips).
    with writing_store(store, "run-on", plain_copy=True):
        pass
    version = version_url(store, "tile", new).removeprefix("s3://")
    assert _plain(store) == sorted(k.removeprefix(f"{version}/") for k in _fs().find(version))
    np.testing.assert_array_equal(xr.open_zarr(f"{store}/tile")["labels"].values, latest)
    assert not plan_items([], [], store, config_hash="h", overwrite=False).plain_copy_changes
    # A change cut short leaves the record unknown: commits keep copies, any run redoes it.
    record = bookkeeping_path(store, PLAIN_COPY_FILE).removeprefix("s3://")
    _fs().pipe_file(record, b'{"plain_copy": null}')
    assert plain_copy_wanted(store)
    assert plain_copy_changes(store, True) and plain_copy_changes(store, False)

"""The store never lies: staged commits, foreign folders, the lock, append-only records."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import zarr

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader
from segflow.store.commit import (
    ForeignStoreError,
    check_item,
    check_store,
    prepare_store,
    read_commit,
)
from segflow.store.index import append_records, compact_index, read_index
from segflow.store.lock import StoreLock, StoreLockedError, hold_store_lock, read_lock
from segflow.store.regions import read_regions
from segflow.store.writers import WriteTarget, get_writer

PIPELINE = [{"op": "threshold", "value": 0.5}, {"op": "label"}]


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((40, 50)) > 0.7).astype(np.float32)


class _FailingReader(ArrayReader):
    """Reads like ArrayReader until the block at ``fail_at`` (a disk that goes away)."""

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if region[-2].start >= 16:
            raise OSError("input/output error")
        return super().read(region)


def _segment(store: str, reader: ArrayReader, **kwargs: Any) -> Any:
    with LocalExecutor(2) as executor:
        return segment_item(
            reader, PIPELINE, store=store, block_shape=16, executor=executor, **kwargs
        )


def test_a_failed_overwrite_keeps_the_previous_complete_result(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "out.zarr")
    first = _segment(store, ArrayReader(_image(), "tile"), config_hash="h1", regions=True)
    assert first.status == "done", first.error
    before = zarr.open_array(store, path="tile/labels", mode="r")[:]
    commit = read_commit(store, "tile")

    again = _segment(store, _FailingReader(_image(1), "tile"), config_hash="h2", regions=True)

    assert again.status == "failed" and "input/output error" in str(again.error)
    after = zarr.open_array(store, path="tile/labels", mode="r")[:]
    np.testing.assert_array_equal(after, before)
    assert read_commit(store, "tile") == commit
    assert commit is not None and commit["config_hash"] == "h1"
    assert os.listdir(tmp_path / "out.zarr" / ".segflow" / "staging") == []  # nothing left


def test_a_swap_cut_between_its_renames_is_undone_by_the_next_run(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    assert _segment(str(store), ArrayReader(_image(), "tile")).status == "done"
    # What a kill between "previous result -> trash" and "staged -> STORE/ITEM" leaves.
    trash = store / ".segflow" / "trash" / "run-x"
    trash.mkdir(parents=True)
    os.rename(store / "tile", trash / "tile")
    assert read_commit(str(store), "tile") is None  # so the item is not skipped meanwhile

    prepare_store(str(store))

    assert read_commit(str(store), "tile") is not None
    assert not (store / ".segflow" / "trash").exists()


def test_a_missing_storage_unit_or_region_row_fails_the_check(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    reader = ArrayReader(_image(), "tile")
    result = _segment(str(store), reader, regions=True)
    assert result.status == "done"
    commit = read_commit(str(store), "tile")
    assert commit is not None
    shape, arrays = (40, 50), commit["arrays"]
    check_item(str(store), "tile", shape=shape, arrays=arrays)
    # The region table is its writer's to check: one row per object.
    regions = get_writer("regions")
    assert regions.verify is not None
    target = WriteTarget(str(store), reader.info, "labels", None, object_count=result.object_count)
    regions.verify(target, regions.settings(), ["regions.parquet"])
    with pytest.raises(Exception, match=r"regions.parquet has \d+ rows for \d+ objects"):
        short = replace(target, object_count=result.object_count + 1)
        regions.verify(short, regions.settings(), ["regions.parquet"])
    chunk = next((store / "tile" / "labels" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    with pytest.raises(Exception, match=r"array 'labels' has 11 of its 12 storage units on disk"):
        check_item(str(store), "tile", shape=shape, arrays=arrays)


def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path: pathlib.Path) -> None:
    foreign = tmp_path / "photos"
    (foreign / "tile").mkdir(parents=True)
    (foreign / "tile" / "holiday.jpg").write_bytes(b"not mine")
    (foreign / "notes.txt").write_text("keep me")

    with pytest.raises(ForeignStoreError, match=r"'.*photos' exists and is not a segflow store"):
        check_store(str(foreign))
    result = _segment(str(foreign), ArrayReader(_image(), "tile"))

    assert result.status == "failed"
    assert "is not a segflow store" in str(result.error)
    assert sorted(p.name for p in foreign.rglob("*")) == ["holiday.jpg", "notes.txt", "tile"]


def test_a_file_is_not_a_store(tmp_path: pathlib.Path) -> None:
    (tmp_path / "out.zarr").write_text("x")
    with pytest.raises(ForeignStoreError, match=r"output.store '.*out.zarr' is a file"):
        check_store(str(tmp_path / "out.zarr"))


def test_an_item_never_replaces_a_folder_segflow_did_not_write(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    prepare_store(str(store))
    (store / "tile").mkdir()
    (store / "tile" / "data.csv").write_text("1,2")

    result = _segment(str(store), ArrayReader(_image(), "tile"))

    assert result.status == "failed"
    assert "'tile': " in str(result.error) and "is not a segflow item group" in str(result.error)
    assert (store / "tile" / "data.csv").read_text() == "1,2"


def test_an_empty_folder_and_an_older_segflow_store_are_accepted(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty").mkdir()
    check_store(str(tmp_path / "empty"))
    older = tmp_path / "older.zarr"
    older.mkdir()
    (older / "index.parquet").write_bytes(b"")  # what segflow wrote before the marker
    check_store(str(older))


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "out.zarr")
    with hold_store_lock(store, run_id="run-1"):
        with pytest.raises(StoreLockedError, match=r"is in use by another segflow run \(run run-1"):
            StoreLock(store, run_id="run-2").acquire()
    assert read_lock(store) is None
    with hold_store_lock(store, run_id="run-2"):
        assert read_lock(store)["run_id"] == "run-2"  # type: ignore[index]


def test_a_stale_lock_is_broken(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    (store / ".segflow").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    holder = {"run_id": "gone", "host": os.uname().nodename, "pid": int(dead.stdout)}
    (store / ".segflow" / "lock.json").write_text(json.dumps({**holder, "heartbeat": "x"}))
    with hold_store_lock(str(store), run_id="next"):
        assert read_lock(str(store))["run_id"] == "next"  # type: ignore[index]
    # Another host's lock with a fresh heartbeat holds; an old heartbeat does not.
    other = {"run_id": "far", "host": "elsewhere", "pid": 1}
    (store / ".segflow" / "lock.json").write_text(
        json.dumps({**other, "heartbeat": "2999-01-01T00:00:00+00:00"})
    )
    with pytest.raises(StoreLockedError, match="far of None@elsewhere"):
        StoreLock(str(store), run_id="next").acquire()
    (store / ".segflow" / "lock.json").write_text(
        json.dumps({**other, "heartbeat": "2000-01-01T00:00:00+00:00"})
    )
    with hold_store_lock(str(store), run_id="next"):
        pass


def test_records_are_appended_read_with_the_index_and_compacted(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    append_records(str(store), "run-1", [{"id": "a", "status": "done", "object_count": 3}])
    append_records(str(store), "run-1", [{"id": "b", "status": "failed", "error": "bad"}])
    record_file = store / ".segflow" / "records" / "run-1.jsonl"
    with open(record_file, "a") as handle:
        handle.write('{"id": "c", "status": "do')  # a line cut short by a kill

    frame = read_index(str(store))
    assert frame["id"].tolist() == ["a", "b"]
    assert compact_index(str(store)) == {"a", "b"}
    assert (store / "index.parquet").is_dir()  # a folder of part files
    assert not record_file.exists()
    append_records(str(store), "run-2", [{"id": "a", "status": "failed", "error": "later"}])
    assert read_index(str(store))["status"].tolist() == ["failed", "failed"]


@pytest.mark.parametrize("stream", [False, True])
def test_an_interrupted_item_resumes_from_its_written_blocks(
    tmp_path: pathlib.Path, stream: bool
) -> None:
    from segflow.engine.interrupt import clear_stop, request_stop

    rng = np.random.default_rng(5)
    image = (rng.random((96, 128)) > 0.6).astype(np.float32)
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
    store = str(tmp_path / "out.zarr")
    written: list[int] = []

    def stop_halfway(label: str, done: int, total: int) -> None:
        if label.startswith("phase 2/2") and done >= total // 2:
            written.append(done)
            request_stop("test")  # as a Ctrl-C halfway through the output phase

    def segment(progress: Any = None) -> Any:
        with LocalExecutor(2) as executor:
            return segment_item(
                ArrayReader(image, "tile"),
                pipeline,
                store=store,
                block_shape=16,
                executor=executor,
                regions=True,
                resumable=True,
                progress=progress,
                keep_limit=0 if stream else None,  # 0: streaming mode, every phase rereads
            )

    try:
        first = segment(stop_halfway)
    finally:
        clear_stop()
    assert first.status == "interrupted", first.error
    assert read_commit(store, "tile") is None  # nothing committed
    # A process killed inside a storage unit's write leaves zarr's temporary file behind.
    (chunk_dir,) = (tmp_path / "out.zarr" / ".segflow" / "staging").glob("*/tile/labels/c/0")
    (chunk_dir / "7.0123abcd.partial").write_bytes(b"cut short")

    resumed = segment()

    assert resumed.status == "done", resumed.error
    n_blocks = resumed.n_blocks
    assert n_blocks == 48 and written[0] >= n_blocks // 2
    # Blocks finished before the stop are not written again (some ran on as it came).
    assert n_blocks // 2 <= resumed.n_resumed < n_blocks
    labels = zarr.open_array(store, path="tile/labels", mode="r")[:]
    reference = scipy.ndimage.label(image > 0.5)[0]
    np.testing.assert_array_equal(labels, reference)  # ids in scan order, as scipy
    table = read_regions(store, "tile")
    assert len(table) == labels.max()
    assert table["label"].tolist() == list(range(1, len(table) + 1))
    assert os.listdir(tmp_path / "out.zarr" / ".segflow" / "staging") == []


def test_a_committed_item_carries_zarrs_own_consolidated_metadata(
    tmp_path: pathlib.Path,
) -> None:
    """Each committed group's zarr.json holds what zarr's own consolidation of that group
    writes; the store's root holds none, and a redone item's copy is its new layout."""
    import shutil

    import xarray as xr

    store = tmp_path / "out.zarr"
    for name, seed in (("a", 0), ("b", 1)):
        assert _segment(str(store), ArrayReader(_image(seed), name)).status == "done"
    redo = _segment(str(store), ArrayReader(_image(1), "b"), chunks=[8, 8], regions=True)
    assert redo.status == "done"
    theirs = tmp_path / "theirs.zarr"
    shutil.copytree(store, theirs)
    with warnings.catch_warnings():  # zarr's notes on the files that are not Zarr nodes
        warnings.simplefilter("ignore")
        for name in ("a", "b"):
            zarr.consolidate_metadata(str(theirs), path=name, zarr_format=3)

    def entries(path: pathlib.Path) -> Any:
        return json.loads((path / "zarr.json").read_text()).get("consolidated_metadata")

    for name in ("a", "b"):
        assert entries(store / name) == entries(theirs / name)
    assert entries(store) is None
    assert "regions.parquet" not in entries(store / "b")["metadata"]
    ds = xr.open_zarr(store / "b")  # consolidated: no warning (warnings are errors)
    assert ds["labels"].encoding["chunks"] == (8, 8)
    assert read_commit(str(store), "b") is not None  # written with the metadata


def _take_over(store: pathlib.Path, run_id: str = "taker") -> dict[str, Any]:
    """Put another run's lock where ``store``'s is, as a run that broke it would."""
    taker = {"run_id": run_id, "owner": "someone", "host": "elsewhere", "pid": 1,
             "heartbeat": "2999-01-01T00:00:00+00:00", "token": "the-takers-token"}  # fmt: skip
    (store / ".segflow" / "lock.json").write_text(json.dumps(taker))
    return taker


def _wait_lost(store: str) -> str:
    import time

    from segflow.store.lock import lock_lost

    for _ in range(200):
        if (lost := lock_lost(store)) is not None:
            return lost
        time.sleep(0.02)
    raise AssertionError("the heartbeat never noticed the takeover")


def test_a_heartbeat_never_overwrites_the_lock_of_the_run_that_took_over(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    lock = StoreLock(str(store), run_id="stalled", heartbeat_every=0.02)
    lock.acquire()
    taker = _take_over(store)

    lost = _wait_lost(str(store))
    import time

    time.sleep(0.1)  # beats that would have come
    assert read_lock(str(store)) == taker  # untouched
    assert lost.startswith(f"store '{store}': this run's lock was taken over (run taker of ")
    assert "\n" not in lost
    # The run's items fail with that line; nothing of them is committed.
    with LocalExecutor(1) as executor:
        result = segment_item(ArrayReader(np.ones((8, 8)), "tile"), [{"op": "otsu"}],
                              store=str(store), block_shape=8, executor=executor)  # fmt: skip
    assert result.status == "failed" and "this run's lock was taken over" in str(result.error)
    assert not (store / "tile").exists()
    lock.release()  # not its lock: left as it is
    assert read_lock(str(store)) == taker
    with pytest.raises(StoreLockedError):
        StoreLock(str(store), run_id="third").acquire()


def test_a_heartbeat_without_a_time_zone_is_read_as_utc() -> None:
    import datetime as dt

    from segflow.store.lock import is_stale, locked_message

    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    fresh = {"host": "elsewhere", "pid": 1, "heartbeat": now.isoformat()}
    old = {"host": "elsewhere", "pid": 1, "heartbeat": "2000-01-01T00:00:00"}

    assert not is_stale(fresh, stale_after=60)
    assert is_stale(old, stale_after=60)
    assert ", last heartbeat 0 s ago" in locked_message("s", fresh)

"""The collection module: which items a run redoes (fingerprints, config hash, code
version, overwrite, filters), how they are batched, and one item run with its record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segflow.config import parse_config
from segflow.engine.collection import (
    BATCH_MAX,
    ItemPlan,
    batch_size,
    batches,
    plan_collection,
    run_item,
    select_items,
)
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import code_version
from segflow.store.index import read_index

ITEMS = [
    {"id": "a", "path": "/d/a.tif", "fingerprint": "fa"},
    {"id": "b", "path": "/d/b.tif", "fingerprint": "fb2"},
    {"id": "c", "path": "/d/c.tif", "fingerprint": "fc"},
    {"id": "url", "path": "s3://d/u.tif", "fingerprint": ""},
]


def done(item_id: str, fingerprint: str, **extra: Any) -> dict[str, Any]:
    row = {"id": item_id, "status": "done", "fingerprint": fingerprint, "config_hash": "h1"}
    return {**row, "code_version": code_version(), **extra}


INDEX = [
    done("a", "fa"),
    done("b", "fb1"),  # the input changed since
    {**done("c", "fc"), "status": "failed"},
    done("url", ""),  # no fingerprint: cannot tell whether it changed
]


# What each item's group says (store.commit.read_commit): the same as its index row.
COMMITS: dict[str, Any] = {
    row["id"]: {k: row[k] for k in ("fingerprint", "config_hash", "code_version")} for row in INDEX
}


def test_only_unchanged_done_items_are_skipped() -> None:
    todo, skipped = select_items(ITEMS, INDEX, config_hash="h1", overwrite=False, commits=COMMITS)

    assert [i["id"] for i in todo] == ["b", "c", "url"]
    assert [(r["id"], r["status"]) for r in skipped] == [("a", "skipped")]


def test_a_done_row_without_a_matching_commit_record_is_redone() -> None:
    # The index says done, but the group was never committed (an interrupted overwrite, an
    # older segflow, a deleted folder) or was committed by another config.
    for commit in (None, {**COMMITS["a"], "config_hash": "h0"}):
        todo, skipped = select_items(
            ITEMS[:1], INDEX, config_hash="h1", overwrite=False, commits={"a": commit}
        )
        assert ([i["id"] for i in todo], skipped) == (["a"], [])


def test_a_new_config_hash_or_code_version_redoes_everything() -> None:
    assert (
        len(select_items(ITEMS, INDEX, config_hash="h2", overwrite=False, commits=COMMITS)[0]) == 4
    )
    index = [done("a", "fa", code_version="0.0.1")]
    assert [
        i["id"]
        for i in select_items(ITEMS[:1], index, config_hash="h1", overwrite=False, commits=COMMITS)[
            0
        ]
    ] == ["a"]


def test_overwrite_redoes_every_item() -> None:
    todo, skipped = select_items(ITEMS, INDEX, config_hash="h1", overwrite=True, commits=COMMITS)

    assert ([i["id"] for i in todo], skipped) == (["a", "b", "c", "url"], [])


def write_tiles(folder: Path, names: list[str], shape: tuple[int, ...] = (40, 40)) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        tifffile.imwrite(folder / name, (rng.random(shape) * 60000).astype(np.uint16))


def config_for(tmp_path: Path, **extra: Any) -> Any:
    data = {
        "name": "tiles",
        "input": {"path": str(tmp_path / "in")},
        "output": {"store": str(tmp_path / "out.zarr"), "chunks": [32, 32]},
        "blocks": {"shape": [32, 32]},
        "pipeline": [{"op": "otsu"}, {"op": "label"}],
        **extra,
    }
    return parse_config(data)


def test_the_filter_applies_to_items_and_unreadable_files_alike(tmp_path: Path) -> None:
    write_tiles(tmp_path / "in", ["north_1.tif", "north_2.tif", "south_1.tif"])
    (tmp_path / "in" / "north_bad.tif").write_bytes(b"not a tiff")
    (tmp_path / "in" / "south_bad.tif").write_bytes(b"not a tiff")
    cfg = config_for(tmp_path)

    plan = plan_collection(cfg, item_filter=["north_*"])

    assert [i["id"] for i in plan.todo] == ["north_1", "north_2"]
    assert [r["id"] for r in plan.failed] == ["north_bad"]
    assert [(i["id"], i["pixels"]) for i in plan.work()] == [
        ("north_1", 1600),
        ("north_2", 1600),
        ("north_bad", 0),
    ]
    assert len(plan.stages(cfg.config_hash())) == 2


def test_automatic_batches_grow_with_the_collection_and_shrink_with_item_size() -> None:
    tiles = [{"id": f"t{i}", "pixels": 512 * 512} for i in range(100_000)]

    assert batch_size(tiles[:99]) == 1  # a small collection: one task run per item
    assert batch_size(tiles[:240]) == 10  # every slot keeps 8 batches
    assert batch_size(tiles) == BATCH_MAX
    assert batch_size([{"pixels": 2048 * 2048}] * 10_000) == 4
    assert batch_size([{"pixels": 8192 * 8192}] * 10_000) == 1
    assert batch_size(tiles[:5], 2) == 2  # run.batch wins
    cut = batches(tiles[:130], 64)
    assert [len(b) for b in cut] == [64, 64, 2]
    assert [i for b in cut for i in b] == tiles[:130]
    tapered = batches(tiles[:1000], 64, taper=True)
    assert [i for b in tapered for i in b] == tiles[:1000]  # every item once, in order
    sizes = [len(b) for b in tapered]
    assert sizes[0] == 64 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)


def test_run_item_records_done_and_failed_items_but_not_interrupted_ones(tmp_path: Path) -> None:
    from segflow.engine.interrupt import clear_stop, request_stop

    write_tiles(tmp_path / "in", ["a.tif"])
    (tmp_path / "in" / "bad.tif").write_bytes(b"not a tiff")
    cfg = config_for(tmp_path)
    plan = plan_collection(cfg)
    reports: list[tuple[str, str]] = []
    executor = LocalExecutor(2)
    try:
        rows = [
            run_item(
                cfg,
                item,
                executor=executor,
                run_id="r1",
                progress=lambda i, p, d, t: reports.append((i, p)),
            )[0]
            for item in plan.work()
        ]
        request_stop("test")
        try:
            stopped, reader = run_item(cfg, plan.work()[0], executor=executor, run_id="r2")
        finally:
            clear_stop()
    finally:
        executor.close()

    assert [(r["id"], r["status"]) for r in rows] == [("a", "done"), ("bad", "failed")]
    assert "bad" in rows[1]["error"] and "tif" in rows[1]["error"]
    assert (stopped["status"], reader) == ("interrupted", None)
    index = read_index(cfg.output.store).set_index("id")["status"].to_dict()
    assert index == {"a": "done", "bad": "failed"}  # the interrupted try left no record
    assert ("a", "done") in reports and ("bad", "failed") in reports


def test_an_item_past_its_time_limit_fails_and_its_blocks_are_cancelled(tmp_path: Path) -> None:
    write_tiles(tmp_path / "in", ["slow.tif"], shape=(64, 64))
    cfg = config_for(tmp_path, run={"item_timeout": 0.5})
    [item] = plan_collection(cfg).work()

    class SlowExecutor(LocalExecutor):
        def map(self, fn: Any, *iterables: Any, **kwargs: Any) -> list[Any]:
            def slow(*args: Any, **kw: Any) -> Any:
                time.sleep(1.0)
                return fn(*args, **kw)

            return super().map(slow, *iterables, **kwargs)

    executor = SlowExecutor(1)
    started = time.monotonic()
    try:
        row, _ = run_item(cfg, item, executor=executor, run_id="r1")
    finally:
        executor.close()

    assert row["status"] == "failed"
    assert "time limit of 0.5 s (run.item_timeout)" in row["error"] and "slow" in row["error"]
    assert time.monotonic() - started < 4  # not every block's second: the rest were cancelled
    assert not (Path(cfg.output.store) / "slow").exists()


@pytest.mark.parametrize("value", [0, -1])
def test_item_timeout_must_be_positive(tmp_path: Path, value: float) -> None:
    from segflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run\.item_timeout"):
        config_for(tmp_path, run={"item_timeout": value})


def test_an_empty_plan_has_nothing_to_do() -> None:
    assert ItemPlan([], [], [], False).nothing_to_do


def test_the_plan_refuses_a_store_another_config_made_unless_allowed(tmp_path: Path) -> None:
    from segflow.errors import StoreError

    write_tiles(tmp_path / "in", ["a.tif"])
    cfg = config_for(tmp_path)
    executor = LocalExecutor(1)
    try:
        [_row] = [
            run_item(cfg, i, executor=executor, run_id="r1")[0] for i in plan_collection(cfg).work()
        ]
    finally:
        executor.close()
    assert read_index(cfg.output.store).set_index("id").loc["a", "config_name"] == "tiles"
    other = config_for(tmp_path, name="edges")

    with pytest.raises(StoreError, match=r"holds 1 item made by config 'tiles'; config 'edges'"):
        plan_collection(other)

    allowed = config_for(
        tmp_path,
        name="edges",
        output={**other.output.model_dump(), "allow_other_configs": True},
        pipeline=[{"op": "otsu"}, {"op": "label", "connectivity": 2}],
    )
    assert [i["id"] for i in plan_collection(allowed).todo] == ["a"]
    assert [i["id"] for i in plan_collection(cfg).todo] == []  # the maker's run still skips


def test_after_another_run_took_the_store_over_the_remaining_items_fail_unrecorded(
    tmp_path: Path,
) -> None:
    import json

    from segflow.store.lock import StoreLock, lock_lost, read_lock

    write_tiles(tmp_path / "in", ["a.tif", "b.tif"])
    cfg = config_for(tmp_path)
    store = cfg.output.store
    plan = plan_collection(cfg)
    lock = StoreLock(store, run_id="r1", heartbeat_every=0.02)
    lock.acquire()
    executor = LocalExecutor(1)
    try:
        first, _ = run_item(cfg, plan.work()[0], executor=executor, run_id="r1")
        taker = {"run_id": "r2", "host": "elsewhere", "pid": 1, "token": "t",
                 "heartbeat": "2999-01-01T00:00:00+00:00"}  # fmt: skip
        with open(f"{store}/.segflow/lock.json", "w") as handle:
            json.dump(taker, handle)
        for _ in range(200):
            if lock_lost(store) is not None:
                break
            time.sleep(0.02)
        second, _ = run_item(cfg, plan.work()[1], executor=executor, run_id="r1")
    finally:
        executor.close()
        lock.release()

    assert first["status"] == "done"
    assert second["status"] == "failed" and second["error"] == lock_lost(store)
    assert "this run's lock was taken over (run r2 of " in second["error"]
    assert read_index(store).set_index("id")["status"].to_dict() == {"a": "done"}
    assert read_lock(store) == taker

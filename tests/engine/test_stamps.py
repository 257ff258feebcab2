"""Skips decided from the index without opening item groups: a row's commit stamp speaks for
its group only while the group's ``zarr.json`` is the file it was stamped with; any other
row has its commit record read, so a stale or missing stamp costs a read, never a wrong
skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_store_names import config_for, run_collection, write_tiles

from segflow.engine import collection
from segflow.engine.collection import plan_collection
from segflow.store.index import read_index, write_index
from segflow.store.stamps import SKIP_KEYS, commit_id, group_stamp, stamp_commit

NAMES = ["a.tif", "b.tif", "c.tif"]


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The item ids whose commit record the planner reads."""
    reads: list[str] = []
    original = collection.read_commit

    def counted(store: str, item_id: str) -> Any:
        reads.append(item_id)
        return original(store, item_id)

    monkeypatch.setattr(collection, "read_commit", counted)
    return reads


def _remove(item: Path) -> None:
    """An item as a user removes it: the link to its latest version (or an older store's
    folder)."""
    if item.is_symlink():
        item.unlink()
    else:
        shutil.rmtree(item)


def _ran(tmp_path: Path) -> tuple[Any, Path]:
    write_tiles(tmp_path / "in", NAMES)
    cfg = config_for(tmp_path)
    assert {r["status"] for r in run_collection(cfg)} == {"done"}
    return cfg, Path(cfg.output.store)


def test_an_unchanged_store_is_planned_without_opening_its_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, store = _ran(tmp_path)
    index = read_index(str(store)).set_index("id")
    for item_id in ("a", "b", "c"):
        record = json.loads((store / item_id / "zarr.json").read_text())["attributes"]
        assert index.loc[item_id, "commit_id"] == commit_id(record["segflow_commit"])
        assert index.loc[item_id, "commit_stamp"] == group_stamp(str(store), item_id)
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert plan.todo == [] and len(plan.skipped) == 3 and reads == []


def test_a_removed_replaced_or_rewritten_group_is_read_and_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, store = _ran(tmp_path)
    _remove(store / "a")  # removed by hand
    node = json.loads((store / "b" / "zarr.json").read_text())
    node["attributes"]["segflow_commit"]["fingerprint"] = "another input"
    (store / "b" / "zarr.json").write_text(json.dumps(node))  # rewritten in place
    node = json.loads((store / "c" / "zarr.json").read_text())
    del node["attributes"]["segflow_commit"]  # as an interrupted object-store rewrite
    (store / "c" / "zarr.json").write_text(json.dumps(node))
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert sorted(i["id"] for i in plan.todo) == ["a", "b", "c"] and not plan.skipped
    assert sorted(reads) == ["a", "b", "c"]  # each stamp failed, so each record was read


def test_a_group_replaced_by_an_identical_copy_is_read_once_then_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy is another file (inode, times): the stamp no longer speaks for it, so its
    record is read, and it says the item is done."""
    cfg, store = _ran(tmp_path)
    shutil.copytree(store / "a", tmp_path / "a-copy")  # the latest version's files
    _remove(store / "a")
    (tmp_path / "a-copy").rename(store / "a")
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert plan.todo == [] and len(plan.skipped) == 3 and reads == ["a"]


def test_rows_without_a_stamp_are_checked_against_their_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows an older segflow wrote (or written by hand) have no stamp: read as before."""
    cfg, store = _ran(tmp_path)
    rows = read_index(str(store)).to_dict(orient="records")
    write_index(str(store), [{**r, "commit_id": None, "commit_stamp": None} for r in rows])
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert plan.todo == [] and sorted(reads) == ["a", "b", "c"]


def test_a_row_is_stamped_only_when_its_group_says_the_same(tmp_path: Path) -> None:
    _, store = _ran(tmp_path)
    row = read_index(str(store)).set_index("id").loc["a"].to_dict() | {"id": "a"}
    assert stamp_commit(str(store), row)["commit_stamp"] == group_stamp(str(store), "a")
    for key in SKIP_KEYS:
        assert stamp_commit(str(store), {**row, key: "other"}) == {}
    assert stamp_commit(str(store), {**row, "id": "not_there"}) == {}

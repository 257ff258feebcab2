"""Skips decided from the index without opening item groups: a row's commit stamp speaks for
its group only while the group's ``zarr.json`` is the file it was stamped with; any other
row has its commit record read, so a stale or missing stamp costs a read, never a wrong
skip."""

from __future__ import annotations

import json
import os
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


def _commit_elsewhere(store: Path, item_id: str, *, same_times: bool) -> None:
    """What another process's commit of ``item_id`` leaves before this index has its row:
    a new version folder (a copy of the current one whose record names another input of
    the same length, so its ``zarr.json`` has the same size) and ``STORE/ITEM`` replaced
    in one rename by a link to it. With ``same_times`` the new ``zarr.json`` and the new
    link are given the old ones' modification times."""
    from segflow.store.versions import VERSIONS_DIR, version_id

    link = store / item_id
    old = Path(os.path.realpath(link))
    new = old.parent / version_id()
    shutil.copytree(old, new)
    text = (new / "zarr.json").read_text()
    was = json.loads(text)["attributes"]["segflow_commit"]["fingerprint"]
    (new / "zarr.json").write_text(text.replace(was, "0" * len(was)))
    assert (new / "zarr.json").stat().st_size == (old / "zarr.json").stat().st_size
    fresh = store / ".segflow" / "links-by-test"
    fresh.mkdir(exist_ok=True)
    os.symlink(os.path.join(".segflow", VERSIONS_DIR, item_id, new.name), fresh / item_id)
    if same_times:
        was = (old / "zarr.json").stat()
        os.utime(new / "zarr.json", ns=(was.st_atime_ns, was.st_mtime_ns))
        was = link.lstat()
        os.utime(fresh / item_id, ns=(was.st_atime_ns, was.st_mtime_ns), follow_symlinks=False)
    os.replace(fresh / item_id, link)


@pytest.mark.parametrize("same_times", [False, True])
def test_an_item_recommitted_by_another_process_is_read_and_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_times: bool
) -> None:
    """``STORE/ITEM`` links to a new version the index has no row for (another process
    committed it and had not recorded it yet): the stamp no longer holds, even where the
    new version's ``zarr.json`` and link carry the old ones' size and modification times,
    so the record is read; it names another input, so the item is redone. The items
    before and after it keep their stamps (no read)."""
    cfg, store = _ran(tmp_path)
    assert (store / "b").is_symlink()
    _commit_elsewhere(store, "b", same_times=same_times)
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert [i["id"] for i in plan.todo] == ["b"]
    assert sorted(plan.skipped.ids().to_pylist()) == ["a", "c"] and reads == ["b"]


def test_an_item_whose_linked_version_is_gone_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link is the one the row was stamped through, but the version it names was
    removed (by hand: retention never removes a linked version): redone, not skipped."""
    cfg, store = _ran(tmp_path)
    shutil.rmtree(os.path.realpath(store / "c"))
    assert (store / "c").is_symlink() and not (store / "c").exists()
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert [i["id"] for i in plan.todo] == ["c"] and reads == ["c"]


def test_an_older_stores_folder_moved_into_a_version_keeps_its_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row stamped while its item was a plain folder (an older store) still speaks for
    it once the folder is a version ``STORE/ITEM`` links to: the stamp is the identity of
    the file that holds the record, which a rename keeps. A row whose stamp is of another
    file, or of no kind this segflow writes, is read."""
    cfg, store = _ran(tmp_path)
    for item_id in NAMES_IDS:  # the links undone: an older store's folders
        target = os.path.realpath(store / item_id)
        (store / item_id).unlink()
        os.rename(target, store / item_id)
    rows = read_index(str(store)).to_dict(orient="records")
    odd = {"b": "pointer:3456:d41d8cd98f00b204e9800998ecf8427e", "c": "1:2:3:4"}
    write_index(
        str(store), [{**r, "commit_stamp": odd.get(r["id"], r["commit_stamp"])} for r in rows]
    )
    version = "20261207T000000.000000Z-0"
    for item_id in NAMES_IDS:  # ... each moved into a version and linked
        target = store / ".segflow" / "versions" / item_id / version
        target.parent.mkdir(parents=True, exist_ok=True)
        (store / item_id).rename(target)
        (store / item_id).symlink_to(target.relative_to(store))
    reads = _count_reads(monkeypatch)

    plan = plan_collection(cfg)

    assert plan.todo == [] and len(plan.skipped) == 3 and sorted(reads) == ["b", "c"]


NAMES_IDS = [name.removesuffix(".tif") for name in NAMES]


def test_rows_whose_stamps_hold_are_skipped_in_place_and_only_the_others_read() -> None:
    """The rule on columns: rows whose stamps hold are skipped at their items' places
    (items without rows between them), the other rows' records are asked for, and only
    theirs."""
    import numpy as np
    import pyarrow as pa

    from segflow.engine.item import code_version

    ids = ["new1", "a", "new2", "b", "c"]
    items = pa.table({"id": ids, "fingerprint": [f"f-{i}" for i in ids]})
    done = pa.table(
        {
            "id": ["c", "b", "a"],
            "status": ["done"] * 3,
            "fingerprint": ["f-c", "f-b", "f-a"],
            "config_hash": ["h"] * 3,
            "code_version": [code_version()] * 3,
            "commit_stamp": ["sc", "sb", "sa"],
        }
    )
    asked: list[list[str]] = []

    def held_of(rows: Any) -> Any:
        return np.array([i in ("a", "c") for i in rows.column("id").to_pylist()])

    def commits_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        asked.append([r["id"] for r in rows])
        return {r["id"]: {**r, "fingerprint": "another input"} for r in rows}

    skip, _ = collection.skip_mask(
        items, done, config_hash="h", overwrite=False, commits_of=commits_of, held_of=held_of
    )

    assert skip.tolist() == [False, True, False, False, True] and asked == [["b"]]


def test_stamps_hold_only_for_rows_stamped_with_their_groups_file_now(tmp_path: Path) -> None:
    """Rows without a stamp (an index with no such column, or a null one) never hold."""
    import pyarrow as pa

    _, store = _ran(tmp_path)
    now = {i: group_stamp(str(store), i) for i in NAMES_IDS}
    rows = pa.table(
        {"id": ["c", "a", "b", "gone"], "commit_stamp": [now["c"], None, "1:2:3:4", now["a"]]}
    )

    assert collection.stamps_hold(str(store), rows).tolist() == [True, False, False, False]
    assert collection.stamps_hold(str(store), rows.select(["id"])).tolist() == [False] * 4

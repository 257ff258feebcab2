"""Which items a run redoes: fingerprints, config hash, code version, overwrite, filters."""

from __future__ import annotations

from typing import Any

from segflow.engine.item import code_version
from segflow.flows.segment import select_items

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


def test_overwrite_and_filter() -> None:
    todo, skipped = select_items(
        ITEMS, INDEX, config_hash="h1", overwrite=True, commits=COMMITS, item_filter=["a", "u*"]
    )

    assert ([i["id"] for i in todo], skipped) == (["a", "url"], [])

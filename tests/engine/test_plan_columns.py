"""A run's plan holds skipped items as Arrow columns, not a dict per item, and everything
it reports from them (the summary, the items table, the recorded ids) is what the dicts
gave: each columnar path is checked against the list behaviour it replaced."""

from __future__ import annotations

import gc
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from test_store_names import config_for, run_collection, write_tiles

from segflow.engine.collection import (
    SUMMARY_ROWS,
    index_rows,
    plan_collection,
    recorded_item_ids,
    run_summary,
)
from segflow.engine.rows import IndexRows, first_by_id, table_of_rows
from segflow.io import unused_id
from segflow.store.names import is_reserved_name, reserved_mask


def test_a_plan_holds_its_skipped_items_as_columns(tmp_path: Path) -> None:
    write_tiles(tmp_path / "in", ["a.tif", "b.tif", "c.tif"])
    cfg = config_for(tmp_path)
    assert {r["status"] for r in run_collection(cfg)} == {"done"}

    plan = plan_collection(cfg)

    assert plan.todo == [] and isinstance(plan.skipped, IndexRows)
    # One Arrow table, and nothing else: no Python object per skipped item.
    held = [o for o in gc.get_referents(plan.skipped) if not isinstance(o, type)]
    assert [type(o) for o in held] == [pa.Table]
    assert plan.skipped.table.num_rows == len(plan.skipped) == 3
    assert plan.skipped.ids().to_pylist() == ["a", "b", "c"]
    assert set(plan.skipped.table.column("status").to_pylist()) == {"skipped"}
    # The rows as the list of dicts gave them: the index rows, status skipped.
    old = [{**row, "status": "skipped"} for row in index_rows(cfg.output.store)]
    assert list(plan.skipped) == old


def _rows(n: int, *, seed: int, counts: bool) -> list[dict[str, Any]]:
    """``n`` index rows with unique ids in random order: done, failed, interrupted."""
    rng = random.Random(seed)
    rows = []
    for k in rng.sample(range(10 * n), n):
        status = rng.choice(["done", "done", "done", "failed", "interrupted"])
        row: dict[str, Any] = {"id": f"item_{k:06d}", "status": status, "error": None}
        if status == "failed":
            row["error"] = f"item 'item_{k:06d}': unreadable"
        elif counts:
            row["object_count"] = rng.randrange(1000)
        else:  # fractions whose float sum depends on the order they are added in
            row["foreground_fraction"] = rng.random() * 10 ** rng.randrange(-8, 1)
        rows.append(row)
    return rows


@pytest.mark.parametrize("counts", [True, False])
@pytest.mark.parametrize(("n_run", "n_skipped"), [(0, 3), (5, 0), (40, 2600), (1500, 1)])
def test_the_summary_from_columns_is_the_summary_from_dicts(
    n_run: int, n_skipped: int, counts: bool
) -> None:
    rows = _rows(n_run + n_skipped, seed=n_run + n_skipped, counts=counts)
    run = sorted(rows[:n_run], key=lambda r: r["id"])
    skipped = sorted(
        ({**row, "status": "skipped", "error": None} for row in rows[n_run:]),
        key=lambda r: r["id"],
    )
    table = table_of_rows(skipped)
    skipped = list(IndexRows(table))  # as an index gives them: every row with every column

    before = run_summary("c", "/out/c.zarr", sorted(run + skipped, key=lambda r: r["id"]))
    after = run_summary("c", "/out/c.zarr", run, skipped=IndexRows(table))

    assert after == before
    assert after["skipped"] == n_skipped and after["rows_omitted"] == max(
        n_run + n_skipped - SUMMARY_ROWS, 0
    )


def test_the_first_rows_by_id_are_the_head_of_the_sorted_rows() -> None:
    rng = random.Random(3)
    for _ in range(50):
        ids = [f"i{rng.randrange(40):02d}" for _ in range(rng.randrange(30))]
        mine = sorted(({"id": i, "from": "run"} for i in ids[::2]), key=lambda r: r["id"])
        more = sorted(({"id": i, "from": "more"} for i in ids[1::2]), key=lambda r: r["id"])
        limit = rng.randrange(25)
        expected = sorted(mine + more, key=lambda r: r["id"])[:limit]  # stable: run first
        assert first_by_id(mine, IndexRows(table_of_rows(more)), limit) == expected


def _keep_recorded_ids_as_before(
    items: list[dict[str, Any]], failed: list[dict[str, Any]], index: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """segflow's rule before it was applied to columns, kept here as the reference."""
    recorded = {
        row["source"]: row["id"]
        for row in index
        if row.get("source") and not is_reserved_name(str(row["id"]))
    }
    taken = {row["id"] for row in index}

    def renamed(entry: dict[str, Any], source: str) -> dict[str, Any]:
        return {**entry, "id": recorded.get(source) or unused_id(entry["id"], taken)}

    return (
        [renamed(item, item["path"]) for item in items],
        [renamed(row, row["source"]) for row in failed],
    )


def test_recorded_ids_on_columns_are_the_ids_the_dicts_gave() -> None:
    rng = random.Random(7)
    names = ["tile", "tile_2", "a", "b", "index.parquet", "Zarr.JSON", "stra\u00dfe", ""]
    for _ in range(200):
        index = [
            {"id": rng.choice(names[:-1]) + rng.choice(["", "_2", "_3"]), "source": source}
            for source in rng.sample(["/d/1", "/d/2", "/d/3", "/d/4", None, ""], 4)
        ]
        paths = rng.sample(["/d/1", "/d/2", "/d/3", "/d/5", "/d/6"], rng.randrange(1, 5))
        ids = rng.sample([*names[:-1], "c", "tile_3"], len(paths))
        items = [{"id": i, "path": p, "fingerprint": "f"} for i, p in zip(ids, paths, strict=True)]
        failed = (
            [{"id": "tile", "source": "/d/4", "status": "failed"}] if rng.random() < 0.5 else []
        )
        table = pa.table({"id": [i["id"] for i in items], "path": paths}).cast(
            pa.schema([("id", pa.large_string()), ("path", pa.large_string())])
        )

        got, got_failed = recorded_item_ids(table, failed, table_of_rows(index))

        want, want_failed = _keep_recorded_ids_as_before(items, failed, index)
        assert got.column("id").to_pylist() == [i["id"] for i in want], (items, index)
        assert got_failed == want_failed


def test_reserved_names_on_columns_are_the_names_reserved_one_by_one() -> None:
    names = [
        "tile", "index.parquet", "INDEX.PARQUET", "index.parquet.segflow-tmp", "index_parquet",
        "zarr.json", ".segflow", "x.segflow", "stac", "K\u212a", "\u0130ndex.parquet",
        "stra\u00dfe", "catalogue.parquet", "vectors.parquet", "", None,
    ]  # fmt: skip
    want = [name is not None and is_reserved_name(name) for name in names]
    assert reserved_mask(pa.array(names, pa.large_string())).tolist() == want
    assert any(want)  # the list holds reserved names to find


def test_rows_of_mixed_kinds_come_back_as_they_were() -> None:
    rows = [
        {"id": "a", "n": 1, "extra": {"k": [1, 2]}, "x": 0.5},
        {"id": "b", "n": 2.5, "x": None, "flag": True},
        {"id": "c", "n": "three", "extra": [1, "a"], "x": 2.0},
    ]
    keys = ["id", "n", "extra", "x", "flag"]
    back = list(IndexRows(table_of_rows(rows)))
    assert back == [{key: row.get(key) for key in keys} for row in rows]
    assert [type(row["n"]) for row in back] == [int, float, str]


def test_fractions_are_added_in_id_order_to_the_last_bit() -> None:
    from segflow.engine.collection import _sum_by_id

    rng = random.Random(11)
    values = [rng.random() * 10 ** rng.randrange(-12, 12) for _ in range(300)]
    rows = [{"id": f"i{k:03d}", "foreground_fraction": v} for k, v in enumerate(values)]
    mine, more = rows[::3], [r for k, r in enumerate(rows) if k % 3]
    assert _sum_by_id(mine, IndexRows(table_of_rows(more))) == sum(values)  # in id order
    assert sum(values) != sum(r["foreground_fraction"] for r in mine + more)  # order matters

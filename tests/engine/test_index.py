"""The collection index in parts: a run rewrites the parts of the items it touched only, the
folder reads as one table, and an older single-file index is read and moved into parts."""

from __future__ import annotations

import logging
import pathlib

import pandas as pd
import pytest

from segflow.errors import StoreError
from segflow.store.index import (
    append_records,
    compact_index,
    migrate_index,
    read_index,
    write_index,
)
from segflow.store.parts import BUCKETS, bucket_of, part_name
from segflow.tasks.store import writing_store


def _rows(n: int, status: str = "failed") -> list[dict[str, object]]:
    return [{"id": f"item{k:04d}", "status": status, "error": "unreadable"} for k in range(n)]


def _parts(store: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (store / "index.parquet").glob("part-*")}


def test_one_new_item_rewrites_one_part_of_the_index(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    write_index(str(store), _rows(600))
    before = _parts(store)
    assert 200 < len(before) <= BUCKETS  # 600 ids over 256 hash buckets

    append_records(str(store), "run-2", [{"id": "new_item", "status": "done"}])
    assert compact_index(str(store)) == {"new_item"}

    after = _parts(store)
    changed = {name for name, mtime in after.items() if before.get(name) != mtime}
    assert changed == {part_name(bucket_of("new_item"))}
    frame = read_index(str(store))
    assert len(frame) == 601 and frame.set_index("id").loc["new_item", "status"] == "done"
    # The folder is one table for pandas too, with the same rows.
    direct = pd.read_parquet(store / "index.parquet")
    assert sorted(direct["id"]) == frame["id"].tolist()


def test_a_new_column_reaches_every_part_so_the_folder_reads_as_one_table(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    write_index(str(store), _rows(300))
    write_index(str(store), [{"id": "item0007", "status": "done", "ap50": 0.75}])

    direct = pd.read_parquet(store / "index.parquet").set_index("id")
    assert direct.loc["item0007", "ap50"] == 0.75 and direct["ap50"].isna().sum() == 299
    before = _parts(store)
    write_index(str(store), [{"id": "item0008", "status": "done", "ap50": 0.5}])
    changed = {name for name, mtime in _parts(store).items() if before[name] != mtime}
    assert changed == {part_name(bucket_of("item0008"))}  # the column is known now
    assert read_index(str(store)).set_index("id").loc["item0008", "ap50"] == 0.5


def test_a_column_given_text_and_then_a_number_is_refused_by_name(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    write_index(str(store), [{"id": "a", "status": "done", "note": "kept"}])
    with pytest.raises(StoreError, match=r"column\(s\) \['note'\] another type"):
        write_index(str(store), [{"id": "b", "status": "done", "note": 1.5}])
    assert read_index(str(store))["id"].tolist() == ["a"]


def _single_file_store(store: pathlib.Path, n: int) -> pd.DataFrame:
    """A store as an earlier segflow left it: one ``index.parquet`` file."""
    store.mkdir(parents=True)
    frame = pd.DataFrame(_rows(n, "done")).assign(fingerprint="f", seconds=0.5)
    frame.to_parquet(store / "index.parquet", index=False)
    return frame


def test_an_older_single_file_index_is_read_then_moved_into_parts(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    older = _single_file_store(store, 40)

    assert read_index(str(store))["id"].tolist() == older["id"].tolist()  # read as it is
    assert (store / "index.parquet").is_file()  # reading never rewrites it

    note = migrate_index(str(store))
    assert note is not None and "40 row(s) moved" in note
    assert (store / "index.parquet").is_dir() and not list(store.glob(".segflow/index-*"))
    frame = read_index(str(store))
    assert frame["id"].tolist() == older["id"].tolist()
    assert (frame["seconds"] == 0.5).all() and (frame["fingerprint"] == "f").all()
    assert migrate_index(str(store)) is None  # once


def test_a_migration_killed_after_setting_the_file_aside_loses_no_row(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    older = _single_file_store(store, 10)
    aside = store / ".segflow" / "index-single-file.parquet"
    aside.parent.mkdir()
    (store / "index.parquet").rename(aside)  # where a kill after the first step leaves it

    assert read_index(str(store))["id"].tolist() == older["id"].tolist()
    append_records(str(store), "run-2", [{"id": "item0003", "status": "failed"}])
    compact_index(str(store))  # the next compaction finishes the move first
    frame = read_index(str(store)).set_index("id")
    assert not aside.exists() and len(frame) == 10
    assert frame.loc["item0003", "status"] == "failed" and frame.loc["item0004", "status"] == "done"


def test_the_next_run_migrates_an_older_index_with_one_line(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "out.zarr"
    _single_file_store(store, 5)
    for run in ("run-1", "run-2"):
        with caplog.at_level(logging.WARNING, logger="segflow"), writing_store(str(store), run):
            pass
    lines = [r.getMessage() for r in caplog.records if "index.parquet is now" in r.getMessage()]
    assert len(lines) == 1 and "5 row(s) moved" in lines[0]
    assert len(read_index(str(store))) == 5


def test_the_index_in_parts_on_an_object_store(tmp_path: pathlib.Path) -> None:
    """Through fsspec (its in-memory filesystem stands in for S3: no rename, one PUT per
    part): parts written, read back, and an older single file moved into them."""
    import fsspec

    store = f"memory://segflow-test-{tmp_path.name}/out.zarr"
    fs = fsspec.filesystem("memory")
    frame = pd.DataFrame(_rows(12, "done"))
    with fs.open(f"{store}/index.parquet", "wb") as handle:
        frame.to_parquet(handle, index=False)
    assert read_index(store)["id"].tolist() == frame["id"].tolist()

    append_records(store, "run-2", [{"id": "item0005", "status": "failed"}])
    compact_index(store)

    assert fs.isdir(f"{store}/index.parquet") and fs.glob(f"{store}/index.parquet/part-*")
    assert not fs.exists(f"{store}/.segflow/index-single-file.parquet")
    index = read_index(store).set_index("id")["status"]
    assert len(index) == 12 and index["item0005"] == "failed" and index["item0006"] == "done"
    fs.rm(store.removeprefix("memory://").split("/")[0], recursive=True)


def test_the_index_read_through_arrow_gives_the_rows_pandas_gives(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import math

    from segflow.engine import collection
    from segflow.store import index

    store = tmp_path / "out.zarr"
    rows: list[dict[str, object]] = [
        {
            "id": f"item{k:04d}",
            "source": f"/data/item{k:04d}.tif",
            "status": ("done", "failed")[k % 2],
            "shape": (64, 32 + k),
            "object_count": k if k % 3 else None,
            "seconds": 0.5 * k,
            "area_p50": math.nan if k % 4 == 0 else 1.5,
            "resumed": k if k % 5 else None,  # whole numbers with gaps: floats in pandas
            "blocks": k,  # whole numbers without gaps: kept whole
            "ratio": math.nan if k % 2 else 0.25,
            "note": None if k % 2 else "kept",
            "flag": bool(k % 2),
        }
        for k in range(40)
    ]
    write_index(str(store), rows[:30])
    write_index(str(store), [{**row, "seconds": 9.0} for row in rows[25:]])  # some replaced
    # A part another writer left NaN in (segflow writes nulls): pandas reads None.
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    part = store / "index.parquet" / part_name(bucket_of("item0001"))
    table = pq.read_table(part)
    ratio = table.column("ratio").fill_null(math.nan)
    table = table.set_column(table.column_names.index("ratio"), "ratio", ratio)
    pq.write_table(table, part)
    assert pc.sum(pc.is_nan(pq.read_table(part).column("ratio"))).as_py() > 0

    assert index.index_table(str(store)) is not None
    through_arrow = collection.index_rows(str(store))
    monkeypatch.setattr(index, "index_table", lambda store: None)
    through_pandas = collection.index_rows(str(store))
    assert len(through_arrow) == 40
    assert [list(row) for row in through_arrow] == [list(row) for row in through_pandas]
    for fast, slow in zip(through_arrow, through_pandas, strict=True):
        assert {k: (type(v), v) for k, v in fast.items()} == {
            k: (type(v), v) for k, v in slow.items()
        }, fast["id"]
    by_id = {row["id"]: row for row in through_arrow}
    assert by_id["item0005"]["resumed"] is None and by_id["item0006"]["resumed"] == 6.0
    assert by_id["item0004"]["area_p50"] is None and by_id["item0026"]["seconds"] == 9.0


def test_pending_records_are_read_through_pandas(tmp_path: pathlib.Path) -> None:
    from segflow.engine.collection import index_rows
    from segflow.store.index import index_table

    store = tmp_path / "out.zarr"
    write_index(str(store), _rows(3))
    append_records(str(store), "run-2", [{"id": "item0001", "status": "done"}])
    assert index_table(str(store)) is None  # the records are not in the parts yet
    assert [row["status"] for row in index_rows(str(store))] == ["failed", "done", "failed"]

"""The collection catalogue: one GeoParquet row per item, written for the touched items only."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyproj
import rasterio
from affine import Affine
from rasterio.crs import CRS

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader, open_item
from segflow.store.catalogue import BUCKETS, bucket_of, part_name, read_catalogue
from segflow.store.index import append_records, compact_index, read_index, write_index

PIPELINE = [{"op": "threshold", "value": 100}, {"op": "label"}]


def _tile(path: pathlib.Path, *, x0: float, seed: int) -> pathlib.Path:
    image = ((np.random.default_rng(seed).random((30, 40)) > 0.7) * 200).astype(np.uint8)
    with rasterio.open(
        path, "w", driver="GTiff", height=30, width=40, count=1, dtype="uint8",
        crs=CRS.from_epsg(32633), transform=Affine(10.0, 0.0, x0, 0.0, -10.0, 6_000_000.0),
    ) as dst:  # fmt: skip
        dst.write(image[np.newaxis])
    return path


def _segment(store: pathlib.Path, reader: Any) -> dict[str, Any]:
    with LocalExecutor(2) as executor:
        result = segment_item(reader, PIPELINE, store=str(store), block_shape=16, executor=executor)
    assert result.status == "done", result.error
    row: dict[str, Any] = result.as_row()
    return row


def test_catalogue_rows_with_extent_and_a_footprint_a_bbox_selects(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "out.zarr"
    rows = [
        _segment(store, open_item(str(_tile(tmp_path / f"t{k}.tif", x0=x0, seed=k))))
        for k, x0 in enumerate((500_000.0, 700_000.0))
    ]
    plain = np.zeros((20, 30), np.float32)
    plain[2:8, 3:9] = 255
    rows.append(_segment(store, ArrayReader(plain, "plain")))
    append_records(str(store), "run-1", rows)
    assert compact_index(str(store)) == {"t0", "t1", "plain"}

    catalogue = read_catalogue(str(store)).set_index("id")
    index = read_index(str(store)).set_index("id")
    assert sorted(catalogue.index) == ["plain", "t0", "t1"]
    for column in ("status", "fingerprint", "config_hash", "code_version", "object_count"):
        assert catalogue[column].tolist() == index.loc[catalogue.index, column].tolist()
    assert catalogue.loc["t1", "path"] == "t1" and catalogue.loc["t1", "crs"] == "EPSG:32633"
    extent = catalogue.loc["t1", ["minx", "maxx", "miny", "maxy"]].astype(float).tolist()
    assert extent == [700_000.0, 700_400.0, 5_999_700.0, 6_000_000.0]
    # Pixel units, origin the first pixel's centre: the outer edges are half a pixel out.
    assert catalogue.loc["plain", ["minx", "maxx", "miny", "maxy"]].tolist() == [
        -0.5, 29.5, -0.5, 19.5,
    ]  # fmt: skip
    assert catalogue.loc["plain", "geometry"] is None  # not georeferenced
    assert catalogue.crs == "OGC:CRS84"
    lon, lat = pyproj.Transformer.from_crs(32633, 4326, always_xy=True).transform(
        700_200.0, 5_999_850.0
    )
    assert catalogue.loc["t1", "geometry"].contains(gpd.points_from_xy([lon], [lat])[0])

    around_t1 = (lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001)
    found = gpd.read_parquet(store / "catalogue.parquet", bbox=around_t1)
    assert found["id"].tolist() == ["t1"]
    assert read_catalogue(str(store), bbox=around_t1)["id"].tolist() == ["t1"]


def test_a_run_rewrites_only_the_parts_of_the_items_it_touched(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "out.zarr")
    ids = [f"item{i:04d}" for i in range(400)]
    write_index(store, [{"id": i, "status": "failed", "error": "unreadable"} for i in ids])
    parts = tmp_path / "out.zarr" / "catalogue.parquet"
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert len(before) == len({bucket_of(i) for i in ids}) > BUCKETS // 2

    append_records(store, "run-2", [{"id": "item0007", "status": "skipped"}])
    compact_index(store)

    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {part_name(bucket_of("item0007"))}
    frame = pd.read_parquet(parts)  # pandas reads the folder as one table
    assert len(frame) == 400 and frame.set_index("id").loc["item0007", "status"] == "skipped"
    assert frame["path"].isna().all()  # nothing committed: no group to open


def test_open_store_gives_the_catalogue_and_opens_items_lazily(tmp_path: pathlib.Path) -> None:
    import pytest
    from test_metadata import CountingFileSystem, _metadata_read

    import segflow
    from segflow.errors import StoreError

    store = tmp_path / "out.zarr"
    rows = [
        _segment(store, open_item(str(_tile(tmp_path / f"t{k}.tif", x0=x0, seed=k))))
        for k, x0 in enumerate((500_000.0, 700_000.0))
    ]
    append_records(str(store), "run-1", [*rows, {"id": "bad", "status": "failed"}])
    compact_index(str(store))

    import fsspec

    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    opened = segflow.open_store(f"counting://{store}")
    names, _ = _metadata_read(lambda: opened["t1"])
    assert names == {f"{store}/t1/zarr.json"}  # the item's metadata, no other item's
    assert not [p for p, _ in CountingFileSystem.reads if "catalogue" in p]
    assert int(opened["t1"]["labels"].max()) == rows[1]["object_count"]
    assert opened.row("t0")["object_count"] == rows[0]["object_count"]
    assert list(opened) == ["t0", "t1"] and len(opened) == 2  # committed items only
    assert sorted(opened.catalogue["id"]) == ["bad", "t0", "t1"]
    with pytest.raises(KeyError, match="no committed item 'bad'"):
        opened["bad"]
    with pytest.raises(StoreError, match="is not a segflow store"):
        segflow.open_store(str(tmp_path))


def _written(store: pathlib.Path) -> dict[str, Any]:
    """Every file a compaction writes: the index's and the catalogue's parts as Arrow
    tables (with their schemas' metadata), the STAC view and its marker as bytes."""
    out: dict[str, Any] = {}
    for name in ("index.parquet", "catalogue.parquet"):
        for path in sorted((store / name).glob("part-*.parquet")):
            table = pq.read_table(path)
            out[f"{name}/{path.name}"] = (table, table.schema.metadata)
    for path in sorted([*(store / "stac").rglob("*.json"), store / ".segflow" / "stac.json"]):
        out[str(path.relative_to(store))] = path.read_bytes()
    return out


def test_a_compaction_in_chunks_of_parts_writes_what_one_fold_writes(
    tmp_path: pathlib.Path, monkeypatch: Any
) -> None:
    import shutil

    from segflow.store import index

    template = tmp_path / "template" / "out.zarr"
    rows = [
        _segment(template, open_item(str(_tile(tmp_path / f"t{k}.tif", x0=x0, seed=k))))
        for k, x0 in enumerate(500_000.0 + 1_000.0 * k for k in range(6))
    ]
    append_records(str(template), "run-1", rows[:2])
    compact_index(str(template))
    # An older store's STAC view: every Item is written again at the next compaction.
    shutil.rmtree(template / "stac")
    (template / ".segflow" / "stac.json").unlink()
    # A later record of an item wins; extra columns come in another order in another part.
    later = [
        {**rows[2], "zeta": 1.0},
        *rows[3:],
        {**rows[0], "alpha": "a", "zeta": 2.0, "seconds": 9.5},
    ]
    append_records(str(template), "run-2", later)
    append_records(str(template), "run-3", [{**rows[4], "seconds": 7.25}])
    with (template / ".segflow" / "records" / "run-3.jsonl").open("a") as handle:
        handle.write('{"id": "t5", "status": "do')  # a line cut short by a kill
    assert len({bucket_of(str(row["id"])) for row in rows}) > 2  # several chunks below

    merges: list[int] = []
    merge_rows = index._merge_rows
    monkeypatch.setattr(
        index, "_merge_rows", lambda store, new: merges.append(len(new)) or merge_rows(store, new)
    )
    written = {}
    for chunk in (index.CHUNK_ROWS, 1):
        store = tmp_path / f"chunks-{chunk}" / "out.zarr"
        shutil.copytree(template, store, symlinks=True)
        monkeypatch.setattr(index, "CHUNK_ROWS", chunk)
        merges.clear()
        assert compact_index(str(store)) == {"t0", "t2", "t3", "t4", "t5"}
        written[chunk] = _written(store), list(merges)
    (whole, whole_merges), (chunked, chunked_merges) = written.values()
    assert whole_merges == [5] and len(chunked_merges) > 2 and sum(chunked_merges) == 5
    assert whole.keys() == chunked.keys()
    assert len([k for k in whole if k.startswith("stac/items/")]) == 6
    for name, value in whole.items():
        if name.endswith(".parquet"):
            assert value[0].equals(chunked[name][0]) and value[1] == chunked[name][1], name
        else:
            assert value == chunked[name], name
    # Each part's GeoParquet metadata gives its own rows' extent, as geopandas would.
    for path in (tmp_path / "chunks-1" / "out.zarr" / "catalogue.parquet").glob("part-*"):
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]
        part = gpd.read_parquet(path)
        assert geo["geometry_types"] == ["Polygon"] and geo["covering"]
        assert geo["bbox"] == part.total_bounds.tolist(), path.name
    frame = read_index(str(tmp_path / "chunks-1" / "out.zarr")).set_index("id")
    assert frame.loc["t0", "seconds"] == 9.5 and frame.loc["t4", "seconds"] == 7.25
    assert list(frame.columns[-2:]) == ["zeta", "alpha"]  # the order the records gave

"""The STAC view of a georeferenced store: one Item per item, written with the catalogue.

Built on the bundled aerial sample (``tests/data/aerial/RGB.byte.tif``, UTM 18N), read
back with pystac and checked against the core STAC 1.1 schemas pystac ships (offline).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import xarray as xr
import zarr
from pystac.extensions.projection import ProjectionExtension
from pystac.validation import validate_dict
from rasterio.warp import transform_bounds

from segflow.config import load_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader, open_item
from segflow.store.index import append_records, compact_index
from segflow.store.parts import bucket_of, part_name
from segflow.store.stac import part_extent

DATA = pathlib.Path(__file__).parents[1] / "data"
CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
SAMPLE = DATA / "aerial" / "RGB.byte.tif"


def _commit(
    store: pathlib.Path, reader: Any, run_id: str = "run-1", pipeline: Any = None
) -> dict[str, Any]:
    """Segment one item into ``store`` (the aerial config's pipeline) and compact its
    record, as a run's end does."""
    pipeline = pipeline or load_config(CONFIGS / "aerial.yaml").pipeline
    with LocalExecutor(2) as executor:
        result = segment_item(
            reader,
            pipeline,
            store=str(store),
            block_shape=(256, 256),
            executor=executor,
            regions=True,
            vectors=True,
        )
    assert result.status == "done", result.error
    row: dict[str, Any] = result.as_row()
    append_records(str(store), run_id, [row])
    assert compact_index(str(store)) == {row["id"]}
    return row


def _shifted_copy(path: pathlib.Path, dx: float) -> pathlib.Path:
    """The sample tile moved ``dx`` metres east (same pixels, same CRS)."""
    with rasterio.open(SAMPLE) as src:
        profile = src.profile
        data = src.read()
        profile["transform"] = rasterio.Affine.translation(dx, 0.0) @ src.transform
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _validate_core(collection_file: pathlib.Path) -> list[Any]:
    """Every object of the Collection checked against pystac's bundled STAC 1.1 schemas
    (no network: the projection extension's schema is checked in its own test); the
    Items read back."""
    collection = pystac.Collection.from_file(str(collection_file))
    items = list(collection.get_items(recursive=True))
    for obj in [collection, *collection.get_children(), *items]:
        validate_dict(obj.to_dict(include_self_link=False, transform_hrefs=False), extensions=[])
    return items


def _mtimes(folder: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.json")}


def test_an_item_of_the_sample_tile_with_its_footprint_projection_and_assets(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "aerial.zarr"
    reader = open_item(str(SAMPLE))
    row = _commit(store, reader)

    [item] = _validate_core(store / "stac" / "collection.json")
    assert item.id == "RGB.byte" and item.collection_id == "aerial"
    assert (store / "stac" / "items" / "RGB.byte.json").is_file()
    # The bbox is the tile's footprint in lon/lat: its edges densified (21 points each, so
    # 19 between the corners) as rasterio densifies them; the last bits differ between the
    # two transformations' float order, far below a millimetre.
    with rasterio.open(SAMPLE) as src:
        expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=19)
        native, shape, affine = list(src.bounds), [src.height, src.width], src.transform
    np.testing.assert_allclose(item.bbox, expected, rtol=0, atol=1e-9)
    assert item.geometry is not None and item.geometry["type"] == "Polygon"
    proj = ProjectionExtension.ext(item)
    assert proj.code == "EPSG:32618" and proj.shape == shape
    assert proj.transform == list(affine)[:6]
    np.testing.assert_allclose(proj.bbox, native, rtol=0, atol=1e-6)  # type: ignore[arg-type]
    commit = json.loads((store / "RGB.byte" / "zarr.json").read_text())["attributes"]
    commit = commit["segflow_commit"]
    committed = datetime.datetime.fromisoformat(commit["committed"])
    assert item.datetime == committed
    assert item.properties["segflow:version"] == commit["version"]
    assert item.properties["segflow:object_count"] == row["object_count"] > 50

    # Assets: the item's group, its labels array and pyramid, its tables, through the
    # stable STORE/ITEM path (the latest version).
    assets = item.assets
    assert set(assets) == {"zarr", "labels", "labels_pyramid", "vectors", "regions"}
    assert assets["zarr"].href == "../../RGB.byte"
    assert assets["labels"].media_type == "application/vnd.zarr" == assets["zarr"].media_type
    assert assets["vectors"].media_type == "application/vnd.apache.parquet"
    assert assets["labels_pyramid"].roles == ["overview"]
    labels = zarr.open_array(str(store / "RGB.byte" / "labels"), mode="r")[...]
    opened = xr.open_zarr(assets["zarr"].get_absolute_href())
    np.testing.assert_array_equal(opened["labels"].values, labels)
    through = zarr.open_array(assets["labels"].get_absolute_href(), mode="r")
    np.testing.assert_array_equal(through[...], labels)
    vectors = gpd.read_parquet(assets["vectors"].get_absolute_href())
    assert len(vectors) == row["object_count"]

    collection = json.loads((store / "stac" / "collection.json").read_text())
    assert collection["extent"]["spatial"]["bbox"] == [item.bbox]
    # A catalogue part without the GeoParquet bbox column gives the same extent.
    part = pq.read_table(store / "catalogue.parquet" / part_name(bucket_of("RGB.byte")))
    assert part_extent(part.drop_columns(["bbox"])) == part_extent(part)
    assert collection["extent"]["temporal"]["interval"] == [[item.properties["datetime"]] * 2]


def test_a_second_item_updates_the_extent_and_rewrites_only_its_own_files(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "aerial.zarr"
    _commit(store, open_item(str(SAMPLE)))
    first = json.loads((store / "stac" / "items" / "RGB.byte.json").read_text())
    before = _mtimes(store / "stac")

    assert compact_index(str(store)) == set()  # nothing recorded: nothing rewritten
    assert _mtimes(store / "stac") == before

    east = _shifted_copy(tmp_path / "east.tif", dx=300_000.0)
    _commit(store, open_item(str(east)), run_id="run-2")

    items = {i.id: i for i in _validate_core(store / "stac" / "collection.json")}
    assert sorted(items) == ["RGB.byte", "east"]
    assert items["east"].bbox[0] > first["bbox"][2]  # to the east of the first tile
    collection = json.loads((store / "stac" / "collection.json").read_text())
    [[west, south, east_edge, north]] = collection["extent"]["spatial"]["bbox"]
    assert west == first["bbox"][0] and east_edge == items["east"].bbox[2]
    assert south == min(first["bbox"][1], items["east"].bbox[1])
    assert north == max(first["bbox"][3], items["east"].bbox[3])
    interval = collection["extent"]["temporal"]["interval"][0]
    assert interval[0] == first["properties"]["datetime"]
    assert interval[1] == items["east"].properties["datetime"]

    after = _mtimes(store / "stac")
    changed = {name for name in after if before.get(name) != after[name]}
    parts = {f"parts/part-{bucket_of(i):02x}.json" for i in ("east",)}
    assert changed == {"collection.json", "items/east.json", *parts}


def test_a_store_without_georeferenced_items_has_no_stac_folder(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "plain.zarr"
    image = np.zeros((64, 64), np.uint8)
    image[10:30, 10:30] = 200
    pipeline = [{"op": "threshold", "value": 100}, {"op": "label"}]
    _commit(store, ArrayReader(image, "plain"), pipeline=pipeline)
    assert not (store / "stac").exists()

    _commit(store, open_item(str(SAMPLE)), run_id="run-2")  # a georeferenced item comes
    items = _validate_core(store / "stac" / "collection.json")
    assert [i.id for i in items] == ["RGB.byte"]


def test_a_store_whose_stac_view_is_missing_gets_every_item_at_its_next_compaction(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "aerial.zarr"
    _commit(store, open_item(str(SAMPLE)))
    # As a catalogue written before the STAC view: no stac/ folder, no record of it.
    shutil.rmtree(store / "stac")
    (store / ".segflow" / "stac.json").unlink()
    _commit(store, open_item(str(_shifted_copy(tmp_path / "east.tif", 300_000.0))), "run-2")
    assert sorted(i.id for i in _validate_core(store / "stac" / "collection.json")) == [
        "RGB.byte",
        "east",
    ]
    # Its stac/ folder removed by hand: rebuilt whole at the next compaction too.
    shutil.rmtree(store / "stac")
    _commit(store, open_item(str(_shifted_copy(tmp_path / "west.tif", -300_000.0))), "run-3")
    assert sorted(i.id for i in _validate_core(store / "stac" / "collection.json")) == [
        "RGB.byte",
        "east",
        "west",
    ]


def test_the_items_validate_with_the_projection_extension_schema(tmp_path: pathlib.Path) -> None:
    """``validate_all`` fetches the projection extension's schema from its URL; without a
    network this test is skipped (the core schemas are checked offline above)."""
    from pystac.validation.stac_validator import GetSchemaError

    store = tmp_path / "aerial.zarr"
    _commit(store, open_item(str(SAMPLE)))
    collection = pystac.Collection.from_file(str(store / "stac" / "collection.json"))
    try:
        assert collection.validate_all() == 1  # one Item
    except GetSchemaError as error:
        pytest.skip(f"the projection extension's schema cannot be fetched: {error}")

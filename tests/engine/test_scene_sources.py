"""Scenes listed by one file: a GDAL VRT's sources or a STAC catalogue's Items are the tiles,
and give the same scene as the tiles' folder (and as GDAL reads the VRT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _scenes import make_raster
from test_mosaic import cut_scene

from segflow.config import parse_config
from segflow.errors import ItemReadError
from segflow.io import discover_items, open_item

TILES = [(0, 20, 0, 16), (0, 20, 16, 30), (20, 33, 0, 30)]  # rows, cols: a 33 x 30 raster


def write_vrt(path: Path, names: list[str]) -> None:
    """A VRT as gdalbuildvrt writes one: each tile (a path relative to the VRT) a source at
    its place in the union."""
    folder = path.parent
    with rasterio.open(folder / names[0]) as first:
        transform, crs, count, dtype = first.transform, first.crs, first.count, first.dtypes[0]
    places = []
    for name in names:
        with rasterio.open(folder / name) as tile:
            col, row = ~transform @ (tile.transform.c, tile.transform.f)
            places.append((name, round(row), round(col), tile.height, tile.width))
    height = max(r + h for _, r, _, h, _ in places)
    width = max(c + w for _, _, c, _, w in places)
    gdal_type = {"uint8": "Byte", "uint16": "UInt16"}[dtype]
    bands = []
    for band in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{name}</SourceFilename>'
            f"<SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for name, r, c, h, w in places
        )
        bands.append(
            f'<VRTRasterBand dataType="{gdal_type}" band="{band}">{sources}</VRTRasterBand>'
        )
    geo = ", ".join(str(v) for v in transform.to_gdal())
    path.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
        f"<SRS>{crs.to_wkt()}</SRS><GeoTransform>{geo}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )


def _scene(path: Path, **mosaic: object) -> np.ndarray:
    reader = open_item(str(path), mosaic=mosaic or True)
    return reader.read(tuple(slice(0, n) for n in reader.info.spatial_shape))


def test_a_vrt_scene_equals_its_tiles_folder_and_gdals_reading(tmp_path: Path) -> None:
    image = make_raster((33, 30), "uint16", 3)
    cut_scene(tmp_path / "tiles", image, TILES, None)
    vrt = tmp_path / "city.vrt"
    write_vrt(vrt, ["tiles/t00.tif", "tiles/t01.tif", "tiles/t02.tif"])
    scene = _scene(vrt)
    np.testing.assert_array_equal(scene, _scene(tmp_path / "tiles"))
    np.testing.assert_array_equal(scene, image)
    with rasterio.open(vrt) as gdal_view:
        np.testing.assert_array_equal(scene, gdal_view.read())
    [reader], failures = discover_items(str(vrt), mosaic=True)
    assert failures == [] and reader.info.id == "city"


def _item(name: str, href: str, **more: dict) -> dict:
    tiff = "image/tiff; application=geotiff; profile=cloud-optimized"
    assets = {
        "visual": {"href": href, "type": tiff},
        "thumb": {"href": "x.png", "type": "image/png"},
    }
    return {"type": "Feature", "stac_version": "1.0.0", "id": name, "assets": {**assets, **more}}


def test_a_stac_item_collection_and_a_catalogue_give_the_tiles_scene(tmp_path: Path) -> None:
    image = make_raster((33, 30), "uint8", 4)
    cut_scene(tmp_path / "tiles", image, TILES, None)
    items = [_item(f"t{i}", f"tiles/t{i:02d}.tif") for i in range(3)]
    collection = tmp_path / "items.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    np.testing.assert_array_equal(_scene(collection), image)
    # A static catalogue: a root catalogue, a child collection, Item files beside it.
    (tmp_path / "stac" / "c").mkdir(parents=True)
    links = []
    for i in range(3):
        (tmp_path / "stac" / "c" / f"t{i}.json").write_text(
            json.dumps(_item(f"t{i}", f"../../tiles/t{i:02d}.tif"))
        )
        links.append({"rel": "item", "href": f"t{i}.json"})
    child = {"type": "Collection", "id": "c", "links": [{"rel": "root", "href": "../x"}, *links]}
    (tmp_path / "stac" / "c" / "collection.json").write_text(json.dumps(child))
    root = {"type": "Catalog", "id": "r", "links": [{"rel": "child", "href": "c/collection.json"}]}
    (tmp_path / "stac" / "catalog.json").write_text(json.dumps(root))
    np.testing.assert_array_equal(_scene(tmp_path / "stac" / "catalog.json"), image)
    tiles = open_item(str(collection), mosaic=True).info.attrs["tiles"]
    assert [Path(t["path"]).name for t in tiles] == ["t00.tif", "t01.tif", "t02.tif"]


def test_scene_files_that_list_no_usable_tiles_fail_in_one_line(tmp_path: Path) -> None:
    two = {"type": "FeatureCollection", "features": [_item("a", "a.tif", nir={"href": "n.tif",
           "type": "image/tiff"})]}  # fmt: skip
    cases = {
        "two.json": (json.dumps(two), {}, r"set `input.mosaic.asset` to the asset that is the "
                     r"tile \(GeoTIFF assets every Item has: nir, visual\)"),
        "missing.json": (json.dumps(two), {"asset": "red"}, r"STAC Item 'a' has no asset 'red' "
                         r"\(`input.mosaic.asset`; it has: nir, thumb, visual\)"),
        "odd.json": (json.dumps({"type": "Thing"}), {}, r"STAC type 'Thing' is none of"),
        "nested.vrt": ('<VRTDataset><VRTRasterBand><SimpleSource><SourceFilename relativeToVRT='
                       '"1">b.vrt</SourceFilename></SimpleSource></VRTRasterBand></VRTDataset>',
                       {}, r"source 'b.vrt' is a VRT itself"),
        "empty.vrt": ("<VRTDataset/>", {}, r"the VRT names no source files"),
    }  # fmt: skip
    for name, (text, mosaic, message) in cases.items():
        (tmp_path / name).write_text(text)
        readers, failures = discover_items(str(tmp_path / name), mosaic=mosaic or True)
        assert readers == [] and len(failures) == 1, name
        assert failures[0][1].count("\n") == 0
        with pytest.raises(ItemReadError, match=message):
            open_item(str(tmp_path / name), mosaic=mosaic or True)


def test_the_asset_setting_is_in_a_scenes_hash_only_when_set() -> None:
    base = {"input": {"path": "items.json", "mosaic": True}, "output": {"store": "o.zarr"}}
    plain = parse_config({**base, "pipeline": [{"op": "otsu"}]})
    assert "asset" not in plain.result_settings()["input"]["mosaic"]
    chosen = {**base, "input": {"path": "items.json", "mosaic": {"asset": "visual"}}}
    picked = parse_config({**chosen, "pipeline": [{"op": "otsu"}]})
    assert picked.result_settings()["input"]["mosaic"]["asset"] == "visual"
    assert picked.config_hash() != plain.config_hash()

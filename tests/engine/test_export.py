"""Export: COGs equal to the store's arrays, polygons that rasterise back to the labels.

COG: the file opens in rasterio with the item's CRS, transform and every label of the Zarr
array, has nearest-neighbour overviews, and passes rio-cogeo's validation (the check GIS
users run). Polygons: at tolerance 0 an exported object is the set of its pixels exactly
(pixel-corner vertices: a pixel is inside when its centre is), so COCO and GeoJSON
read back as references give the labels bit for bit; with a tolerance ``t`` only pixels
whose centre lies within ``t`` pixels of an object's outline can change.
"""

from __future__ import annotations

import json
import pathlib
import xml.etree.ElementTree as ET

import geopandas
import numpy as np
import pytest
import rasterio
import shapely
import zarr
from pycocotools import mask as coco_mask
from rasterio.crs import CRS
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_validate

from segflow.config import load_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import StoreError
from segflow.evaluate import PolygonReference
from segflow.export import stored_items
from segflow.export.coco import coco_document
from segflow.export.cog import cog_arrays, halve, write_cog
from segflow.export.cvat import cvat_document
from segflow.export.geojson import geojson_document
from segflow.export.polygons import item_polygons, object_classes
from segflow.io import ArrayReader, open_item
from segflow.io.coco import CocoReference

DATA = pathlib.Path(__file__).parents[1] / "data"
CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def aerial(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The bundled aerial tile segmented by the shipped config, in 128^2 chunks (most
    buildings cross chunk faces) with a class map saved beside the labels."""
    store = tmp_path_factory.mktemp("aerial") / "aerial.zarr"
    pipeline = [
        {"op": "luma"},
        {
            "op": "classify",
            "edges": [60, 120],
            "names": ["dark", "mid", "bright"],
            "colors": ["#000000", "#808080", "#ffffff"],
            "save_as": "classes",
        },
        *load_config(CONFIGS / "aerial.yaml").pipeline[2:],
    ]
    result = segment_item(
        open_item(str(DATA / "aerial" / "RGB.byte.tif")), pipeline, store=str(store),
        block_shape=(128, 128), chunks=(128, 128), executor=LocalExecutor(2),
    )  # fmt: skip
    assert result.status == "done", result.error
    return store


def _labels(store: pathlib.Path, item: str, name: str = "labels") -> np.ndarray:
    return zarr.open_array(str(store), path=f"{item}/{name}", mode="r")[...]


def test_cog_has_the_items_grid_and_labels_and_validates(
    aerial: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    [item] = stored_items(str(aerial))
    assert cog_arrays(item) == ["classes", "labels"]
    result = write_cog(item, "labels", tmp_path / "labels.tif", block=128)
    info = open_item(str(DATA / "aerial" / "RGB.byte.tif")).info
    labels = _labels(aerial, item.id)
    with rasterio.open(result.path) as cog:
        assert cog.crs == CRS.from_wkt(info.crs_wkt)
        assert cog.transform == Affine(*info.transform[:6])
        assert cog.dtypes == (str(labels.dtype),) and cog.block_shapes == [(128, 128)]
        np.testing.assert_array_equal(cog.read(1), labels)
        assert cog.overviews(1) == [2, 4, 8] == list(result.overviews)
    expected = labels
    for level in range(len(result.overviews)):
        expected = halve(expected)  # nearest: the second pixel of each pair, the last if odd
        with rasterio.open(result.path, overview_level=level) as overview:
            np.testing.assert_array_equal(overview.read(1), expected)
    assert len(np.unique(expected)) > 20
    assert cog_validate(result.path) == (True, [], [])
    assert not list(tmp_path.glob(".*"))  # no partial file left


def test_class_map_cog_keeps_names_and_colours(
    aerial: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    [item] = stored_items(str(aerial))
    path = write_cog(item, "classes", tmp_path / "classes.tif", block=256).path
    with rasterio.open(path) as cog:
        np.testing.assert_array_equal(cog.read(1), _labels(aerial, item.id, "classes"))
        assert cog.tags(1)["flag_values"] == "1 2 3"
        assert cog.tags(1)["flag_meanings"] == "dark mid bright"
        assert cog.colormap(1)[3] == (255, 255, 255, 255)
        assert cog.descriptions == ("classes",)
    assert cog_validate(path)[0]


def test_cog_refuses_what_it_cannot_hold(aerial: pathlib.Path, tmp_path: pathlib.Path) -> None:
    [item] = stored_items(str(aerial))
    with pytest.raises(StoreError, match=r"item 'RGB.byte': no array 'probabilities' to export"):
        write_cog(item, "probabilities", tmp_path / "p.tif")
    with pytest.raises(StoreError, match=r"`block` \(100\) must be a positive multiple of 16"):
        write_cog(item, "labels", tmp_path / "p.tif", block=100)
    with pytest.raises(StoreError, match=r"--item nope: not a committed item of .*RGB.byte"):
        stored_items(str(aerial), ["nope"])
    with pytest.raises(StoreError, match=r"has no segmented item to export"):
        stored_items(str(tmp_path / "empty.zarr"))


@pytest.fixture(scope="module")
def rings(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Objects cut by every block face of 16^2 blocks: a ring with a hole and an island in
    it, an L, discs, and objects touching through a corner only."""
    image = np.zeros((50, 61), np.float32)
    image[5:35, 8:42] = 1
    image[12:28, 15:30] = 0
    image[18:22, 20:24] = 1
    image[38:48, 2:6] = image[44:48, 2:20] = 1
    yy, xx = np.ogrid[:50, :61]
    for y, x, r in [(8, 50, 5), (30, 52, 6.5), (44, 35, 3)]:
        image[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1
    image[40, 45] = image[41, 46] = 1
    store = tmp_path_factory.mktemp("rings") / "rings.zarr"
    result = segment_item(
        ArrayReader(image, item_id="rings"),
        [{"op": "threshold", "value": 0.5}, {"op": "label", "connectivity": 2}],
        store=str(store), block_shape=16, chunks=(16, 16), executor=LocalExecutor(2),
    )  # fmt: skip
    assert result.status == "done", result.error
    return store


def _from_coco(document: dict, info, path: pathlib.Path) -> np.ndarray:
    """The store's labels as COCO read back: each annotation's pixels get its store id."""
    path.write_text(json.dumps(document))
    ids = np.array([0, *[a["segflow_label"] for a in document["annotations"]]])
    height, width = info.spatial_shape
    return ids[CocoReference(str(path), info).read((slice(0, height), slice(0, width)))[0]]


# pycocotools 2.0.11's decode passes copy=False to an __array__ of its own that numpy 2
# warns about; the masks it returns are right (compared below).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_round_trip_is_exact_at_tolerance_0(rings: pathlib.Path, tmp_path) -> None:
    [item] = stored_items(str(rings))
    labels = _labels(rings, "rings")
    document = coco_document([item_polygons(item, block=16)])
    [image] = document["images"]
    assert (image["width"], image["height"], image["segflow_item"]) == (61, 50, "rings")
    annotations = document["annotations"]
    assert sorted(a["segflow_label"] for a in annotations) == list(range(1, labels.max() + 1))
    ring = next(a for a in annotations if isinstance(a["segmentation"], dict))
    assert ring["area"] == 30 * 34 - 16 * 15 and ring["bbox"] == [8.0, 5.0, 34.0, 30.0]
    info = ArrayReader(np.zeros((50, 61), np.float32), item_id="rings").info
    np.testing.assert_array_equal(_from_coco(document, info, tmp_path / "c.json"), labels)
    for annotation in annotations:  # pycocotools (what CVAT's importer uses) agrees
        segmentation = annotation["segmentation"]
        rle = coco_mask.frPyObjects(segmentation, 50, 61)
        mask = coco_mask.decode(coco_mask.merge(rle) if isinstance(rle, list) else rle)
        np.testing.assert_array_equal(mask.astype(bool), labels == annotation["segflow_label"])
        assert annotation["area"] == (labels == annotation["segflow_label"]).sum()
        assert annotation["iscrowd"] == 0 and annotation["category_id"] == 1


def _cvat_mask(element: ET.Element, size: tuple[int, int]) -> np.ndarray:
    """A CVAT ``<mask>`` decoded as CVAT's format reads it: runs over its box, row by row,
    alternating from background."""
    runs = [int(r) for r in element.attrib["rle"].split(",")]
    box = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
    width, height = int(element.attrib["width"]), int(element.attrib["height"])
    left, top = int(element.attrib["left"]), int(element.attrib["top"])
    mask = np.zeros(size, bool)
    mask[top : top + height, left : left + width] = box.reshape(height, width)
    return mask


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_cvat_round_trip_is_exact_at_tolerance_0(rings: pathlib.Path, tmp_path) -> None:
    """The CVAT 1.1 XML parsed back: polygons rasterised by pycocotools (what CVAT's
    importer uses), grouped polygons one object, masks by CVAT's RLE: the store's labels."""
    [item] = stored_items(str(rings))
    labels = _labels(rings, "rings")
    path = tmp_path / "rings.cvat.xml"
    path.write_text(cvat_document([item_polygons(item, block=16)], task="rings"))
    root = ET.parse(path).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    assert [n.text for n in root.iterfind("meta/task/labels/label/name")] == ["object"]
    [image] = root.findall("image")
    assert image.attrib == {"id": "0", "name": "<array rings>", "width": "61", "height": "50"}
    objects: list[np.ndarray] = []
    groups: dict[str, np.ndarray] = {}
    for shape in image:
        assert shape.attrib["label"] == "object" and shape.attrib["occluded"] == "0"
        if shape.tag == "mask":
            objects.append(_cvat_mask(shape, (50, 61)))
            continue
        assert shape.tag == "polygon"
        xy = [float(v) for pair in shape.attrib["points"].split(";") for v in pair.split(",")]
        pixels = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([xy], 50, 61)))
        group = shape.attrib.get("group_id")
        if group is not None and group in groups:
            groups[group] |= pixels.astype(bool)  # the object's array, already listed
        else:
            objects.append(pixels.astype(bool))
            if group is not None:
                groups[group] = objects[-1]
    assert [s.tag for s in image].count("mask") == 1  # the ring: a hole
    assert len(groups) == 1  # the two pixels touching through a corner: one object
    back = np.zeros_like(labels)
    ids = np.unique(labels[labels > 0])
    assert len(objects) == len(ids)
    for label, pixels in zip(ids, objects, strict=True):
        assert not (back[pixels] != 0).any()  # objects do not overlap
        back[pixels] = label
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("tolerance", [1.0, 2.5])
def test_simplified_polygons_move_only_pixels_near_the_outline(
    rings: pathlib.Path, tmp_path: pathlib.Path, tolerance: float
) -> None:
    [item] = stored_items(str(rings))
    polygons = item_polygons(item)
    labels = _labels(rings, "rings")
    document = coco_document([polygons], tolerance=tolerance)
    exact = coco_document([polygons])
    simpler = sum(len(str(a["segmentation"])) for a in document["annotations"])
    assert simpler < sum(len(str(a["segmentation"])) for a in exact["annotations"])
    info = ArrayReader(np.zeros((50, 61), np.float32), item_id="rings").info
    back = _from_coco(document, info, tmp_path / "c.json")
    rows, cols = np.nonzero(back != labels)
    outlines = shapely.union_all([g.boundary for g in polygons.geometries])
    centres = shapely.points(cols + 0.5, rows + 0.5)
    # Douglas-Peucker keeps the outline within `tolerance` of the original one: a pixel
    # changes only if its centre is that close to an outline.
    assert (shapely.distance(centres, outlines) <= tolerance + 1e-9).all()


def test_geojson_in_pixel_and_crs_coordinates(aerial: pathlib.Path) -> None:
    [item] = stored_items(str(aerial))
    polygons = item_polygons(item, block=200)
    labels = _labels(aerial, item.id)
    pixel = geojson_document([polygons])
    assert "crs" not in pixel and len(pixel["features"]) == labels.max()
    first = pixel["features"][0]
    assert first["properties"] == {"item": "RGB.byte", "label": 1}
    rows, cols = np.nonzero(labels == 1)
    assert shapely.geometry.shape(first["geometry"]).area == len(rows)
    assert shapely.geometry.shape(first["geometry"]).bounds == (
        cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    )  # fmt: skip
    world = geojson_document([polygons], crs=True)
    assert world["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32618"
    # Read back as evaluate reads GeoJSON references (rasterised on the item's grid).
    info = open_item(str(DATA / "aerial" / "RGB.byte.tif")).info
    path = pathlib.Path(str(aerial) + ".geojson")
    path.write_text(json.dumps(world))
    frame = geopandas.read_file(path)  # GDAL's GeoJSON driver reads the `crs` member
    assert frame.crs.to_epsg() == 32618 and len(frame) == labels.max()
    burned = PolygonReference(str(path), info).read((slice(0, 718), slice(0, 791)))[0]
    ids = np.array([0, *[f["properties"]["label"] for f in world["features"]]])
    np.testing.assert_array_equal(ids[burned], labels)


def test_coco_categories_from_a_class_map(aerial: pathlib.Path) -> None:
    [item] = stored_items(str(aerial))
    labels, classes = _labels(aerial, item.id), _labels(aerial, item.id, "classes")
    found = object_classes(item, "labels", "classes", block=100)
    document = coco_document([item_polygons(item)], classes=[found])
    assert found.names == {1: "dark", 2: "mid", 3: "bright"}
    used = {a["category_id"] for a in document["annotations"]}
    assert document["categories"] == [
        {"id": c, "name": found.names[c], "supercategory": ""} for c in sorted(used)
    ]
    for annotation in document["annotations"]:  # the class most of the object's pixels have
        counts = np.bincount(classes[labels == annotation["segflow_label"]], minlength=4)
        assert annotation["category_id"] == int(np.argmax(counts))
    assert len(used) > 1

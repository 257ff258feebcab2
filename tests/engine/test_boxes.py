"""from_boxes: boxes to masks, the same under every block layout, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _layouts import smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from segflow import segment
from segflow.engine.blocks import plan_blocks
from segflow.engine.executor import LocalExecutor
from segflow.engine.pipeline import collection_notes, compile_pipeline
from segflow.engine.run import ArraySink, run_plan
from segflow.errors import ConfigError, PlanError
from segflow.io import discover_items
from segflow.io.boxes import read_boxes, unmatched_rows

DATA = Path(__file__).resolve().parents[1] / "data"
NUCLEI = DATA / "nuclei" / "003cee89357d9fe1"
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def boxes_on(draw: st.DrawFn, shape: tuple[int, int], n: int) -> list[dict]:
    """Boxes anywhere in the image, overlapping each other, some at its border."""
    out = []
    for _ in range(n):
        y0 = draw(st.integers(0, shape[0] - 1))
        x0 = draw(st.integers(0, shape[1] - 1))
        h = draw(st.integers(1, min(14, shape[0] - y0)))
        w = draw(st.integers(1, min(14, shape[1] - x0)))
        out.append({"xmin": x0, "ymin": y0, "xmax": x0 + w, "ymax": y0 + h, "label": "a"})
    return out


@SETTINGS
@given(
    st.integers(8, 50),
    st.integers(8, 50),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["threshold", "watershed", "probability", "fit: box"]),
    st.integers(1, 3),
    st.data(),
)
def test_from_boxes_blockwise_equals_whole_item(
    h: int, w: int, seed: int, method: str, channels: int, data: st.DataObject
) -> None:
    image = np.stack([smooth_noise((h, w), seed + c) for c in range(channels)])
    if method == "probability":
        image = image[:1]
    boxes = data.draw(boxes_on((h, w), data.draw(st.integers(0, 12))))
    blocks = (data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    fit = {"method": "threshold", "fit": "box"} if method == "fit: box" else {"method": method}
    step = {"op": "from_boxes", "boxes": boxes, "margin": 2, **fit}
    whole = segment(image, [step], channel_axis=0)
    result = segment(image, [step], channel_axis=0, block_shape=blocks)
    np.testing.assert_array_equal(result, whole)
    assert result.dtype == np.uint32
    for k, box in enumerate(boxes):  # each object lies inside its box
        outside = np.ones((h, w), dtype=bool)
        outside[box["ymin"] : box["ymax"], box["xmin"] : box["xmax"]] = False
        assert not (whole[outside] == k + 1).any()


def _nuclei() -> tuple[np.ndarray, np.ndarray]:
    import tifffile
    from skimage import io

    return io.imread(NUCLEI / "image.png"), tifffile.imread(NUCLEI / "labels.tif")


def _boxes_of(labels: np.ndarray) -> list[dict]:
    return [
        {"xmin": s[1].start, "ymin": s[0].start, "xmax": s[1].stop, "ymax": s[0].stop}
        for s in ndi.find_objects(labels)
    ]


def _ious(result: np.ndarray, labels: np.ndarray) -> np.ndarray:
    ids = range(1, int(labels.max()) + 1)
    return np.array(
        [((result == k) & (labels == k)).sum() / ((result == k) | (labels == k)).sum() for k in ids]
    )


def test_from_boxes_on_the_bundled_nuclei_from_a_csv(tmp_path: Path) -> None:
    """Boxes drawn from the human masks of the bundled DSB2018 sample give masks close to
    them (measured 0.927 mean IoU, every box above 0.5; the floor leaves room for
    platform differences in the percentile and Otsu arithmetic)."""
    image, labels = _nuclei()
    boxes = _boxes_of(labels)
    csv = tmp_path / "boxes.csv"
    rows = [f"array,{b['xmin']},{b['ymin']},{b['xmax']},{b['ymax']},nucleus" for b in boxes]
    csv.write_text("image_path,xmin,ymin,xmax,ymax,label\n" + "\n".join(rows) + "\n")
    step = {"op": "from_boxes", "boxes": str(csv)}
    result, table = segment(image, [step], channel_axis=-1, block_shape=(96, 80), regions=True)
    assert list(table["box_row"]) == list(table["label"] - 1)  # every box gave an object
    assert set(table["box_label"]) == {"nucleus"}
    ious = _ious(result, labels)
    assert ious.mean() >= 0.9
    assert (ious > 0.5).all()
    classes = segment(image, [{**step, "output": "classes"}], channel_axis=-1)
    np.testing.assert_array_equal(classes, (result > 0).astype(classes.dtype))


def test_fit_box_chooses_each_box_cut_so_its_object_spans_the_box() -> None:
    """A soft-edged blob whose tight box is drawn where it fades: the default cut (0.75 of
    the way to Otsu) leaves it narrower than its box; `fit: box` lowers the cut until the
    object spans it, and keeps `level` where the default already does."""
    yy, xx = np.mgrid[:40, :40]
    blob = np.exp(-((yy - 20.0) ** 2 + (xx - 20.0) ** 2) / (2 * 6.0**2))
    image = (blob * 200 + 10).astype(np.float32)
    box = {"xmin": 8, "ymin": 8, "xmax": 33, "ymax": 33}  # where the blob is 13 % of its peak
    default = segment(image, [{"op": "from_boxes", "boxes": [box]}])
    fitted = segment(image, [{"op": "from_boxes", "boxes": [box], "fit": "box"}])
    spans = ndi.find_objects(fitted.astype(np.uint8))[0]
    assert (spans[0].start, spans[0].stop, spans[1].start, spans[1].stop) == (8, 33, 8, 33)
    default_spans = ndi.find_objects(default.astype(np.uint8))[0]
    assert default_spans[0].stop - default_spans[0].start < 25
    assert fitted.sum() > default.sum() and not (default & ~fitted).any()
    square = np.full((30, 30), 10.0, np.float32)
    square[10:20, 10:20] = 200  # hard edges: every cut spans the box, `level`'s is kept
    sharp = {"xmin": 10, "ymin": 10, "xmax": 20, "ymax": 20}
    for fit in ("level", "box"):
        result = segment(square, [{"op": "from_boxes", "boxes": [sharp], "fit": fit}])
        np.testing.assert_array_equal(result, (square > 100).astype(result.dtype))
    with pytest.raises(ConfigError, match=r"`fit: box` chooses the threshold method's cut"):
        segment(image, [{"op": "from_boxes", "boxes": [box], "fit": "box", "method": "watershed"}])


def test_from_boxes_ids_follow_box_order_and_overlaps_go_to_the_closer_centre() -> None:
    image = np.zeros((20, 30), dtype=np.float32)
    image[4:12, 4:14] = 1
    image[5:11, 12:24] = 1  # a second bright object touching the first
    boxes = [
        {"xmin": 12, "ymin": 5, "xmax": 24, "ymax": 11},
        {"xmin": 4, "ymin": 4, "xmax": 14, "ymax": 12},
    ]
    result = segment(image, [{"op": "from_boxes", "boxes": boxes}])
    assert result[8, 20] == 1 and result[8, 6] == 2
    assert result[8, 13] == 1  # nearer the centre of box 1 (x 17.5) than of box 2 (x 8.5)
    _, table = segment(image, [{"op": "from_boxes", "boxes": boxes}], regions=True)
    assert list(table["label"]) == [1, 2]
    assert list(table["box_row"]) == [0, 1] and list(table["box_label"]) == ["object"] * 2


@pytest.mark.parametrize("block_shape", [(20, 30), (7, 9)])
def test_a_run_counts_the_objects_its_boxes_gave(block_shape: tuple[int, int]) -> None:
    """The item's object count is the boxes that gave an object, not the ids' range: the
    third box lies on flat background and gives none, and ids keep the box order (1, 2, 4)."""
    from segflow.io.zarr import ArrayReader

    image = np.zeros((20, 30), dtype=np.float32)
    image[2:8, 2:8] = 1
    image[11:18, 3:10] = 1
    image[12:18, 20:27] = 1
    boxes = [
        {"xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9},
        {"xmin": 2, "ymin": 10, "xmax": 11, "ymax": 19},
        {"xmin": 12, "ymin": 1, "xmax": 18, "ymax": 7},
        {"xmin": 19, "ymin": 11, "xmax": 28, "ymax": 19},
    ]
    reader = ArrayReader(image, "flat")
    plan = compile_pipeline(
        [{"op": "from_boxes", "boxes": boxes}],
        spatial_ndim=2,
        channels=1,
        dtype=image.dtype,
        item=reader.info,
    )
    grid = plan_blocks(image.shape, block_shape, halo=plan.halo)
    executor = LocalExecutor(1)
    try:
        run = run_plan(reader, plan, grid, executor, make_sink=lambda d: ArraySink())
    finally:
        executor.close()
    ids = np.unique(np.concatenate([np.ravel(s.written[1]) for s in run.blocks]))
    assert list(ids) == [0, 1, 2, 4]
    assert run.n_labels == 3


def _geo_run(pipeline: list[dict], block_shape: tuple[int, int], reader=None) -> np.ndarray:
    if reader is None:
        [reader], _ = discover_items(str(DATA / "aerial"))
    info = reader.info
    plan = compile_pipeline(
        pipeline, spatial_ndim=2, channels=info.n_channels, dtype=info.dtype, item=info
    )
    grid = plan_blocks(info.spatial_shape, block_shape, halo=plan.halo)
    executor = LocalExecutor(1)
    try:
        run = run_plan(reader, plan, grid, executor, make_sink=lambda d: ArraySink())
    finally:
        executor.close()
    out = np.zeros(info.spatial_shape, dtype=run.out_dtype)
    for summary in run.blocks:
        region, data = summary.written
        out[region] = data
    return out


AERIAL_BOXES = [(300, 160, 340, 200), (330, 180, 380, 230), (500, 400, 560, 430)]  # x0 y0 x1 y1


def test_from_boxes_on_rgb_aerial_boxes_in_crs_and_pixels(tmp_path: Path) -> None:
    """The bundled Landsat RGB: boxes as a GeoJSON in the raster's CRS and as a pixel CSV
    give the same objects, each inside its box, the same under two block layouts."""
    [reader], _ = discover_items(str(DATA / "aerial"))
    a, _, c, _, e, f = reader.info.transform[:6]
    features = []
    for x0, y0, x1, y1 in AERIAL_BOXES:
        ring = [[c + a * x, f + e * y] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
        features.append(
            {
                "type": "Feature",
                "properties": {"image_path": "RGB.byte.tif", "label": "field"},
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
            }
        )
    geojson = tmp_path / "boxes.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    csv = tmp_path / "boxes.csv"
    lines = [f"RGB.byte.tif,{x0},{y0},{x1},{y1},field" for x0, y0, x1, y1 in AERIAL_BOXES]
    csv.write_text("image_path,xmin,ymin,xmax,ymax,label\n" + "\n".join(lines) + "\n")
    from_geo = _geo_run([{"op": "from_boxes", "boxes": str(geojson)}], (200, 256))
    from_csv = _geo_run([{"op": "from_boxes", "boxes": str(csv)}], (718, 791))
    np.testing.assert_array_equal(from_geo, from_csv)
    for k, (x0, y0, x1, y1) in enumerate(AERIAL_BOXES):
        inside = from_csv[y0:y1, x0:x1] == k + 1
        assert inside.sum() == (from_csv == k + 1).sum() > 0


def test_from_boxes_reads_coco_bbox_like_the_csv(tmp_path: Path) -> None:
    image, labels = _nuclei()
    boxes = _boxes_of(labels)
    coco = {
        "images": [{"id": 7, "file_name": "array", "height": 256, "width": 256}],
        "categories": [{"id": 1, "name": "nucleus"}],
        "annotations": [
            {
                "id": k,
                "image_id": 7,
                "category_id": 1,
                "bbox": [b["xmin"], b["ymin"], b["xmax"] - b["xmin"], b["ymax"] - b["ymin"]],
            }
            for k, b in enumerate(boxes)
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    from_coco = segment(image, [{"op": "from_boxes", "boxes": str(path)}], channel_axis=-1)
    inline = segment(image, [{"op": "from_boxes", "boxes": boxes}], channel_axis=-1)
    np.testing.assert_array_equal(from_coco, inline)
    coco["images"][0]["width"] = 300
    path.write_text(json.dumps(coco))
    with pytest.raises(
        PlanError, match=r"gives 'array' as 300 x 256 pixels, the image is 256 x 256"
    ):
        segment(image, [{"op": "from_boxes", "boxes": str(path)}], channel_axis=-1)


def test_from_boxes_with_a_model_probability_map() -> None:
    probability = np.zeros((2, 30, 30), dtype=np.float32)
    probability[1, 5:15, 5:15] = 0.9
    probability[1, 20:25, 20:28] = 0.8
    probability[0] = 1 - probability[1]
    boxes = [
        {"xmin": 3, "ymin": 3, "xmax": 17, "ymax": 17},
        {"xmin": 18, "ymin": 18, "xmax": 30, "ymax": 27},
    ]
    step = {"op": "from_boxes", "boxes": boxes, "method": "probability"}
    result = segment(probability, [step], channel_axis=0, block_shape=(10, 10))
    assert (result[5:15, 5:15] == 1).all() and (result == 1).sum() == 100
    assert (result[20:25, 20:28] == 2).all() and (result == 2).sum() == 40


def test_from_boxes_bad_input_one_line_each(tmp_path: Path) -> None:
    image = np.zeros((20, 30), dtype=np.float32)
    outside = [{"xmin": 40, "ymin": 2, "xmax": 50, "ymax": 8}]
    with pytest.raises(
        PlanError,
        match=r"item 'array': box at row 0 of 'inline boxes' \(xmin 40, ymin 2, xmax 50, "
        r"ymax 8\) lies outside the image \(30 x 20 pixels\)",
    ):
        segment(image, [{"op": "from_boxes", "boxes": outside}])
    csv = tmp_path / "flat.csv"
    csv.write_text("image_path,xmin,ymin,xmax,ymax\narray,1,1,5,5\narray,3,4,3,9\n")
    with pytest.raises(
        PlanError, match=r"'.*flat.csv' row 1: zero-area box \(xmin 3, xmax 3, ymin 4, ymax 9\)"
    ):
        segment(image, [{"op": "from_boxes", "boxes": str(csv)}])
    csv = tmp_path / "columns.csv"
    csv.write_text("image,x0,ymin,xmax,ymax\na.tif,1,1,5,5\n")
    with pytest.raises(
        PlanError, match=r"lacks the column\(s\) image_path, xmin; a boxes CSV needs"
    ):
        segment(image, [{"op": "from_boxes", "boxes": str(csv)}])
    with pytest.raises(ConfigError, match=r"pipeline\[0\]\.margin"):
        segment(image, [{"op": "from_boxes", "boxes": [], "margin": 0}])
    with pytest.raises(ConfigError, match=r"pipeline\[0\]\.crs.*'EPSG:99999' is not a CRS"):
        segment(image, [{"op": "from_boxes", "boxes": [], "crs": "EPSG:99999"}])


def test_boxes_for_files_not_in_the_collection_are_listed(tmp_path: Path) -> None:
    csv = tmp_path / "boxes.csv"
    csv.write_text(
        "image_path,xmin,ymin,xmax,ymax,label\n"
        "003cee89357d9fe1/image.png,1,1,5,5,n\n"
        "missing.png,1,1,5,5,n\nmissing.png,2,2,6,6,n\nimage.png,1,1,4,4,n\nimage.png,2,2,4,4,n\n"
    )
    readers, _ = discover_items(str(DATA / "nuclei"))
    notes = collection_notes([{"op": "from_boxes", "boxes": str(csv)}], [r.info for r in readers])
    assert notes == [
        f"pipeline[0] 'from_boxes': {str(csv)!r}: 2 box(es) for 'missing.png' match no item "
        "of the collection"
    ]
    items = [("a", "x/image.png"), ("b", "y/image.png")]
    wrong = unmatched_rows(read_boxes(str(csv)), items)
    assert f"{str(csv)!r}: 2 box(es) for 'image.png' match 2 items" in wrong


def test_a_boxes_file_is_relative_to_its_config_and_its_content_is_in_the_hash(
    tmp_path: Path,
) -> None:
    from segflow.config import load_config

    (tmp_path / "boxes.csv").write_text("image_path,xmin,ymin,xmax,ymax\na.tif,1,1,5,5\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        "input: {path: in}\noutput: {store: out.zarr}\n"
        "pipeline:\n  - {op: from_boxes, boxes: boxes.csv}\n"
    )
    first = load_config(config)
    assert first.pipeline[0]["boxes"] == str(tmp_path / "boxes.csv")
    before = first.config_hash()
    (tmp_path / "boxes.csv").write_text("image_path,xmin,ymin,xmax,ymax\na.tif,1,1,6,5\n")
    changed = load_config(config).config_hash()
    assert changed != before
    # `crs`, added later, is in the hash only when set: configs without it keep theirs
    data = load_config(config).model_dump(mode="json")
    unset = [{"op": "from_boxes", "boxes": str(tmp_path / "boxes.csv")}]
    assert load_config(config).result_settings()["pipeline"][0].keys() >= {"boxes", "margin"}
    assert "crs" not in load_config(config).result_settings()["pipeline"][0]
    from segflow.config import parse_config

    with_crs = parse_config({**data, "pipeline": [{**unset[0], "crs": "EPSG:4326"}]})
    assert with_crs.result_settings()["pipeline"][0]["crs"] == "EPSG:4326"
    assert with_crs.config_hash() != changed
    assert "fit" not in load_config(config).result_settings()["pipeline"][0]  # as `crs`
    fitted = parse_config({**data, "pipeline": [{**unset[0], "fit": "box"}]})
    assert fitted.config_hash() != changed


CUT = 350  # the bundled raster cut into two tiles at this column: box 1 spans the cut


def _tiles(folder: Path) -> dict[str, object]:
    """The bundled RGB.byte.tif as two GeoTIFF tiles, left.tif (columns < CUT) and right.tif."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    folder.mkdir()
    with rasterio.open(DATA / "aerial" / "RGB.byte.tif") as src:
        for name, window in (
            ("left", Window(0, 0, CUT, src.height)),
            ("right", Window(CUT, 0, src.width - CUT, src.height)),
        ):
            profile = dict(src.profile, width=window.width, height=window.height)
            profile["transform"] = src.transform @ Affine.translation(window.col_off, 0)
            with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
    readers, _ = discover_items(str(folder))
    return {reader.info.id: reader for reader in readers}


def _features(rings: list[list[list[float]]]) -> list[dict]:
    return [
        {
            "type": "Feature",
            "properties": {"label": "field"},
            "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        }
        for ring in rings
    ]


def _ring(box: tuple[float, float, float, float]) -> list[list[float]]:
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_geojson_boxes_without_image_path_go_to_the_tiles_they_overlap(tmp_path: Path) -> None:
    """Features without an image_path, in the raster's CRS as its `crs` member says, are
    matched to tiles by location; a box across the cut gives one object in each tile, the
    objects a pixel CSV naming each tile gives (its boxes clipped to the tile)."""
    readers = _tiles(tmp_path / "tiles")
    a, _, c, _, e, f = readers["left"].info.transform[:6]
    crs_boxes = [
        (c + a * x0, f + e * y1, c + a * x1, f + e * y0) for x0, y0, x1, y1 in AERIAL_BOXES
    ]
    geojson = tmp_path / "boxes.geojson"
    collection = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}},
        "features": _features([_ring(box) for box in crs_boxes]),
    }
    geojson.write_text(json.dumps(collection))
    rows = ["image_path,xmin,ymin,xmax,ymax,label"]
    for name, shift, picks in (("left.tif", 0, (0, 1)), ("right.tif", CUT, (1, 2))):
        for k in picks:
            x0, y0, x1, y1 = AERIAL_BOXES[k]
            rows.append(f"{name},{x0 - shift},{y0},{x1 - shift},{y1},field")
    csv = tmp_path / "boxes.csv"
    csv.write_text("\n".join(rows) + "\n")
    for name in ("left", "right"):
        reader = readers[name]
        by_location = _geo_run([{"op": "from_boxes", "boxes": str(geojson)}], (200, 128), reader)
        named = _geo_run([{"op": "from_boxes", "boxes": str(csv)}], (718, 400), reader)
        np.testing.assert_array_equal(by_location, named)
        assert set(np.unique(by_location)) == {0, 1, 2}
    notes = collection_notes(
        [{"op": "from_boxes", "boxes": str(geojson)}], [r.info for r in readers.values()]
    )
    assert notes == []


def test_lonlat_boxes_are_reprojected_and_boxes_off_every_tile_are_listed(tmp_path: Path) -> None:
    """Boxes in longitude/latitude (RFC 7946 GeoJSON: no `crs` member, so `crs: EPSG:4326`
    says it) land on the pixels of the UTM boxes they came from, within the reprojection's
    growth; a box off every tile is listed before anything runs, with the hint."""
    from rasterio.warp import transform_bounds

    from segflow.io.boxes import item_boxes

    readers = _tiles(tmp_path / "tiles")
    info = readers["left"].info
    a, _, c, _, e, f = info.transform[:6]
    lonlat = []
    for x0, y0, x1, y1 in AERIAL_BOXES[:2]:
        bounds = transform_bounds(
            info.crs_wkt, "EPSG:4326", c + a * x0, f + e * y1, c + a * x1, f + e * y0
        )
        lonlat.append(_ring(bounds))
    lonlat.append(_ring((10.0, 50.0, 10.01, 50.01)))  # Germany: on no tile
    geojson = tmp_path / "lonlat.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": _features(lonlat)}))
    found = item_boxes(
        read_boxes(str(geojson)),
        item_id="left",
        item_path=info.path,
        shape=info.spatial_shape,
        transform=info.transform,
        crs="EPSG:4326",
        item_crs=info.crs_wkt,
    )
    assert found.rows == (0, 1)
    for (y0, x0, y1, x1), (bx0, by0, bx1, by1) in zip(found.boxes, AERIAL_BOXES, strict=False):
        assert y0 <= by0 and x0 <= bx0 and y1 >= by1 and x1 >= min(bx1, CUT)
        assert max(by0 - y0, bx0 - x0, y1 - by1) <= 3
    step = {"op": "from_boxes", "boxes": str(geojson), "crs": "EPSG:4326"}
    [note] = collection_notes([step], [r.info for r in readers.values()])
    assert "1 box(es) without an image_path (rows 2) overlap no georeferenced item" in note
    assert "coordinates read in EPSG:4326" in note
    [note] = collection_notes([dict(step, crs=None)], [r.info for r in readers.values()])
    assert "3 box(es) without an image_path (rows 0, 1, 2)" in note
    assert "needs `crs: EPSG:4326`" in note

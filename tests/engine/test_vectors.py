"""GeoParquet vectors equal the polygons of the whole stitched label image.

Blocks polygonise their cores in integer pixel-corner coordinates and the client unites
the pieces of objects cut by block faces; the reference polygonises the whole label array
at once with the same function (``rasterio.features.shapes``). Geometries are compared
by the area of their symmetric difference: both sides are the same point set, only the
float rounding of applying the affine differs (in the last bits of coordinates of order
1e5-1e6), so the tolerance is a tiny fraction of one pixel's area.
"""

from __future__ import annotations

import pathlib
import tempfile
import warnings
from dataclasses import replace

import geopandas as gpd
import numpy as np
import pyarrow
import pytest
import rasterio
import shapely
import zarr
from _layouts import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes
from rasterio.transform import Affine
from scipy import ndimage as ndi

from segflow.config import load_config, parse_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import StoreError
from segflow.io import ArrayReader, open_item
from segflow.store.regions import read_regions
from segflow.store.vectors import (
    ParquetVectorsSink,
    compact_vectors,
    read_vectors,
    write_vectors,
)
from segflow.store.writers import WriteTarget, get_writer

DATA = pathlib.Path(__file__).parents[1] / "data"
CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def _segment(reader, pipeline, store, *, block_shape, regions=True, vectors=True):
    return segment_item(
        reader,
        pipeline,
        store=str(store),
        block_shape=block_shape,
        executor=LocalExecutor(2),
        regions=regions,
        vectors=vectors,
    )


def _whole_polygons(labels: np.ndarray, transform: Affine) -> dict[int, shapely.Geometry]:
    """The reference: every object of the whole label array polygonised at once."""
    parts: dict[int, list[shapely.Geometry]] = {}
    with warnings.catch_warnings():  # shapes() warns that its in-memory copy has no transform
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        polygons = list(
            shapes(labels.astype(np.int32), mask=labels != 0, connectivity=4, transform=transform)
        )
    for geometry, value in polygons:
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geometry))
    return {k: shapely.union_all(v) for k, v in parts.items()}


def _assert_equal_polygons(frame: gpd.GeoDataFrame, labels: np.ndarray, transform: Affine) -> None:
    reference = _whole_polygons(labels, transform)
    assert sorted(frame["label"]) == sorted(reference)
    assert frame["label"].is_unique
    pixel = abs(transform.a * transform.e - transform.b * transform.d)
    ours = frame.set_index("label").geometry
    for label, expected in reference.items():
        got = ours[label]
        assert got.is_valid, label
        # Same point set; coordinates differ only by float rounding of the affine (~1e-10 m
        # at 1e6 m), so any real difference (a missing pixel) is far above 1e-6 pixels.
        assert shapely.symmetric_difference(got, expected).area < 1e-6 * pixel, label
        assert got.area == pytest.approx(expected.area, rel=1e-12)
    if "area" in frame:  # region table joined: polygon area = pixel count * pixel area
        np.testing.assert_allclose(frame.geometry.area, frame["area"] * pixel, rtol=1e-9)


def test_aerial_vectors_equal_whole_array_polygons(tmp_path: pathlib.Path) -> None:
    config = load_config(CONFIGS / "aerial.yaml")
    reader = open_item(str(DATA / "aerial" / "RGB.byte.tif"))
    store = tmp_path / "aerial.zarr"
    # Small blocks: most buildings cross block faces (the tile is 718 x 791).
    result = _segment(reader, config.pipeline, store, block_shape=(64, 64))
    assert result.status == "done", result.error
    labels = zarr.open_array(str(store), path=f"{reader.info.id}/labels", mode="r")[...]
    frame = gpd.read_parquet(store / reader.info.id / "vectors.parquet")
    assert len(frame) == result.object_count == int(labels.max()) > 50
    assert frame.crs == CRS.from_wkt(reader.info.crs_wkt).to_epsg() or frame.crs.equals(
        CRS.from_wkt(reader.info.crs_wkt).to_wkt()
    )
    assert list(frame.columns[:2]) == ["label", "geometry"]
    regions = read_regions(str(store), reader.info.id)
    crossing = (regions["bbox-0"] // 64 != (regions["bbox-2"] - 1) // 64) | (
        regions["bbox-1"] // 64 != (regions["bbox-3"] - 1) // 64
    )
    assert crossing.sum() > 20  # objects cut by block faces, united by the client
    assert frame.sort_values("label")["area"].tolist() == regions["area"].tolist()
    _assert_equal_polygons(frame, labels, Affine(*reader.info.transform[:6]))


def test_ring_keeps_its_hole_across_blocks(tmp_path: pathlib.Path) -> None:
    image = np.zeros((40, 50), np.float32)
    image[5:35, 8:42] = 1
    image[12:28, 15:30] = 0  # the hole, cut by every block face of 16 x 16 blocks
    image[18:22, 20:24] = 1  # an island inside the hole: a second object
    reader = ArrayReader(image, item_id="ring")
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label", "connectivity": 1}]
    result = _segment(reader, pipeline, tmp_path / "s.zarr", block_shape=16, regions=False)
    assert result.status == "done", result.error
    frame = read_vectors(str(tmp_path / "s.zarr")).set_index("label")
    assert frame.crs is None
    assert list(frame.columns) == ["item", "geometry"]
    ring = frame.geometry[1]
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1
    assert ring.area == 30 * 34 - 16 * 15
    # Without a CRS: the item's physical coordinates, where pixel (i, j) is centred on
    # (x=j, y=i) as in the labels' coordinates, so its corners are at half pixels.
    hole = shapely.Polygon(ring.interiors[0])
    assert hole.equals(shapely.box(14.5, 11.5, 29.5, 27.5))
    assert frame.geometry[2].equals(shapely.box(19.5, 17.5, 23.5, 21.5))
    assert len(ring.exterior.coords) == 5  # no vertex left where block pieces met


def test_synthetic_utm_tile_round_trips(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(7)
    height, width = 93, 121
    image = np.zeros((height, width), np.uint16)
    for _ in range(40):  # rectangles and discs of bright values on a dark field
        y, x = rng.integers(0, height), rng.integers(0, width)
        r = int(rng.integers(2, 9))
        yy, xx = np.ogrid[:height, :width]
        image[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 3000
    transform = Affine(2.5, 0.0, 431_000.0, 0.0, -4.0, 5_212_000.0)  # non-square pixels
    path = tmp_path / "utm.tif"
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint16",
        crs=CRS.from_epsg(32633), transform=transform,
    ) as dst:  # fmt: skip
        dst.write(image[np.newaxis])
    reader = open_item(str(path))
    pipeline = [{"op": "threshold", "value": 1000}, {"op": "label", "connectivity": 2}]
    result = _segment(reader, pipeline, tmp_path / "utm.zarr", block_shape=(32, 48))
    assert result.status == "done", result.error
    frame = gpd.read_parquet(tmp_path / "utm.zarr" / "utm" / "vectors.parquet")
    assert frame.crs.to_epsg() == 32633
    labels = zarr.open_array(str(tmp_path / "utm.zarr"), path="utm/labels", mode="r")[...]
    _assert_equal_polygons(frame, labels, transform)
    assert set(frame.geom_type) <= {"Polygon", "MultiPolygon"}
    assert frame.total_bounds[0] >= 431_000.0 and frame.total_bounds[3] <= 5_212_000.0


def test_vectors_refuse_a_volume(tmp_path: pathlib.Path) -> None:
    volume = np.zeros((6, 20, 20), np.float32)
    volume[2:4, 5:9, 5:9] = 1
    reader = ArrayReader(volume, item_id="vol", axes=("z", "y", "x"))
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
    result = _segment(reader, pipeline, tmp_path / "v.zarr", block_shape=8)
    assert result.status == "failed"
    assert str(result.error).startswith(
        "item 'vol' (<array vol>): PlanError: `output.vectors` (true) needs a 2-D item (y, x), "
        "this one has 3 spatial axes ('z', 'y', 'x'): set output.vectors: false for volumes"
    )
    assert not (tmp_path / "v.zarr" / "vol").exists()


def test_vectors_refuse_a_mask_pipeline(tmp_path: pathlib.Path) -> None:
    reader = ArrayReader(np.ones((20, 20), np.float32), item_id="mask")
    pipeline = [{"op": "threshold", "value": 0.5}]
    result = _segment(reader, pipeline, tmp_path / "m.zarr", block_shape=8, regions=False)
    assert result.status == "failed"
    assert "`output.vectors` (true) needs a pipeline that ends in labels, this one gives mask" in (
        str(result.error)
    )


def test_the_vector_writer_refuses_a_missing_or_short_table(tmp_path: pathlib.Path) -> None:
    image = np.zeros((20, 20), np.float32)
    image[2:5, 2:5] = image[10:15, 8:18] = 1
    reader = ArrayReader(image, item_id="two")
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
    store = tmp_path / "s.zarr"
    assert _segment(reader, pipeline, store, block_shape=8).status == "done"
    # The vector writer's commit check: the table is readable with one row per object.
    writer = get_writer("vectors")
    assert writer.verify is not None
    target = WriteTarget(str(store), reader.info, "labels", None, object_count=2)
    writer.verify(target, writer.settings(), ["vectors.parquet"])
    with pytest.raises(StoreError, match=r"item 'two': vectors.parquet has 2 rows for 3 objects"):
        writer.verify(replace(target, object_count=3), writer.settings(), ["vectors.parquet"])
    (store / "two" / "vectors.parquet").unlink()
    with pytest.raises(StoreError, match=r"item 'two': vectors.parquet is unreadable"):
        writer.verify(target, writer.settings(), ["vectors.parquet"])


def test_vectors_are_part_of_the_config_hash() -> None:
    base = {"input": {"path": "in"}, "output": {"store": "out.zarr"}, "pipeline": [{"op": "otsu"}]}
    with_vectors = {**base, "output": {"store": "out.zarr", "vectors": True}}
    assert parse_config(base).config_hash() != parse_config(with_vectors).config_hash()


def _write_tile(path: pathlib.Path, *, epsg: int, x0: float, seed: int) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    image = (rng.random((30, 40)) > 0.7).astype(np.uint8) * 200
    with rasterio.open(
        path, "w", driver="GTiff", height=30, width=40, count=1, dtype="uint8",
        crs=CRS.from_epsg(epsg), transform=Affine(10.0, 0.0, x0, 0.0, -10.0, 6_000_000.0),
    ) as dst:  # fmt: skip
        dst.write(image[np.newaxis])
    return path


def test_collection_vectors_in_one_file_with_an_item_column(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "c.zarr"
    pipeline = [{"op": "threshold", "value": 100}, {"op": "label"}]
    counts = {}
    for k, x0 in enumerate((500_000.0, 500_400.0)):
        reader = open_item(str(_write_tile(tmp_path / f"t{k}.tif", epsg=32633, x0=x0, seed=k)))
        result = _segment(reader, pipeline, store, block_shape=16, regions=k == 0)
        assert result.status == "done", result.error
        counts[reader.info.id] = result.object_count
    path, note = compact_vectors(str(store))
    assert path == f"{store}/vectors.parquet"
    assert note == "vectors.parquet: the vectors of 2 item(s) written"
    assert sorted(p.name for p in (store / "vectors.parquet").iterdir()) == [
        "_segflow.json",
        "part-t0.parquet",
        "part-t1.parquet",
    ]
    frame = gpd.read_parquet(path)
    assert frame.crs.to_epsg() == 32633
    assert list(frame.columns[:3]) == ["item", "label", "geometry"]
    assert frame.groupby("item").size().to_dict() == counts
    assert frame.loc[frame["item"] == "t1", "area"].isna().all()  # t1 had no region table
    assert frame.loc[frame["item"] == "t0", "area"].notna().all()
    pixel = 10.0 * 10.0
    t0 = frame[frame["item"] == "t0"]
    np.testing.assert_allclose(t0.geometry.area, t0["area"] * pixel, rtol=1e-9)
    both = read_vectors(str(store))
    assert len(both) == len(frame) and both.crs.to_epsg() == 32633

    other = open_item(str(_write_tile(tmp_path / "t2.tif", epsg=32634, x0=500_000.0, seed=2)))
    assert _segment(other, pipeline, store, block_shape=16).status == "done"
    part_t1 = (store / "vectors.parquet" / "part-t1.parquet").stat().st_mtime_ns
    path, note = compact_vectors(str(store), items=["t0"])  # a run that redid t0 only
    assert note == "vectors.parquet: the vectors of 1 item(s) written"
    assert (store / "vectors.parquet" / "part-t1.parquet").stat().st_mtime_ns == part_t1
    path, note = compact_vectors(str(store), items=["t2"])
    assert path is None
    assert note.startswith(
        f"the items of {store} have different CRSs (t2's differs): vectors.parquet removed "
        "(read each item's"
    )
    assert not (store / "vectors.parquet").exists()  # never left stale
    assert compact_vectors(str(store), refresh_only=True) == (None, "")
    with pytest.raises(ValueError, match=r"have 2 CRSs .* read them one CRS at a time"):
        read_vectors(str(store))


class _Labels:
    """A label array read like the stored one (``read(region)``)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.labels[region]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(max_side=30), st.sampled_from([1, 2]))
def test_blockwise_polygons_equal_whole_array_polygons(layout, connectivity: int) -> None:
    """Any block layout (one block, even, uneven, 1-pixel blocks), 4- and 8-connected
    objects (8-connected ones touching at a corner become MultiPolygons)."""
    shape, blocks, seed = layout
    mask = np.random.default_rng(seed).random(shape) > 0.55
    structure = ndi.generate_binary_structure(2, connectivity)
    labels, _ = ndi.label(mask, structure)
    transform = Affine(0.5, 0.0, 100.0, 0.0, -2.0, 50.0)
    with tempfile.TemporaryDirectory() as folder:
        sink = ParquetVectorsSink(folder, "item", transform=transform[:6], crs_wkt=None)
        write_vectors(
            _Labels(labels), shape, block_shape=blocks, executor=LocalExecutor(2), sink=sink
        )
        frame = gpd.read_parquet(sink.path)
    assert frame.crs is None
    _assert_equal_polygons(frame, labels, transform)


def test_an_item_without_objects_has_an_empty_table(tmp_path: pathlib.Path) -> None:
    reader = ArrayReader(np.zeros((20, 30), np.float32), item_id="empty")
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
    result = _segment(reader, pipeline, tmp_path / "e.zarr", block_shape=8)
    assert result.status == "done", result.error
    frame = gpd.read_parquet(tmp_path / "e.zarr" / "empty" / "vectors.parquet")
    assert len(frame) == 0 and result.object_count == 0
    assert list(frame.columns[:2]) == ["label", "geometry"] and "area" in frame


def test_vectors_through_an_fsspec_url() -> None:
    """Paths go through fsspec only (stores may be s3://): fsspec's in-memory filesystem."""
    import fsspec

    image = np.zeros((40, 50), np.float32)
    image[5:35, 8:42] = 1
    image[12:28, 15:30] = 0
    store = "memory://vectors-test/out.zarr"
    reader = ArrayReader(image, item_id="ring")
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
    try:
        assert _segment(reader, pipeline, store, block_shape=16).status == "done"
        assert compact_vectors(store)[0] == f"{store}/vectors.parquet"
        frame = read_vectors(store)
        assert frame["item"].tolist() == ["ring"] and frame.geometry[0].area == 30 * 34 - 16 * 15
        with fsspec.open(f"{store}/vectors.parquet/part-ring.parquet", "rb") as handle:
            assert len(gpd.read_parquet(handle)) == 1
        fs = fsspec.filesystem("memory")
        assert not [p for p in fs.find("/vectors-test") if "parts" in p]  # scratch removed
    finally:
        fsspec.filesystem("memory").rm("/vectors-test", recursive=True)


def test_a_collection_file_that_cannot_be_rewritten_is_removed(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "c.zarr"
    pipeline = [{"op": "threshold", "value": 100}, {"op": "label"}]
    for k in range(2):
        reader = open_item(str(_write_tile(tmp_path / f"t{k}.tif", epsg=32633, x0=0.0, seed=k)))
        assert _segment(reader, pipeline, store, block_shape=16).status == "done"
    assert compact_vectors(str(store))[0] is not None
    (store / "t1" / "vectors.parquet").write_bytes(b"not parquet")  # a damaged item table

    with pytest.raises(pyarrow.ArrowInvalid, match="Parquet magic bytes not found"):
        compact_vectors(str(store))

    assert not (store / "vectors.parquet").exists()  # not left holding t1's old rows
    assert not (store / "vectors.parquet.partial").exists()


def test_an_older_stores_vectors_file_becomes_the_folder(tmp_path: pathlib.Path) -> None:
    """A store from before kept one vectors.parquet file: the next compaction (of any item)
    replaces it by the folder of every item's part, and says so."""
    store = tmp_path / "c.zarr"
    pipeline = [{"op": "threshold", "value": 100}, {"op": "label"}]
    for k in range(2):
        reader = open_item(str(_write_tile(tmp_path / f"t{k}.tif", epsg=32633, x0=0.0, seed=k)))
        assert _segment(reader, pipeline, store, block_shape=16).status == "done"
    (store / "vectors.parquet").write_bytes(b"the file an older segflow wrote")

    path, note = compact_vectors(str(store), items=["t1"])

    assert path == f"{store}/vectors.parquet" and "(was one file, now a folder" in note
    frame = gpd.read_parquet(store / "vectors.parquet")
    assert sorted(set(frame["item"])) == ["t0", "t1"] and frame.crs.to_epsg() == 32633

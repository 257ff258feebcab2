"""Region properties merged across blocks equal ``skimage.measure.regionprops_table``.

Tolerances (see ``segflow.stitch.regions``): counts, boxes, minima and maxima exact;
centroids relative 1e-12 (float64 sums in another order); intensity means relative 1e-6,
because scikit-image averages float32 images in float32.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _layouts import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage import measure

from segflow import segment
from segflow.errors import PlanError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _properties(ndim: int) -> tuple[str, ...]:
    return (
        "label",
        "area",
        "bbox",
        "centroid",
        "intensity_mean",
        "intensity_min",
        "intensity_max",
        "equivalent_diameter_area",
    )


def _check(image: np.ndarray, mask: np.ndarray, connectivity: int, blocks: tuple[int, ...]):
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label", "connectivity": connectivity}]
    labels, table = segment(image, pipeline, block_shape=blocks, regions=True)
    structure = ndi.generate_binary_structure(mask.ndim, connectivity)
    reference_labels, n = ndi.label(mask, structure)
    reference = pd.DataFrame(
        measure.regionprops_table(
            reference_labels, intensity_image=image, properties=_properties(mask.ndim)
        )
    )
    assert len(table) == n == int(labels.max())
    assert table["label"].tolist() == list(range(1, n + 1))
    if n == 0:
        return
    # Match each result object to its reference object through any of its pixels.
    to_reference = np.zeros(n + 1, dtype=np.int64)
    to_reference[labels.ravel()] = reference_labels.ravel()
    ours = table.assign(label=to_reference[table["label"]]).set_index("label").sort_index()
    theirs = reference.set_index("label").sort_index()
    exact = ["area", *[f"bbox-{i}" for i in range(2 * mask.ndim)], "intensity_min"]
    exact.append("intensity_max")
    for column in exact:
        np.testing.assert_array_equal(ours[column], theirs[column], err_msg=column)
    for column in [f"centroid-{i}" for i in range(mask.ndim)] + ["equivalent_diameter_area"]:
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-12, err_msg=column)
    np.testing.assert_allclose(ours["intensity_mean"], theirs["intensity_mean"], rtol=1e-6)


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]))
def test_regions_2d(layout: Layout, connectivity: int) -> None:
    shape, blocks, seed = layout
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    _check(image, image > 0.5, connectivity, blocks)


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.sampled_from([1, 3]))
def test_regions_3d(layout: Layout, connectivity: int) -> None:
    shape, blocks, seed = layout
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    _check(image, image > 0.5, connectivity, blocks)


def test_regions_of_one_object_spanning_every_block() -> None:
    image = np.zeros((30, 30), dtype=np.float32)
    image[1:29, 1:29] = 0.75
    image[3:27, 3:27] = 0.0  # a ring through every block of 5^2
    image[10, 10] = 0.9  # and a lone pixel inside one block
    _check(image, image > 0.5, 1, (5, 5))


def test_regions_need_labels() -> None:
    with pytest.raises(PlanError, match="`regions` needs a pipeline that ends in labels"):
        segment(np.zeros((4, 4)), [{"op": "threshold", "value": 0}], regions=True)


def test_segment_item_writes_the_region_table_with_world_coordinates(tmp_path) -> None:
    import dataclasses

    from segflow.io import ArrayReader

    image = np.zeros((40, 50), dtype=np.float32)
    image[2:6, 3:9] = 1.0  # 24 px
    image[20:38, 10:12] = 0.8  # 36 px, crosses blocks of 16
    image[30:32, 40:50] = 0.6  # 20 px, touches the item border
    reader = ArrayReader(image, "tile")
    # A north-up raster: 0.5 m pixels, y decreasing from 1000.
    reader.info = dataclasses.replace(
        reader.info, spacing=(-0.5, 0.5), origin=(1000.0, 200.0), units="m"
    )
    result, table = _threshold_label_regions(reader, tmp_path)
    # The file itself is in label order, as a reader outside segflow finds it.
    raw = pd.read_parquet(tmp_path / "out.zarr" / "tile" / "regions.parquet")
    assert raw["label"].tolist() == [1, 2, 3]
    assert table["area"].tolist() == [24, 36, 20]
    np.testing.assert_allclose(table["area_physical"], [6.0, 9.0, 5.0])
    np.testing.assert_allclose(table["centroid-0"], [3.5, 28.5, 30.5])
    np.testing.assert_allclose(table["centroid_world-0"], 1000.0 - 0.5 * table["centroid-0"])
    np.testing.assert_allclose(table["centroid_world-1"], 200.0 + 0.5 * table["centroid-1"])
    np.testing.assert_allclose(table["intensity_mean"], [1.0, 0.8, 0.6], rtol=1e-6)
    assert (result.area_p05, result.area_p50, result.area_p95) == (20.4, 24.0, 34.8)


@pytest.mark.parametrize(
    "last",
    [
        {"op": "remove_small_objects", "max_size": 3},
        {"op": "clear_border"},
    ],
)
def test_no_class_column_where_the_input_holds_ids_not_classes(tmp_path, last) -> None:
    """Steps that join blocks by the ids they are given (remove_small_objects, clear_border,
    flow_dynamics' size rule) report no ``class`` column: their input is instance ids, and
    the table once showed those (e.g. 2921 for a nucleus) as classes."""
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader
    from segflow.store.regions import read_regions

    image = ndi.gaussian_filter(np.random.default_rng(3).random((60, 70)), 2).astype(np.float32)
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}, last]
    store = str(tmp_path / "ids.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "scene"), pipeline, store=store, block_shape=16,
            executor=executor, regions=True,
        )  # fmt: skip
    assert result.status == "done", result.error
    table = read_regions(store, "scene")
    assert len(table) == result.object_count > 0
    assert "class" not in table.columns


def test_panoptic_output_classes_and_instances(tmp_path) -> None:
    """A saved class map plus per-class instances: ids unique, one class per instance."""
    import xarray as xr

    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader
    from segflow.store import consolidate_store
    from segflow.store.regions import read_regions

    image = np.random.default_rng(3).random((60, 70)).astype(np.float32)
    image = ndi.gaussian_filter(image, 2)
    pipeline = [
        {"op": "classify", "edges": [0.48, 0.52], "save_as": "classes"},  # 1, 2, 3
        {"op": "label", "classes": True, "connectivity": 1},
    ]
    store = str(tmp_path / "panoptic.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "scene"),
            pipeline,
            store=store,
            block_shape=16,
            executor=executor,
            regions=True,
            regions_intensity="classes",  # summarise the saved class map
        )
        wrong = segment_item(
            ArrayReader(image, "other"),
            pipeline,
            store=store,
            block_shape=16,
            executor=executor,
            regions=True,
            regions_intensity="nope",
        )
    assert result.status == "done", result.error
    assert wrong.status == "failed"
    assert "`output.regions_intensity` 'nope' is neither 'input' nor a `save_as` array" in str(
        wrong.error
    )
    consolidate_store(store)
    ds = xr.open_zarr(f"{store}/scene")
    classes, labels = ds["classes"].values, ds["labels"].values
    np.testing.assert_array_equal(classes, np.digitize(image, [0.48, 0.52]) + 1)
    table = read_regions(store, "scene")
    assert len(table) == labels.max() == result.object_count
    class_of = np.zeros(labels.max() + 1, dtype=np.int64)
    class_of[labels.ravel()] = classes.ravel()
    assert (class_of[labels] == classes).all()  # one class per instance
    np.testing.assert_array_equal(table["class"], class_of[table["label"]])
    np.testing.assert_array_equal(table["intensity_max"], table["class"])
    np.testing.assert_array_equal(table["intensity_min"], table["class"])
    reference = 0
    for value in (1, 2, 3):
        reference += ndi.label(classes == value)[1]
    assert labels.max() == reference


def test_objects_in_a_geographic_crs_get_areas_in_square_metres(tmp_path) -> None:
    """EPSG:4326 pixels are degrees: `area_m2` is what pyproj's geodesic polygon areas of
    the objects' pixels add up to (a tile near 60 N, where a degree of longitude is half
    that at the equator)."""
    import dataclasses

    pyproj = pytest.importorskip("pyproj", reason="pyproj (with geopandas, a dev extra)")
    import rasterio.crs

    from segflow.io import ArrayReader

    image = np.zeros((60, 80), dtype=np.float32)
    image[5:25, 10:30] = 1.0  # a square field
    image[30:58, 50:54] = 1.0  # a tall strip crossing blocks
    step = 0.0005  # degrees (about 55 m north-south)
    reader = ArrayReader(image, "tile")
    reader.info = dataclasses.replace(
        reader.info,
        spacing=(-step, step),
        origin=(60.2 - step / 2, 10.0 + step / 2),
        units="degree",
        crs_wkt=rasterio.crs.CRS.from_epsg(4326).to_wkt(),
    )
    _, table = _threshold_label_regions(reader, tmp_path)

    geod = pyproj.Geod(ellps="WGS84")
    expected = []
    for rows, cols in (((5, 25), (10, 30)), ((30, 58), (50, 54))):
        top, bottom = 60.2 - rows[0] * step, 60.2 - rows[1] * step
        left, right = 10.0 + cols[0] * step, 10.0 + cols[1] * step
        area, _ = geod.polygon_area_perimeter(
            [left, right, right, left], [bottom, bottom, top, top]
        )
        expected.append(abs(area))
    np.testing.assert_allclose(table["area_m2"], expected, rtol=1e-6)
    assert table["area_physical"].tolist() == pytest.approx([400 * step**2, 112 * step**2])


def _threshold_label_regions(reader, tmp_path):  # type: ignore[no-untyped-def]
    """Threshold 0.5 and label ``reader`` into ``tmp_path/out.zarr`` with 16 px blocks and
    regions; the item's result and its region table."""
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.store.regions import read_regions

    with LocalExecutor(2) as executor:
        result = segment_item(
            reader,
            [{"op": "threshold", "value": 0.5}, {"op": "label"}],
            store=str(tmp_path / "out.zarr"),
            block_shape=16,
            executor=executor,
            regions=True,
        )
    assert result.status == "done", result.error
    return result, read_regions(str(tmp_path / "out.zarr"), "tile")

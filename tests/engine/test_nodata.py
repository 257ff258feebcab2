"""Nodata: `mask_nodata` turns an item's nodata pixels into NaN, which statistics leave out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from _layouts import layouts, smooth_noise
from affine import Affine
from hypothesis import HealthCheck, given, settings
from skimage.filters import threshold_otsu

from segflow import segment
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import PlanError
from segflow.io import discover_items

Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _with_border(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint16 blobs with a nodata (0) border, like a rotated scene in its bounding box."""
    image = (smooth_noise(shape, seed, sigma=1.0) * 4000 + 1).astype(np.uint16)
    rows, cols = np.indices(shape)
    image[rows + cols < min(shape) // 2] = 0
    return image


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_otsu_of_the_pixels_with_data(layout: Layout) -> None:
    shape, blocks, seed = layout
    image = _with_border(shape, seed)
    values = image[image != 0].astype(np.float32)
    if len(np.unique(values)) < 2:
        return
    step = [{"op": "mask_nodata", "value": 0}, {"op": "otsu"}]
    result = segment(image, step, block_shape=blocks)
    expected = (image != 0) & (image.astype(np.float32) > threshold_otsu(values))
    np.testing.assert_array_equal(result, expected)


def test_the_value_comes_from_the_item_or_must_be_given() -> None:
    plan = compile_pipeline([{"op": "mask_nodata"}], spatial_ndim=2, channels=3, dtype="uint8",
                            nodata=0.0)  # fmt: skip
    assert plan.steps[0].params.value == 0  # type: ignore[attr-defined]
    assert plan.out_dtype == np.float32
    with pytest.raises(PlanError, match=r"pipeline\[0\] 'mask_nodata': the item has no nodata"):
        compile_pipeline([{"op": "mask_nodata"}], spatial_ndim=2, channels=1, dtype="uint8")
    wide = compile_pipeline([{"op": "mask_nodata", "value": 7}], spatial_ndim=2, channels=1,
                            dtype="int32")  # fmt: skip
    assert wide.out_dtype == np.float64  # every int32 value exactly


def test_a_geotiff_nodata_tag_end_to_end(tmp_path: Path) -> None:
    """The GeoTIFF's own nodata value: no `value` in the pipeline, 0 outside the scene."""
    image = _with_border((60, 50), 3)
    path = tmp_path / "scene.tif"
    profile = {"driver": "GTiff", "height": 60, "width": 50, "count": 1, "dtype": "uint16"}
    transform = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
    with rasterio.open(path, "w", **profile, crs="EPSG:32633", transform=transform,
                       nodata=0) as dst:  # fmt: skip
        dst.write(image[np.newaxis])
    (reader,), _ = discover_items(str(path))
    pipeline = [{"op": "mask_nodata"}, {"op": "otsu"}]
    store = tmp_path / "out.zarr"
    with LocalExecutor(2) as executor:
        result = segment_item(reader, pipeline, store=str(store), block_shape=16, executor=executor)
    assert result.status == "done", result.error
    mask = zarr.open_group(store, mode="r")[f"{reader.info.id}/mask"][...]
    values = image[image != 0].astype(np.float32)
    expected = (image != 0) & (image > threshold_otsu(values))
    np.testing.assert_array_equal(mask != 0, expected)


def test_classify_gives_nan_pixels_class_0() -> None:
    image = smooth_noise((20, 30), 1)
    image[2:6, 3:9] = np.nan
    result = segment(image, [{"op": "classify", "edges": [0.45, 0.55]}], block_shape=8)
    expected = (np.digitize(image, [0.45, 0.55]) + 1).astype(np.uint8)
    expected[np.isnan(image)] = 0
    np.testing.assert_array_equal(result, expected)


def test_an_item_nan_mostly_took_says_so_and_one_with_a_little_nan_does_not(
    tmp_path: Path,
) -> None:
    """A NaN row every 7 rows: a Gaussian (sigma 1, reach 2) spreads it over 5 rows of 7
    the item, exactly as scipy does, and Otsu sees what is left. The item is done, and its
    row says how much NaN the statistic saw."""
    from scipy import ndimage

    from segflow.io import ArrayReader

    rng = np.random.default_rng(5)
    image = rng.random((96, 96)).astype(np.float32)
    striped = image.copy()
    striped[::7] = np.nan
    pipeline = [{"op": "gaussian", "sigma": 1, "truncate": 2}, {"op": "otsu"}, {"op": "label"}]

    def run(array: np.ndarray, item_id: str) -> object:
        with LocalExecutor(2) as executor:
            return segment_item(
                ArrayReader(array, item_id),
                pipeline,
                store=str(tmp_path / "out.zarr"),
                block_shape=(32, 32),
                executor=executor,
            )

    striped_result = run(striped, "striped")
    spread = np.isnan(ndimage.gaussian_filter(striped, 1, truncate=2)).mean()  # reference

    assert striped_result.status == "done", striped_result.error  # type: ignore[attr-defined]
    assert striped_result.warning == (  # type: ignore[attr-defined]
        f"pipeline[1].otsu: {spread:.1%} of the item is NaN where this step takes its "
        "statistic (NaN in the input spreads through filters such as gaussian); the result "
        "describes the rest only: fill or mask the NaN first"
    )
    dotted = image.copy()
    dotted[0, :5] = np.nan  # a few NaN pixels: their surroundings only
    assert run(dotted, "dotted").warning is None  # type: ignore[attr-defined]

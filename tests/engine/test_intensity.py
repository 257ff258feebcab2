"""Band steps (`luma`, `rgb`, `expect_bands`) and `classify`'s class names in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray

from segflow import segment
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.engine.pipeline import compile_pipeline, parse_steps
from segflow.errors import ConfigError, PlanError
from segflow.io import ArrayReader
from segflow.ops.intensity import to_luma
from segflow.store import consolidate_store


def test_luma_of_rgba_is_bt601_and_a_single_band_is_kept() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)])
    colour = rng.integers(0, 256, (3, 40, 30), dtype=np.uint8)
    pipeline = [{"op": "luma"}]

    # A grey RGBA image and the same grey as one band give the same values: the weights sum
    # to 1 (0.299 + 0.587 + 0.114), so the luma of (g, g, g) is g up to float32 rounding of
    # the weighted sum (a few ulps of 255).
    from_rgba = segment(rgba, pipeline, block_shape=(16, 16), channel_axis=0)
    from_band = segment(grey[None], pipeline, block_shape=(16, 16), channel_axis=0)
    assert from_rgba.dtype == from_band.dtype == np.float32
    np.testing.assert_allclose(from_rgba, grey, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(from_band, grey.astype(np.float32))

    # Colour: BT.601 per pixel (float64 reference, float32 result), alpha ignored.
    expected = np.tensordot([0.299, 0.587, 0.114], colour.astype(np.float64), axes=(0, 0))
    blockwise = segment(colour, pipeline, block_shape=(7, 9), channel_axis=0)
    np.testing.assert_allclose(blockwise, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(blockwise, to_luma(colour)[0])


def test_luma_refuses_two_bands_at_planning() -> None:
    with pytest.raises(PlanError, match="luma needs 1, 3 or 4 bands"):
        compile_pipeline([{"op": "luma"}], spatial_ndim=2, channels=2, dtype=np.dtype(np.uint8))
    with pytest.raises(ValueError, match="luma needs 1, 3 or 4 channels"):
        to_luma(np.zeros((2, 4, 4)))


def test_rgb_keeps_the_colour_bands_and_refuses_other_counts() -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (4, 20, 30), dtype=np.uint8)

    for image in (rgba, rgba[:3]):
        blockwise = segment(image, [{"op": "rgb"}], block_shape=(8, 8), channel_axis=0)
        np.testing.assert_array_equal(blockwise, rgba[:3])
    for bands in (1, 2, 5):
        with pytest.raises(
            PlanError,
            match=rf"pipeline\[0\] 'rgb': the image has {bands} band\(s\); this step needs "
            r"colour: an RGB or RGBA image \(3 or 4 bands\)",
        ):
            compile_pipeline([{"op": "rgb"}], spatial_ndim=2, channels=bands, dtype="uint8")


def test_expect_bands_passes_the_image_and_names_a_wrong_count() -> None:
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(1, 2, 3, 4) - 10
    steps = [{"op": "expect_bands", "count": 1}]

    same = segment(volume, steps, block_shape=(1, 2, 2), channel_axis=0)

    np.testing.assert_array_equal(same, volume[0])
    with pytest.raises(
        PlanError, match=r"'expect_bands': the image has 3 band\(s\), the pipeline expects 1"
    ):
        compile_pipeline(steps, spatial_ndim=3, channels=3, dtype="int16")


def test_classify_stores_its_class_names_and_colours_with_the_class_map(tmp_path: Path) -> None:
    """Saved (`save_as`) and as the final output: CF flag attributes, and coordinates that
    xarray shows with the array (value -> name, colour); steps after `classify` change the
    values, so the labels after it carry no names."""
    image = np.linspace(-1000, 1000, 40 * 50, dtype=np.float32).reshape(40, 50)
    step = {
        "op": "classify", "edges": [-400, 300], "names": ["air", "soft_tissue", "bone"],
        "colors": ["#000000", "#ff8800", "#ffffffff"],
    }  # fmt: skip
    pipelines = {
        "saved": [{**step, "save_as": "classes"}, {"op": "threshold", "value": 1.5}],
        "final": [step],
    }
    for name, pipeline in pipelines.items():
        store = str(tmp_path / f"{name}.zarr")
        with LocalExecutor(2) as executor:
            result = segment_item(
                ArrayReader(image, "ct"), pipeline, store=store, block_shape=(16, 16),
                executor=executor,
            )  # fmt: skip
        assert result.status == "done", result.error
        consolidate_store(store)
        ds = xarray.open_zarr(f"{store}/ct")
        classes = ds["classes"]

        assert classes.attrs["flag_values"] == [1, 2, 3]
        assert classes.attrs["flag_meanings"] == "air soft_tissue bone"
        assert classes.attrs["class_names"] == ["air", "soft_tissue", "bone"]
        assert classes.attrs["class_colors"] == ["#000000", "#ff8800", "#ffffffff"]
        assert list(ds["classes_value"].values) == [1, 2, 3]
        assert list(ds["classes_name"].values) == ["air", "soft_tissue", "bone"]
        assert {"classes_name", "classes_color"} <= set(ds.coords)
        # The names say what the values are: the bone pixels are the class named "bone".
        names = list(ds["classes_name"].values)
        bone = int(ds["classes_value"].values[names.index("bone")])
        np.testing.assert_array_equal(classes.values == bone, image >= 300)
        if name == "saved":
            assert "flag_values" not in ds["mask"].attrs


def test_classify_names_and_colours_must_match_the_classes() -> None:
    with pytest.raises(ConfigError, match=r"`colors` has 2 entries, `edges` makes 3 classes"):
        parse_steps([{"op": "classify", "edges": [0, 1], "colors": ["#000000", "#ffffff"]}])
    with pytest.raises(ConfigError, match=r"`colors` \['red'\] must be '#rrggbb' or '#rrggbbaa'"):
        parse_steps([{"op": "classify", "edges": [0], "colors": ["red", "#ffffff"]}])
    plan = compile_pipeline(
        [{"op": "classify", "edges": [0]}], spatial_ndim=2, channels=1, dtype="float32"
    )
    assert plan.out_categories == ()  # unnamed: stored as plain class ids

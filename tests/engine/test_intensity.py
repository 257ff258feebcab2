"""The `luma` step: one channel from RGB(A) or from a single band, blockwise as in memory."""

from __future__ import annotations

import numpy as np
import pytest

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import PlanError
from segflow.ops.intensity import to_luma


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

"""Gradients, adaptive thresholds and Canny, blockwise, equal scikit-image on the whole array."""

from __future__ import annotations

import numpy as np
import pytest
from _compare import assert_threshold_equal
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from skimage import data
from skimage.feature import canny
from skimage.filters import scharr, sobel, threshold_local

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import ConfigError, PlanError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


@SETTINGS
@given(layouts(), st.sampled_from(["sobel", "scharr"]))
def test_gradient_magnitude_2d(layout: Layout, name: str) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    result = segment(image, [{"op": name}], block_shape=blocks)
    reference = {"sobel": sobel, "scharr": scharr}[name](image).astype(np.float32)
    np.testing.assert_array_equal(result, reference)


@SETTINGS
@given(layouts(ndim=3, max_side=12))
def test_sobel_3d(layout: Layout) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    result = segment(image, [{"op": "sobel"}], block_shape=blocks)
    np.testing.assert_array_equal(result, sobel(image).astype(np.float32))


@SETTINGS
@given(
    layouts(max_side=48),
    st.sampled_from(["gaussian", "mean", "median"]),
    st.sampled_from([3, 7, 11]),
    st.floats(-0.02, 0.02),
)
@example(((1, 1), (1, 1), 0), "mean", 3, 0.0)  # found by CI: a 1 x 1 image is all ties
def test_threshold_local(layout: Layout, method: str, block_size: int, offset: float) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    step = {"op": "threshold_local", "block_size": block_size, "method": method, "offset": offset}
    result = segment(image, [step], block_shape=blocks)
    threshold = threshold_local(image, block_size, method=method, offset=offset)
    if method == "mean":  # exact arithmetic vs scipy's running sums: equal but at ties
        whole = segment(image, [step], block_shape=image.shape)
        np.testing.assert_array_equal(result, whole)  # independent of the layout
        # A tiny image is mostly its own local mean (1 x 1: every pixel): all ties, which
        # the reference's rounding decides; such an image says nothing of the arithmetic.
        ties = np.isclose(image.astype(np.float64), threshold, rtol=1e-5, atol=1e-5)
        assume(ties.mean() < 0.2)
        assert_threshold_equal(result, image, threshold)
    else:
        np.testing.assert_array_equal(result, image > threshold)


@SETTINGS
@given(layouts(max_side=60), st.floats(0.5, 2.5), st.booleans())
def test_canny_with_global_hysteresis(layout: Layout, sigma: float, integer: bool) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed, sigma=1.0) * 4
    low, high = 0.05, 0.15
    if integer:
        image = (np.clip(image / 4, 0, 1) * 255).astype(np.uint8)
        low, high = 6.0, 20.0  # in the dtype's range, scaled by 255 as scikit-image does
    pipeline = [
        {"op": "canny", "sigma": sigma, "low": low, "high": high},
        {"op": "hysteresis", "low": 0.5, "high": 1.5, "connectivity": 2},
    ]
    result = segment(image, pipeline, block_shape=blocks)
    expected = canny(image, sigma=sigma, low_threshold=low, high_threshold=high)
    np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(
    layouts(max_side=60),
    st.floats(0.5, 2.0),
    st.booleans(),
    st.floats(0.0, 0.9),
    st.floats(0.0, 0.1),
)
@example(layout=((7, 7), (1, 1), 346), sigma=0.5, integer=True, low=0.5, gap=0.0)
@example(layout=((5, 21), (2, 5), 531142), sigma=1.7, integer=True, low=0.5, gap=0.0)
def test_canny_with_quantile_thresholds(
    layout: Layout, sigma: float, integer: bool, low: float, gap: float
) -> None:
    """Thresholds as exact quantiles of the whole item's gradient magnitude."""
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed, sigma=1.0)
    if integer:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    high = min(low + gap, 1.0)
    pipeline = [
        {"op": "canny", "sigma": sigma, "low": low, "high": high, "use_quantiles": True},
        {"op": "hysteresis", "low": 0.5, "high": 1.5, "connectivity": 2},
    ]
    result = segment(image, pipeline, block_shape=blocks)
    whole = segment(image, pipeline, block_shape=shape)
    np.testing.assert_array_equal(result, whole)  # any layout: the whole item's edges
    expected = canny(image, sigma=sigma, low_threshold=low, high_threshold=high, use_quantiles=True)
    # The examples: the median magnitude lies on a pixel that is a maximum, and scikit-image
    # compares it with the threshold rounded to float32 (a C float): rounded up it drops the
    # pixel (7 x 7, found by CI's hypothesis), rounded down it keeps it (5 x 21).
    np.testing.assert_array_equal(result.astype(bool), expected)


def test_canny_quantiles_must_lie_in_0_1() -> None:
    with pytest.raises(ConfigError, match=r"with `use_quantiles`, low/high are 0\.\.1"):
        compile_pipeline(
            [{"op": "canny", "low": 2, "high": 5, "use_quantiles": True}],
            spatial_ndim=2,
            channels=1,
            dtype="float32",
        )


CANNY_EDGES = [
    {"op": "canny"},
    {"op": "hysteresis", "low": 0.5, "high": 1.5, "connectivity": 2},
]


@pytest.mark.parametrize("blocks", [(512, 512), (100, 130)])
def test_canny_default_thresholds_on_an_integer_image_are_scikit_image_defaults(
    blocks: tuple[int, int],
) -> None:
    """Without low/high, 0.1 and 0.2 of the float-converted range (10 % / 20 % of 255):
    once they were taken as 0.1 and 0.2 grey levels, marking about 3x the edges."""
    camera = data.camera()
    result = segment(camera, CANNY_EDGES, block_shape=blocks)
    np.testing.assert_array_equal(result, canny(camera))
    assert 20_000 < result.sum() < 30_000  # the reference itself, not an empty mask


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
def test_canny_defaults_for_other_dtypes(dtype: str) -> None:
    image = smooth_noise((48, 40), 2, sigma=1.0)
    if dtype != "float32":
        image = (image * np.iinfo(dtype).max).astype(dtype)
    result = segment(image, CANNY_EDGES, block_shape=(16, 13))
    np.testing.assert_array_equal(result, canny(image))
    quantiles = [{**CANNY_EDGES[0], "use_quantiles": True}, CANNY_EDGES[1]]
    result = segment(image, quantiles, block_shape=(16, 13))
    np.testing.assert_array_equal(result, canny(image, use_quantiles=True))
    assert result.any()


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
@pytest.mark.parametrize("quantiles", [False, True])
def test_canny_refuses_64_bit_integer_images_as_scikit_image(dtype: str, quantiles: bool) -> None:
    with pytest.raises(ValueError, match="64-bit integer images are not supported"):
        canny(np.zeros((8, 8), dtype=dtype))
    step = {"op": "canny", "use_quantiles": quantiles}
    with pytest.raises(
        PlanError,
        match=rf"pipeline\[0\] 'canny': 64-bit integer images are not supported \(got {dtype}\)",
    ):
        segment(np.zeros((8, 8), dtype=dtype), [step])


def test_canny_high_below_low_after_scaling_is_refused() -> None:
    """A high value given for a uint8 image (10 / 255) below the default low (0.1)."""
    with pytest.raises(ValueError, match="low_threshold should be lower"):
        canny(np.zeros((8, 8), np.uint8), high_threshold=10)
    with pytest.raises(
        PlanError, match=r"pipeline\[0\] 'canny': the high threshold \(0.0392157\) is below"
    ):
        segment(np.zeros((8, 8), np.uint8), [{"op": "canny", "high": 10}])

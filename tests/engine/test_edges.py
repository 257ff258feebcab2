"""Gradients, adaptive thresholds and Canny, blockwise, equal scikit-image on the whole array."""

from __future__ import annotations

import numpy as np
import pytest
from _compare import assert_threshold_equal
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.feature import canny
from skimage.filters import scharr, sobel, threshold_local

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import ConfigError

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
def test_threshold_local(layout: Layout, method: str, block_size: int, offset: float) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    step = {"op": "threshold_local", "block_size": block_size, "method": method, "offset": offset}
    result = segment(image, [step], block_shape=blocks)
    threshold = threshold_local(image, block_size, method=method, offset=offset)
    if method == "mean":  # exact arithmetic vs scipy's running sums: equal but at ties
        assert_threshold_equal(result, image, threshold)
        whole = segment(image, [step], block_shape=image.shape)
        np.testing.assert_array_equal(result, whole)  # and independent of the layout
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
    expected = canny(image, sigma=sigma, low_threshold=low, high_threshold=high, use_quantiles=True)
    np.testing.assert_array_equal(result, expected)


def test_canny_quantiles_must_lie_in_0_1() -> None:
    with pytest.raises(ConfigError, match=r"with `use_quantiles`, low/high are 0\.\.1"):
        compile_pipeline(
            [{"op": "canny", "low": 2, "high": 5, "use_quantiles": True}],
            spatial_ndim=2,
            channels=1,
            dtype="float32",
        )

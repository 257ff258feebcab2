"""Histogram and percentile thresholds of the whole item, blockwise, equal scikit-image's."""

from __future__ import annotations

import numpy as np
import pytest
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.filters import threshold_li, threshold_multiotsu, threshold_triangle, threshold_yen

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import PlanError
from segflow.ops.threshold import triangle_threshold

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _image(shape: tuple[int, ...], seed: int, integer: bool) -> np.ndarray:
    image = smooth_noise(shape, seed, sigma=1.0)
    if integer:  # one histogram bin per value, as scikit-image bins integer images
        return (image * 400).astype(np.uint16)
    return image


@SETTINGS
@given(layouts(), st.booleans(), st.sampled_from(["yen", "triangle"]))
def test_yen_and_triangle(layout: Layout, integer: bool, method: str) -> None:
    shape, blocks, seed = layout
    image = _image(shape, seed, integer)
    if len(np.unique(image)) < 2:
        return  # a constant item: covered below
    result = segment(image, [{"op": method}], block_shape=blocks)
    reference = {"yen": threshold_yen, "triangle": threshold_triangle}[method]
    np.testing.assert_array_equal(result, image > reference(image))


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.booleans(), st.integers(2, 4))
def test_multi_otsu_classes(layout: Layout, integer: bool, classes: int) -> None:
    shape, blocks, seed = layout
    image = _image(shape, seed, integer)
    if len(np.unique(image)) <= classes:
        return  # scikit-image needs more distinct values than classes
    step = {"op": "multi_otsu", "classes": classes}
    result = segment(image, [step], block_shape=blocks)
    # ravel(): the same histogram, without scikit-image's "looks like RGB" warning
    expected = np.digitize(image, threshold_multiotsu(image.ravel(), classes=classes)) + 1
    np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(layouts(), st.floats(0, 100), st.booleans())
def test_threshold_percentile(layout: Layout, q: float, integer: bool) -> None:
    shape, blocks, seed = layout
    image = _image(shape, seed, integer)
    result = segment(image, [{"op": "threshold_percentile", "q": q}], block_shape=blocks)
    np.testing.assert_array_equal(result, image > np.percentile(image, q))


@pytest.mark.parametrize("seed", range(20))
def test_triangle_from_a_histogram_matches_scikit_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Skewed both ways, so the peak's longer tail is on either side.
    image = rng.gamma(2.0, 10.0, size=500) * (1 if seed % 2 else -1)
    counts, edges = np.histogram(image, bins=256, range=(image.min(), image.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    assert triangle_threshold(counts, centers) == threshold_triangle(image)


def test_constant_items_give_their_value() -> None:
    image = np.full((9, 9), 5, dtype=np.uint8)
    for method in ("yen", "triangle"):
        assert not segment(image, [{"op": method}], block_shape=4).any()


@SETTINGS
@given(layouts(), st.sampled_from(["uint8", "uint16", "float64"]))
def test_li(layout: Layout, dtype: str) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed, sigma=1.0).astype(np.float64)
    if dtype != "float64":
        image = (image * 200 + 3).astype(dtype)
    if len(np.unique(image)) < 2:
        return
    tolerance = None if dtype != "float64" else 1e-4
    result = segment(image, [{"op": "li", "tolerance": tolerance}], block_shape=blocks)
    np.testing.assert_array_equal(result, image > threshold_li(image, tolerance=tolerance))


def test_li_needs_a_tolerance_for_float_images() -> None:
    with pytest.raises(PlanError, match="give `tolerance` for float images"):
        compile_pipeline([{"op": "li"}], spatial_ndim=2, channels=1, dtype="float32")

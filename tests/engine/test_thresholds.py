"""Histogram and percentile thresholds of the whole item, blockwise, equal scikit-image's."""

from __future__ import annotations

import numpy as np
import pytest
from _compare import segment_with_timeout
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.filters import (
    threshold_li,
    threshold_multiotsu,
    threshold_otsu,
    threshold_triangle,
    threshold_yen,
)

from segflow import segment
from segflow.engine import run
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import PlanError
from segflow.ops.registry import Done
from segflow.ops.threshold import LiThreshold, triangle_threshold

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _squares_on_zero(n: int) -> list[np.ndarray]:
    """A bright square of values in [0.8, 0.9) on zeros: float Li once never stopped on 3
    of these 10 (the background mean rounded below 0)."""
    squares = []
    for seed in range(n):
        image = np.zeros((64, 64))
        image[20:40, 20:40] = np.random.default_rng(seed).uniform(0.8, 0.9, (20, 20))
        squares.append(image)
    return squares


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


@pytest.mark.parametrize("image", [np.full((9, 9), 5, np.uint8), np.full((9, 9), 0.5)])
def test_multi_otsu_refuses_a_constant_item_as_scikit_image(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="has only 1 different values"):
        threshold_multiotsu(image)
    with pytest.raises(
        ValueError,
        match=r"pipeline\[0\]\.multi_otsu: the item has only 1 distinct value \(0?\.?5\.?0?\): "
        r"it cannot be thresholded in 3 classes",
    ):
        segment(image, [{"op": "multi_otsu"}], block_shape=4)


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


_ON_VALUES = {  # scikit-image / numpy on the item's values (NaN left out), as a 1-D array
    "otsu": lambda v: v > threshold_otsu(v),
    "yen": lambda v: v > threshold_yen(v),
    "triangle": lambda v: v > threshold_triangle(v),
    "li": lambda v: v > threshold_li(v, tolerance=1e-4),
    "threshold_percentile": lambda v: v > np.percentile(v, 30),
    "multi_otsu": lambda v: np.digitize(v, threshold_multiotsu(v, classes=3)) + 1,
}


@SETTINGS
@given(layouts(), st.floats(0, 0.9), st.sampled_from(sorted(_ON_VALUES)), st.data())
def test_nan_pixels_have_no_value(
    layout: Layout, fraction: float, method: str, data: st.DataObject
) -> None:
    """NaN is nodata: every global threshold is the one of the other values, and a NaN pixel
    is background (class 0 for multi_otsu)."""
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed, sigma=1.0).astype(data.draw(st.sampled_from(["f4", "f8"])))
    image[np.random.default_rng(seed).random(shape) < fraction] = np.nan
    values = image[~np.isnan(image)]
    if len(np.unique(values)) <= 3:
        return  # constant items and too few values for 3 classes: covered elsewhere
    step = {"op": method, "q": 30} if method == "threshold_percentile" else {"op": method}
    if method == "li":
        step["tolerance"] = 1e-4
    result = segment(image, [step], block_shape=blocks)
    expected = np.zeros(shape, dtype=result.dtype)
    expected[~np.isnan(image)] = _ON_VALUES[method](values)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("method", ["otsu", "li", "threshold_percentile"])
def test_an_item_of_nan_only_is_refused_by_name(method: str) -> None:
    image = np.full((8, 8), np.nan, dtype=np.float32)
    step = {"op": method, "q": 30} if method == "threshold_percentile" else {"op": method}
    if method == "li":
        step["tolerance"] = 1e-4
    with pytest.raises(ValueError, match=rf"pipeline\[0\]\.{method}: .*no values"):
        segment(image, [step], block_shape=3)


def test_infinite_values_are_refused_where_a_histogram_needs_a_range() -> None:
    image = smooth_noise((20, 20), 0)
    image[3, 4] = np.inf
    with pytest.raises(ValueError, match=r"pipeline\[1\]\.otsu: the item has infinite values"):
        segment(image, [{"op": "gaussian", "sigma": 1}, {"op": "otsu"}], block_shape=7)
    # Percentiles are defined with infinities (numpy orders them; next to one, numpy's
    # interpolation gives NaN, and so no foreground); clipping makes Otsu work.
    for q in (50, 99.9):
        result = segment(image, [{"op": "threshold_percentile", "q": q}], block_shape=7)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(result, image > np.percentile(image, q))
    clipped = segment(image, [{"op": "clip", "high": 1}, {"op": "otsu"}], block_shape=7)
    finite = np.clip(image, None, 1)
    np.testing.assert_array_equal(clipped, finite > threshold_otsu(finite))


def test_li_on_float_images_returns_scikit_image_threshold() -> None:
    """Cases where the background sum once rounded below 0, log gave NaN and the iteration
    never stopped; they run in a child process with a time limit, so a hang fails."""
    cases = [
        # scikit-image test_thresholding.py (test_li_pathological)
        (np.array([[0.1, 0.8, 0.9]]), 0.05, 3),
        *[(square, 1e-3, 64) for square in _squares_on_zero(10)],
        *[(square, 1e-3, 7) for square in _squares_on_zero(3)],
    ]
    results = segment_with_timeout(
        [(image, [{"op": "li", "tolerance": tol}], blocks) for image, tol, blocks in cases],
        seconds=120,
    )
    for (image, tolerance, _), result in zip(cases, results, strict=True):
        np.testing.assert_array_equal(result, image > threshold_li(image, tolerance=tolerance))
    assert threshold_li(cases[0][0], tolerance=0.05) == pytest.approx(0.6)  # as scikit-image's test


def _run_statistic(statistic: LiThreshold, image: np.ndarray) -> object:
    """Drive a statistic over one block to its end, as the engine does."""
    state = statistic.start()
    while True:
        result = statistic.combine([statistic.map(image, state)], state)
        if isinstance(result, Done):
            return result.value
        state = result


def test_li_stops_with_an_error_after_max_passes() -> None:
    image = smooth_noise((40, 40), 0).astype(np.float64)
    # With this tolerance scikit-image iterates 9 times on this image: 3 passes are too few.
    with pytest.raises(
        ValueError, match=r"still moved by .* after 3 passes .*`tolerance` \(1e-12\)"
    ):
        _run_statistic(LiThreshold(1e-12, max_passes=3), image)
    assert _run_statistic(LiThreshold(1e-12), image) == pytest.approx(
        threshold_li(image, tolerance=1e-12), abs=1e-9
    )
    # An integer image: scikit-image's histogram iteration takes 5 steps here.
    integer = (np.random.default_rng(0).gamma(2.0, size=(40, 40)) * 1000).astype(np.uint16)
    with pytest.raises(ValueError, match=r"after 2 passes .*`tolerance` \(0.5\)"):
        _run_statistic(LiThreshold(None, max_passes=2), integer)
    assert _run_statistic(LiThreshold(None), integer) == threshold_li(integer)


def test_a_statistic_that_never_finishes_stops_the_item_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run, "MAX_STATISTIC_PASSES", 3)
    image = smooth_noise((40, 40), 0).astype(np.float64)
    with pytest.raises(RuntimeError, match=r"pipeline\[0\]\.li: .* no result after 3 passes"):
        segment(image, [{"op": "li", "tolerance": 1e-12}], block_shape=16)

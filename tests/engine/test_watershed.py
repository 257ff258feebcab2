"""Watershed splitting across blocks equals the whole-array scikit-image pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _compare import assert_labels_equal, scan_order
from _layouts import smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import sobel
from skimage.segmentation import watershed

from segflow import segment
from segflow.io import discover_items
from segflow.ops.watershed import flooding_order, gradient_markers, rank_order

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def touching_discs(shape: tuple[int, int], seed: int, n: int, radius: int) -> np.ndarray:
    """Discs that overlap in pairs and chains, as nuclei and buildings do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(2, radius + 1)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return mask


def reference(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """The whole-array pipeline; flooding ties broken by scan order (see flooding_order)."""
    regions, _ = ndi.label(mask)
    distance = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(
        distance, min_distance=min_distance, labels=regions, exclude_border=False
    )
    markers = np.zeros(mask.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(flooding_order(distance), markers, mask=mask)


@SETTINGS
@given(
    st.integers(20, 70),
    st.integers(20, 70),
    st.integers(1, 30),
    st.integers(0, 2**32 - 1),
    st.integers(1, 4),
    st.data(),
)
def test_watershed_split_equals_whole_array(
    h: int, w: int, n: int, seed: int, min_distance: int, data: st.DataObject
) -> None:
    mask = touching_discs((h, w), seed, n, radius=6)
    regions, _ = ndi.label(mask)
    extent = max((max(s.stop - s.start for s in o) for o in ndi.find_objects(regions)), default=1)
    blocks = (data.draw(st.integers(4, h)), data.draw(st.integers(4, w)))
    pipeline = [
        {"op": "threshold", "value": 0},
        {"op": "watershed", "min_distance": min_distance, "max_object_size": extent},
        {"op": "label", "classes": True},
    ]
    result = segment(mask.astype(np.uint8), pipeline, block_shape=blocks)
    assert_labels_equal(result, scan_order(reference(mask, min_distance)))


def test_watershed_refuses_regions_larger_than_its_halo() -> None:
    mask = np.zeros((40, 120), dtype=np.uint8)
    mask[10:20, 5:115] = 1  # 110 pixels long
    pipeline = [
        {"op": "threshold", "value": 0},
        {"op": "watershed", "max_object_size": 20},
        {"op": "label", "classes": True},
    ]
    with pytest.raises(ValueError, match=r"`max_object_size` \(20\) must exceed"):
        segment(mask, pipeline, block_shape=(40, 30))
    pipeline[1]["max_object_size"] = 110
    result = segment(mask, pipeline, block_shape=(40, 30))
    assert_labels_equal(result, scan_order(reference(mask.astype(bool), 3)))


def gradient_reference(image: np.ndarray, low: float, high: float, connectivity: int = 1):
    """The whole-array recipe: markers from the intensity, flooding the Sobel gradient (ties
    in scan order, see rank_order), objects = the regions of the object marker."""
    markers = gradient_markers(image, low, high)
    elevation = rank_order(sobel(image.astype(np.float64)))
    return watershed(elevation, markers, connectivity=connectivity) == 2


@SETTINGS
@given(
    st.integers(8, 60),
    st.integers(8, 60),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2]),
    st.booleans(),
    st.data(),
)
def test_marker_watershed_on_the_gradient_equals_whole_array(
    h: int, w: int, seed: int, connectivity: int, integer: bool, data: st.DataObject
) -> None:
    image = smooth_noise((h, w), seed, sigma=2.0)
    if integer:  # plateaus: equal gradients, where the scan-order tie rule matters
        image = (image * 12).astype(np.uint8)
        low, high = 5, 6
    else:
        low, high = 0.45, 0.55
    # Blocks of at least 4 px: the halo here spans the whole image, so each of thousands of
    # 1-px blocks would run a watershed of the whole image (seconds per example).
    blocks = (data.draw(st.integers(min(4, h), h)), data.draw(st.integers(min(4, w), w)))
    step = {
        "op": "marker_watershed",
        "low": low,
        "high": high,
        "max_region_size": max(h, w),
        "connectivity": connectivity,
    }
    result = segment(image, [step], block_shape=blocks)
    np.testing.assert_array_equal(result, gradient_reference(image, low, high, connectivity))


def test_marker_watershed_on_a_real_image_and_its_limit() -> None:
    """The bundled nuclei image: equal to the recipe with scan-order ties, close to plain
    scikit-image (which breaks equal gradients by heap order), and a region wider than
    max_region_size is refused rather than cut."""
    folder = Path(__file__).parents[1] / "data" / "nuclei"
    readers, _ = discover_items(str(folder / "*" / "image.png"))
    image = readers[0].read((slice(0, 256), slice(0, 256)))[1]
    low, high = 20, 60
    step = {"op": "marker_watershed", "low": low, "high": high, "max_region_size": 120}
    expected = gradient_reference(image, low, high)
    for blocks in [(64, 97), (256, 13)]:
        np.testing.assert_array_equal(segment(image, [step], block_shape=blocks), expected)
    plain = watershed(sobel(image.astype(np.float64)), gradient_markers(image, low, high)) == 2
    assert (plain != expected).mean() < 0.01
    with pytest.raises(ValueError, match=r"`max_region_size` \(3\) must exceed"):
        segment(image, [{**step, "max_region_size": 3}], block_shape=(64, 64))


def distance_head_output(mask: np.ndarray, seed: int) -> np.ndarray:
    """What a distance head gives: a foreground logit and a noisy, smooth distance."""
    rng = np.random.default_rng(seed)
    distance = ndi.distance_transform_edt(mask)
    distance = ndi.gaussian_filter(distance + rng.normal(0, 0.3, mask.shape), 1.0)
    logit = np.where(mask, 2.0, -2.0) + rng.normal(0, 0.5, mask.shape)
    return np.stack([logit, distance / max(float(distance.max()), 1.0)]).astype(np.float32)


def distance_reference(head: np.ndarray, min_distance: int, min_peak: float) -> np.ndarray:
    foreground = head[0] > 0
    distance = np.where(foreground, head[1].astype(np.float64), 0.0)
    regions, _ = ndi.label(foreground)
    peaks = peak_local_max(
        distance,
        min_distance=min_distance,
        labels=regions,
        threshold_abs=min_peak,
        exclude_border=False,
    )
    markers = np.zeros(foreground.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(rank_order(-distance, foreground), markers, mask=foreground)


@SETTINGS
@given(
    st.integers(20, 60),
    st.integers(20, 60),
    st.integers(1, 25),
    st.integers(0, 2**32 - 1),
    st.integers(1, 4),
    st.data(),
)
def test_distance_watershed_equals_whole_array(
    h: int, w: int, n: int, seed: int, min_distance: int, data: st.DataObject
) -> None:
    """Instances from a distance head's (foreground, distance) output: any block layout
    gives the whole-array watershed from the predicted distance's peaks."""
    head = distance_head_output(touching_discs((h, w), seed, n, radius=6), seed)
    regions, _ = ndi.label(head[0] > 0)
    extent = max((max(s.stop - s.start for s in o) for o in ndi.find_objects(regions)), default=1)
    blocks = (data.draw(st.integers(4, h)), data.draw(st.integers(4, w)))
    pipeline = [
        {
            "op": "distance_watershed",
            "min_distance": min_distance,
            "min_peak": 0.2,
            "max_object_size": extent,
        },
        {"op": "label", "classes": True},
    ]
    result = segment(head, pipeline, block_shape=blocks, channel_axis=0)
    assert_labels_equal(result, scan_order(distance_reference(head, min_distance, 0.2)))


def test_distance_watershed_needs_two_channels() -> None:
    with pytest.raises(Exception, match="2 channels of a distance head"):
        segment(np.zeros((3, 16, 16), np.float32), [{"op": "distance_watershed"}], channel_axis=0)

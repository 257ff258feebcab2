"""Watershed splitting across blocks equals the whole-array scikit-image pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from _compare import assert_same_labels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from segflow import segment
from segflow.ops.watershed import flooding_order

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
    assert_same_labels(result, reference(mask, min_distance))


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
    assert_same_labels(result, reference(mask.astype(bool), 3))

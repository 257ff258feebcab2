"""The bounded distance transform equals scipy's exact one wherever it is below the bound."""

from __future__ import annotations

import numpy as np
from _compare import assert_labels_equal
from _layouts import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, find_boundaries

from segflow import segment
from segflow.engine.pipeline import compile_pipeline

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _reference(mask: np.ndarray, spacing: tuple[float, ...], bound: float) -> np.ndarray:
    distance = ndi.distance_transform_edt(mask, sampling=spacing)
    return np.minimum(distance.astype(np.float32), np.float32(bound))


@SETTINGS
@given(
    layouts(max_side=40),
    st.tuples(st.sampled_from([0.5, 1.0, 2.5]), st.sampled_from([0.3, 1.0, 2.0])),
    st.floats(0.5, 6.0),
)
def test_distance_transform_2d(layout: Layout, spacing: tuple[float, float], bound: float) -> None:
    shape, blocks, seed = layout
    mask = np.random.default_rng(seed).random(shape) < 0.93
    mask.flat[0] = False  # at least one background pixel: see the docstring for none
    pipeline = [{"op": "distance_transform", "max_distance": bound}]
    result = segment(mask.astype(np.uint8), pipeline, block_shape=blocks, spacing=spacing)
    np.testing.assert_array_equal(result, _reference(mask, spacing, bound))


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.floats(0.5, 4.0))
def test_distance_transform_3d_anisotropic(layout: Layout, bound: float) -> None:
    shape, blocks, seed = layout
    mask = np.random.default_rng(seed).random(shape) < 0.9
    mask.flat[-1] = False
    spacing = (2.0, 0.7, 0.7)  # thick slices, as in CT
    pipeline = [{"op": "distance_transform", "max_distance": bound}]
    result = segment(mask.astype(np.uint8), pipeline, block_shape=blocks, spacing=spacing)
    np.testing.assert_array_equal(result, _reference(mask, spacing, bound))


def test_distance_saturates_far_from_background_and_halo_follows_spacing() -> None:
    mask = np.ones((50, 50), dtype=np.uint8)
    mask[0, 0] = 0
    result = segment(mask, [{"op": "distance_transform", "max_distance": 10}], block_shape=8)
    np.testing.assert_array_equal(result, _reference(mask.astype(bool), (1.0, 1.0), 10))
    assert result.max() == 10 and result[0, 1] == 1
    plan = compile_pipeline(
        [{"op": "distance_transform", "max_distance": 3.0}],
        spatial_ndim=3,
        channels=1,
        dtype="uint8",
        spacing=(-2.0, 0.5, 0.75),
    )
    assert plan.halo == (2, 6, 4)  # ceil(3 / |spacing|) per axis


@SETTINGS
@given(layouts(max_side=36), st.floats(0.5, 4.0), st.sampled_from([(1.0, 1.0), (2.0, 0.5)]))
def test_expand_labels_after_stitching(
    layout: Layout, distance: float, spacing: tuple[float, float]
) -> None:
    shape, blocks, seed = layout
    mask = np.random.default_rng(seed).random(shape) < 0.12
    pipeline = [
        {"op": "threshold", "value": 0},
        {"op": "label"},
        {"op": "expand_labels", "distance": distance},
    ]
    result = segment(mask.astype(np.uint8), pipeline, block_shape=blocks, spacing=spacing)
    labels, _ = ndi.label(mask)
    expected = expand_labels(labels, distance=distance, spacing=spacing)
    assert_labels_equal(result, expected)


@SETTINGS
@given(layouts(max_side=36), st.sampled_from(["thick", "inner", "outer"]), st.sampled_from([1, 2]))
def test_label_boundaries_after_stitching(layout: Layout, mode: str, connectivity: int) -> None:
    shape, blocks, seed = layout
    mask = np.random.default_rng(seed).random(shape) < 0.4
    pipeline = [
        {"op": "threshold", "value": 0},
        {"op": "label", "connectivity": 2},
        {"op": "label_boundaries", "mode": mode, "connectivity": connectivity},
    ]
    result = segment(mask.astype(np.uint8), pipeline, block_shape=blocks)
    labels, _ = ndi.label(mask, ndi.generate_binary_structure(2, 2))
    expected = find_boundaries(labels, connectivity=connectivity, mode=mode)
    np.testing.assert_array_equal(result, expected)

"""crf: mean-field refinement of a probability map; blockwise equals whole item."""

from __future__ import annotations

import numpy as np
import pytest
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflow import segment
from segflow.errors import PlanError
from segflow.ops.crf import CrfParams, refine_with_crf
from segflow.ops.registry import OpContext

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _map_of(image: np.ndarray) -> list[dict]:
    """A probability map from the image (a stand-in for a model step): smoothed, windowed."""
    return [{"op": "gaussian", "sigma": 1.0}, {"op": "window", "low": 0.3, "high": 0.7}]


@SETTINGS
@given(
    layouts(max_side=36),
    st.integers(1, 3),
    st.floats(1.0, 3.0),
    st.sampled_from(["pixel", "physical"]),
)
def test_crf_blockwise_equals_whole_item(
    layout: tuple[tuple[int, ...], tuple[int, ...], int],
    iterations: int,
    radius: float,
    units: str,
) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    step = {"op": "crf", "iterations": iterations, "radius": radius, "colour_sigma": 0.1}
    step["units"] = units
    spacing = (0.5, 1.0) if units == "physical" else None
    pipeline = [*_map_of(image), step]
    whole = segment(image, pipeline, spacing=spacing)
    result = segment(image, pipeline, block_shape=blocks, spacing=spacing)
    # Bit for bit: every pixel sums the same neighbours in the same order on any layout.
    np.testing.assert_array_equal(result, whole)


def test_crf_follows_the_image_edge() -> None:
    """A blurred map of a sharp square: the CRF pulls the 0.5 contour onto the edge the
    guide shows (the map's own contour lies 3 px out), and the result stays probabilities."""
    image = np.zeros((40, 40), dtype=np.float32)
    image[10:30, 10:30] = 255
    truth = image > 0
    blurred = np.zeros((40, 40), dtype=np.float32)
    blurred[7:33, 7:33] = 0.8  # the map oversegments by 3 px on every side
    ctx = OpContext(spatial_ndim=2, source=image[np.newaxis], spacing=(1.0, 1.0))
    refined = refine_with_crf(blurred[np.newaxis], CrfParams(iterations=5), ctx)[0]
    before = ((blurred > 0.5) != truth).sum()
    after = ((refined > 0.5) != truth).sum()
    assert before == 26 * 26 - 400
    assert after < before / 4
    assert refined.min() >= 0 and refined.max() <= 1
    classes = refine_with_crf(blurred[np.newaxis], CrfParams(output="classes"), ctx)[0]
    np.testing.assert_array_equal(classes, refined > 0.5)


def test_crf_refuses_a_map_that_is_not_probabilities() -> None:
    image = np.linspace(0, 10, 400, dtype=np.float32).reshape(20, 20)
    with pytest.raises(
        ValueError,
        match=r"crf needs a probability map \(values in \[0, 1\]\), "
        r"got values from 0 to 10",
    ):
        segment(image, [{"op": "crf"}])
    with pytest.raises(
        PlanError,
        match=r"crf needs a probability map \(floats in \[0, 1\]\), "
        r"its input is uint8",
    ):
        segment(image.astype(np.uint8), [{"op": "crf"}])
    two = np.stack([image / 10, image / 10])
    with pytest.raises(ValueError, match=r"2 channels sum to 1, some sum to 2"):
        segment(two, [{"op": "crf"}], channel_axis=0)


def _touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two bright squares touching along a 1-px line, and a background / interior /
    boundary map of them (the nuclei U-Net's head): 0.7 on each pixel's class, 0.15 on the
    others."""
    image = np.zeros((30, 41), dtype=np.float32)
    image[8:22, 5:36] = 200
    truth = np.zeros((30, 41), dtype=np.int64)
    truth[8:22, 5:36] = 1
    truth[8:22, 20] = 2  # the boundary between the two squares
    probabilities = np.full((3, 30, 41), 0.15, dtype=np.float32)
    np.put_along_axis(probabilities, truth[np.newaxis], 0.7, axis=0)
    return image, probabilities


def test_crf_foreground_keeps_a_thin_boundary_class() -> None:
    """A CRF over every class smooths the 1-px boundary away (the two objects merge);
    with `foreground: [1, 2]` it refines background against interior + boundary only, and
    interior and boundary keep their ratio, so the boundary stays."""
    image, probabilities = _touching_pair()
    ctx = OpContext(spatial_ndim=2, source=image[np.newaxis], spacing=(1.0, 1.0))
    every = refine_with_crf(probabilities, CrfParams(output="classes"), ctx)[0]
    assert not (every == 2).any()
    params = CrfParams(foreground=[1, 2])
    refined = refine_with_crf(probabilities, params, ctx)
    np.testing.assert_allclose(refined.sum(axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(refined[1] * probabilities[2], refined[2] * probabilities[1],
                               atol=1e-6)  # fmt: skip
    classes = refine_with_crf(probabilities, CrfParams(foreground=[1, 2], output="classes"), ctx)
    np.testing.assert_array_equal(classes[0], np.argmax(probabilities, axis=0))


def test_crf_foreground_names_channels_of_the_map() -> None:
    image, probabilities = _touching_pair()
    ctx = OpContext(spatial_ndim=2, source=image[np.newaxis], spacing=(1.0, 1.0))
    for channels, line in [
        ([1, 3], r"crf `foreground` \[1, 3\]: the map has channels 0 to 2"),
        ([0, 1, 2], r"crf `foreground` \[0, 1, 2\]: every channel, no background left"),
    ]:
        with pytest.raises(ValueError, match=line):
            refine_with_crf(probabilities, CrfParams(foreground=channels), ctx)


@pytest.mark.parametrize("blocks", [(7, 9), (16, 16), (30, 5)])
def test_crf_foreground_blockwise_equals_whole_item(blocks: tuple[int, int]) -> None:
    """Grouping is per pixel before and after the updates: the halo is unchanged."""
    _, probabilities = _touching_pair()
    noise = np.random.default_rng(0).uniform(0.0, 0.2, probabilities.shape).astype(np.float32)
    noisy = (probabilities + noise) / (probabilities + noise).sum(axis=0, keepdims=True)
    step = {"op": "crf", "foreground": [1, 2], "iterations": 2, "radius": 3}
    whole = segment(noisy, [step], channel_axis=0)
    np.testing.assert_array_equal(segment(noisy, [step], channel_axis=0, block_shape=blocks), whole)

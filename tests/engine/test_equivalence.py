"""Chunked equals whole: every operation, run blockwise, equals its whole-array reference.

Hypothesis draws item shapes and block shapes, including blocks of one pixel along an axis,
uneven last blocks and blocks much smaller than the halo. Integer and boolean outputs must be
bit-exact; labels too: ids follow each object's first pixel in scan order, as
``scipy.ndimage.label`` numbers them, whatever the blocks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _compare import assert_labels_equal
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage import morphology
from skimage.filters import threshold_otsu

from segflow import segment
from segflow.stitch.labels import NO_PIXEL, first_pixels

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


FIXED_LAYOUTS = [(1, 1), (7, 5), (16, 16), (64, 64), (13, 64), (100, 3)]


def _binary_opening_reference(mask: np.ndarray, radius: int) -> np.ndarray:
    with warnings.catch_warnings():
        # scikit-image deprecates binary_* in favour of the grey-level versions; the binary
        # ones are still the reference for mode="ignore" semantics.
        warnings.simplefilter("ignore", FutureWarning)
        return morphology.binary_opening(mask, morphology.disk(radius))


def _binary_closing_reference(mask: np.ndarray, radius: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return morphology.binary_closing(mask, morphology.disk(radius))


@pytest.mark.parametrize("block_shape", FIXED_LAYOUTS)
def test_gaussian_otsu_label_pipeline_fixed_layouts(block_shape: tuple[int, int]) -> None:
    image = smooth_noise((61, 97), seed=3)
    pipeline = [
        {"op": "gaussian", "sigma": 2},
        {"op": "otsu"},
        {"op": "binary_opening", "radius": 1},
        {"op": "label", "connectivity": 2},
    ]
    result = segment(image, pipeline, block_shape=block_shape)
    smoothed = ndi.gaussian_filter(image, 2)
    mask = _binary_opening_reference(smoothed > threshold_otsu(smoothed), 1)
    reference, _ = ndi.label(mask, structure=np.ones((3, 3)))
    assert_labels_equal(result, reference)


@SETTINGS
@given(layouts())
def test_gaussian(layout: tuple[tuple[int, ...], tuple[int, ...], int]) -> None:
    shape, blocks, seed = layout
    image = np.random.default_rng(seed).random(shape).astype(np.float32)
    for mode in ("reflect", "nearest", "constant"):
        result = segment(
            image, [{"op": "gaussian", "sigma": 1.3, "mode": mode}], block_shape=blocks
        )
        # Bit-exact: each output pixel is computed from the same inputs in the same order.
        np.testing.assert_array_equal(result, ndi.gaussian_filter(image, 1.3, mode=mode))


@SETTINGS
@given(layouts())
def test_gaussian_anisotropic_3d(layout: tuple[tuple[int, ...], tuple[int, ...], int]) -> None:
    (z, y, x), blocks, seed = layout[0] + (layout[0][0] % 7 + 1,), layout[1] + (1,), layout[2]
    shape = (x, z, y)
    blocks = (blocks[2], blocks[0], min(blocks[1], y))
    image = np.random.default_rng(seed).random(shape).astype(np.float32)
    result = segment(image, [{"op": "gaussian", "sigma": [0.5, 1.0, 2.0]}], block_shape=blocks)
    np.testing.assert_array_equal(result, ndi.gaussian_filter(image, [0.5, 1.0, 2.0]))


@SETTINGS
@given(layouts(), st.sampled_from([1, 3, 5]))
def test_median(layout: tuple[tuple[int, ...], tuple[int, ...], int], size: int) -> None:
    shape, blocks, seed = layout
    image = np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)
    result = segment(image, [{"op": "median", "size": size}], block_shape=blocks)
    np.testing.assert_array_equal(result, ndi.median_filter(image, size=size))


@SETTINGS
@given(layouts(), st.integers(1, 3))
def test_binary_opening_and_closing(
    layout: tuple[tuple[int, ...], tuple[int, ...], int], radius: int
) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    mask_pipeline = [{"op": "threshold", "value": float(np.median(image))}]
    mask = image > float(np.median(image))
    opened = segment(
        image, [*mask_pipeline, {"op": "binary_opening", "radius": radius}], block_shape=blocks
    )
    np.testing.assert_array_equal(opened.astype(bool), _binary_opening_reference(mask, radius))
    closed = segment(
        image, [*mask_pipeline, {"op": "binary_closing", "radius": radius}], block_shape=blocks
    )
    np.testing.assert_array_equal(closed.astype(bool), _binary_closing_reference(mask, radius))


@SETTINGS
@given(layouts(), st.sampled_from(["float32", "uint8", "uint16", "int16"]))
def test_otsu_uses_the_whole_item_histogram(
    layout: tuple[tuple[int, ...], tuple[int, ...], int], dtype: str
) -> None:
    shape, blocks, seed = layout
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        image = rng.normal(size=shape).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        image = rng.integers(max(info.min, -500), min(info.max, 3000), shape).astype(dtype)
    result = segment(image, [{"op": "otsu"}], block_shape=blocks)
    np.testing.assert_array_equal(result.astype(bool), image > threshold_otsu(image))


@SETTINGS
@given(layouts(), st.floats(0, 49), st.floats(51, 100))
def test_normalize_percentile_is_exact(
    layout: tuple[tuple[int, ...], tuple[int, ...], int], low: float, high: float
) -> None:
    shape, blocks, seed = layout
    rng = np.random.default_rng(seed)
    image = rng.gamma(2.0, size=shape).astype(np.float32)
    image[rng.random(shape) < 0.3] = 0  # ties, as in real images with background
    result = segment(
        image, [{"op": "normalize_percentile", "low": low, "high": high}], block_shape=blocks
    )
    p_low, p_high = np.percentile(image, [low, high])
    expected = (
        np.clip((image - np.float32(p_low)) / np.float32(p_high - p_low), 0, 1)
        if p_high > p_low
        else np.clip(image - np.float32(p_low), 0, 1)
    )
    # The percentiles are exact order statistics interpolated with numpy's formula; the
    # scaling itself is float32 arithmetic on both sides, so allow 1 float32 ulp at 1.0.
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-7)


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]))
def test_label_2d(layout: tuple[tuple[int, ...], tuple[int, ...], int], connectivity: int) -> None:
    shape, blocks, seed = layout
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.45
    result = segment(
        mask.astype(np.uint8),
        [{"op": "threshold", "value": 0}, {"op": "label", "connectivity": connectivity}],
        block_shape=blocks,
    )
    reference, _ = ndi.label(mask, ndi.generate_binary_structure(2, connectivity))
    assert_labels_equal(result, reference)


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.sampled_from([1, 2, 3]))
def test_label_3d(layout: tuple[tuple[int, ...], tuple[int, ...], int], connectivity: int) -> None:
    shape, blocks, seed = layout
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.35
    result = segment(
        mask.astype(np.uint8),
        [{"op": "threshold", "value": 0}, {"op": "label", "connectivity": connectivity}],
        block_shape=blocks,
    )
    reference, _ = ndi.label(mask, ndi.generate_binary_structure(3, connectivity))
    assert_labels_equal(result, reference)


def test_label_spiral_spanning_every_block() -> None:
    """One object winding through all blocks must come back as one label."""
    n = 64
    mask = np.zeros((n, n), dtype=np.uint8)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        mask[top, left : right + 1] = 1
        mask[top : bottom + 1, right] = 1
        mask[bottom, left : right + 1] = 1
        mask[top + 2 : bottom + 1, left] = 1
        if top + 2 <= bottom:
            mask[top + 2, left : right - 1] = 1
        top, left, bottom, right = top + 4, left + 2, bottom - 2, right - 2
    reference, n_ref = ndi.label(mask)
    for blocks in [(3, 3), (1, 64), (64, 1), (5, 9)]:
        result = segment(
            mask, [{"op": "threshold", "value": 0}, {"op": "label"}], block_shape=blocks
        )
        assert_labels_equal(result, reference)
        assert result.max() == n_ref


def test_label_diagonal_corner_touch_needs_connectivity_2() -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = 1  # touch only at a block corner with 2x2 blocks
    pipeline = [{"op": "threshold", "value": 0}]
    four = segment(mask, [*pipeline, {"op": "label", "connectivity": 1}], block_shape=2)
    eight = segment(mask, [*pipeline, {"op": "label", "connectivity": 2}], block_shape=2)
    assert four.max() == 2
    assert eight.max() == 1


@pytest.mark.parametrize(
    ("pipeline", "reference"),
    [
        ([{"op": "clip", "low": 0.2, "high": 0.7}], lambda a: np.clip(a, 0.2, 0.7)),
        (
            [{"op": "window", "low": 0.2, "high": 0.7}],
            lambda a: np.clip((a - np.float32(0.2)) / np.float32(0.5), 0, 1),
        ),
        (
            [{"op": "threshold_range", "low": 0.3, "high": 0.6}],
            lambda a: ((a >= 0.3) & (a <= 0.6)).astype(np.uint8),
        ),
        (
            [{"op": "classify", "edges": [0.3, 0.6]}],
            lambda a: (np.digitize(a, [0.3, 0.6]) + 1).astype(np.uint8),
        ),
    ],
)
def test_pointwise_ops(pipeline: list[dict[str, object]], reference: object) -> None:
    image = np.random.default_rng(0).random((37, 23)).astype(np.float32)
    for blocks in [(37, 23), (8, 8), (1, 5)]:
        result = segment(image, pipeline, block_shape=blocks)
        np.testing.assert_array_equal(result, reference(image))  # type: ignore[operator]


def test_band_ops_on_multichannel_image() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (3, 30, 41)).astype(np.uint8)
    luma = segment(
        rgb,
        [{"op": "combine_bands", "weights": [0.299, 0.587, 0.114]}],
        block_shape=8,
        channel_axis=0,
    )
    expected = np.tensordot(np.float32([0.299, 0.587, 0.114]), rgb.astype(np.float32), axes=(0, 0))
    np.testing.assert_array_equal(luma, expected.astype(np.float32))
    ndvi = segment(
        rgb,
        [{"op": "normalized_difference", "band_a": 1, "band_b": 3}],
        block_shape=8,
        channel_axis=0,
    )
    a, b = rgb[0].astype(np.float32), rgb[2].astype(np.float32)
    np.testing.assert_array_equal(
        ndvi, np.divide(a - b, a + b, out=np.zeros_like(a), where=a + b != 0)
    )
    red = segment(rgb, [{"op": "select_bands", "bands": [1]}], block_shape=8, channel_axis=0)
    np.testing.assert_array_equal(red, rgb[0])


@pytest.mark.parametrize(("block", "read_once"), [(16, True), (4, False)])
def test_input_read_once_unless_the_halo_is_wider_than_a_block(
    monkeypatch: pytest.MonkeyPatch, block: int, read_once: bool
) -> None:
    """Each block reads its core and gets its halo from its neighbours' strips; where the
    halo (6 px here) is wider than a block, each block reads its whole window instead."""
    from segflow.io.zarr import ArrayReader

    read: list[int] = []
    plain_read = ArrayReader.read

    def counted(self: ArrayReader, region: tuple[slice, ...]) -> np.ndarray:
        data = plain_read(self, region)
        read.append(data[0].size)
        return data

    image = smooth_noise((48, 40), 0)
    step = {"op": "gaussian", "sigma": 1.5}
    expected = segment(image, [step], block_shape=48)
    monkeypatch.setattr(ArrayReader, "read", counted)
    np.testing.assert_array_equal(segment(image, [step], block_shape=block), expected)
    assert (sum(read) == image.size) is read_once


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (1, 1), (64, 33)])
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_first_pixels_of_labels_in_any_numbering(shape: tuple[int, ...], seed: int) -> None:
    """The fast path (labels numbered in scan order, as scipy numbers them) and the general
    one (any numbering) give each label's first pixel in item coordinates: labels that
    touch each other (scikit-image's numbering of a class map), a label on the first pixel,
    none at all."""
    from skimage import measure

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, shape)
    box = tuple(slice(2, 2 + n) for n in shape)  # the block sits at (2, 2[, 2]) in the item
    item = tuple(n + 4 for n in shape)
    touching = measure.label(labels, background=0, connectivity=1)
    for numbering in (labels, ndi.label(labels > 2)[0], touching, np.zeros(shape, int)):
        n = int(numbering.max())
        first = first_pixels(numbering, n, box, item)
        for label in range(1, n + 1):
            where = np.flatnonzero(numbering.ravel() == label)
            if not len(where):
                assert first[label] == NO_PIXEL
                continue
            local = np.unravel_index(where[0], shape)
            assert first[label] == np.ravel_multi_index(tuple(i + 2 for i in local), item)
    assert first[0] == NO_PIXEL

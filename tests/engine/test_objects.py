"""Object-level operations, blockwise, equal their whole-array references.

Random masks over random 2D and 3D shapes, connectivities and block layouts (hypothesis draws
blocks of one pixel along an axis and blocks much smaller than the objects), plus objects
built to span every block.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from _compare import assert_labels_equal
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage import measure, morphology
from skimage.filters import apply_hysteresis_threshold
from skimage.segmentation import clear_border, flood, relabel_sequential

from segflow import segment
from segflow.engine.api import run_item
from segflow.engine.executor import LocalExecutor
from segflow.engine.pipeline import compile_pipeline
from segflow.engine.run import ArraySink
from segflow.errors import ConfigError, PlanError
from segflow.io.zarr import ArrayReader

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    return ndi.generate_binary_structure(ndim, connectivity)


def _mask(shape: tuple[int, ...], seed: int, fraction: float) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < fraction


def _run(mask: np.ndarray, step: dict[str, object], blocks: tuple[int, ...]) -> np.ndarray:
    pipeline = [{"op": "threshold", "value": 0}, step]
    return segment(mask.astype(np.uint8), pipeline, block_shape=blocks)


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]), st.integers(0, 6))
def test_remove_small_objects_2d(layout: Layout, connectivity: int, max_size: int) -> None:
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.45)
    result = _run(
        mask,
        {"op": "remove_small_objects", "max_size": max_size, "connectivity": connectivity},
        blocks,
    )
    expected = morphology.remove_small_objects(mask, max_size=max_size, connectivity=connectivity)
    np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.sampled_from([1, 2, 3]), st.integers(0, 8))
def test_remove_small_objects_3d(layout: Layout, connectivity: int, max_size: int) -> None:
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.35)
    result = _run(
        mask,
        {"op": "remove_small_objects", "max_size": max_size, "connectivity": connectivity},
        blocks,
    )
    expected = morphology.remove_small_objects(mask, max_size=max_size, connectivity=connectivity)
    np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(
    st.one_of(layouts(max_side=40), layouts(ndim=3, max_side=12)),
    st.sampled_from([1, 2]),
    st.integers(1, 30),
)
def test_remove_large_objects(layout: Layout, connectivity: int, min_size: int) -> None:
    """Objects of min_size pixels or more go: what remove_small_objects(max_size=min_size-1)
    would remove is what stays."""
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.45)
    step = {"op": "remove_large_objects", "min_size": min_size, "connectivity": connectivity}
    result = _run(mask, step, blocks)
    bigger = morphology.remove_small_objects(mask, max_size=min_size - 1, connectivity=connectivity)
    np.testing.assert_array_equal(result, mask & ~bigger)


def test_remove_large_objects_needs_one_size() -> None:
    for sizes in ({}, {"min_size": 4, "min_physical_size": 1.0}):
        with pytest.raises(ConfigError, match="give exactly one of `min_size`"):
            compile_pipeline([{"op": "remove_large_objects", **sizes}], spatial_ndim=2,
                             channels=1, dtype="uint8")  # fmt: skip


def _scattered_ids(shape: tuple[int, ...], seed: int, n: int) -> np.ndarray:
    """Ids 1..n-1 scattered over the item: touching ids, one id in many separate places."""
    labels = np.random.default_rng(seed).integers(0, n, shape).astype(np.uint16)
    labels[smooth_noise(shape, seed) < 0.5] = 0
    return labels


@SETTINGS
@given(
    st.one_of(layouts(max_side=40), layouts(ndim=3, max_side=12)),
    st.integers(3, 40),
    st.integers(0, 30),
)
def test_remove_small_and_large_objects_of_a_label_image(layout: Layout, n: int, size: int) -> None:
    """Each id is one object wherever its pixels lie (sizes summed over the item), touching
    ids stay apart, and the kept pixels keep their ids: remove_small_objects on an integer
    image, as scikit-image; remove_large_objects keeps what it removes."""
    shape, blocks, seed = layout
    labels = _scattered_ids(shape, seed, n)
    small = segment(labels, [{"op": "remove_small_objects", "max_size": size}], block_shape=blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Only one label was provided"
        expected = morphology.remove_small_objects(labels, max_size=size)
    assert small.dtype == labels.dtype
    np.testing.assert_array_equal(small, expected)
    step = {"op": "remove_large_objects", "min_size": size + 1}
    large = segment(labels, [step], block_shape=blocks)
    np.testing.assert_array_equal(large, np.where(expected == 0, labels, 0))


def test_remove_small_objects_of_touching_labels_peer_case() -> None:
    """scikit-image test_misc.py: label 2 (2 px) touches label 1 (4 px) and goes alone."""
    labels = np.array([[1, 1, 2], [1, 1, 2]])
    for blocks in [(2, 3), (1, 1), (2, 2)]:
        result = segment(
            labels, [{"op": "remove_small_objects", "max_size": 2}], block_shape=blocks
        )
        np.testing.assert_array_equal(result, morphology.remove_small_objects(labels, max_size=2))
        np.testing.assert_array_equal(result, [[1, 1, 0], [1, 1, 0]])


@pytest.mark.parametrize("op", ["remove_small_objects", "remove_large_objects"])
def test_size_filters_refuse_float_and_negative_input(op: str) -> None:
    step = {"op": op, "max_size" if op == "remove_small_objects" else "min_size": 3}
    with pytest.raises(TypeError, match="Only bool or integer image types are supported"):
        morphology.remove_small_objects(np.zeros((4, 4)), max_size=3)
    with pytest.raises(
        PlanError,
        match=rf"pipeline\[0\] '{op}': {op} takes a mask or a label image \(bool or integer\), "
        "got float64",
    ):
        segment(np.zeros((4, 4)), [step])
    negative = np.array([[1, -1, 0], [2, 2, 0]])
    with pytest.raises(ValueError, match="Negative value labels are not supported"):
        morphology.remove_small_objects(negative, max_size=3)
    with pytest.raises(
        ValueError, match=rf"pipeline\[0\]\.{op}: label ids must not be negative, got -1"
    ):
        segment(negative, [step], block_shape=2)


@pytest.mark.parametrize(
    ("sizes", "kept"),
    [
        ({"remove_small_objects": {"max_physical_size": 1.0}}, 9),
        ({"remove_large_objects": {"min_physical_size": 2.25}}, 4),
        ({"remove_large_objects": {"min_physical_size": 2.3}}, 13),
    ],
)
def test_objects_by_physical_size_use_the_item_spacing(
    sizes: dict[str, dict[str, float]], kept: int
) -> None:
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[0:2, 0:2] = 1  # 4 pixels = 1.0 mm^2 at 0.5 mm
    mask[5:8, 5:8] = 1  # 9 pixels = 2.25 mm^2
    reader = ArrayReader(mask, "spaced")
    # Signed spacing, as north-up rasters and LPS volumes have it.
    reader.info = dataclasses.replace(reader.info, spacing=(0.5, -0.5))
    [(op, size)] = sizes.items()
    plan = compile_pipeline(
        [{"op": "threshold", "value": 0}, {"op": op, **size}],
        spatial_ndim=2,
        channels=1,
        dtype="uint8",
    )
    out = np.zeros(mask.shape, dtype=np.uint8)
    with LocalExecutor(2) as executor:
        run = run_item(
            reader, plan, block_shape=(4, 4), executor=executor, make_sink=lambda d: ArraySink()
        )
    for summary in run.blocks:
        region, data = summary.written
        out[region] = data
    assert out.sum() == kept


@SETTINGS
@given(
    st.one_of(layouts(max_side=40), layouts(ndim=3, max_side=12)),
    st.sampled_from([None, 1]),
    st.integers(0, 3),
)
def test_clear_border_of_a_mask(layout: Layout, connectivity: int | None, buffer_size: int) -> None:
    """skimage.segmentation.clear_border (full connectivity, the default here too) on the
    whole item; with face connectivity, objects are the face-connected components."""
    shape, blocks, seed = layout
    if buffer_size >= min(shape):
        return  # refused: see test_clear_border_refuses_a_buffer_as_wide_as_the_item
    mask = _mask(shape, seed, 0.45)
    step = {"op": "clear_border", "buffer_size": buffer_size, "connectivity": connectivity}
    result = _run(mask, step, blocks)
    if connectivity is None:
        np.testing.assert_array_equal(result, clear_border(mask, buffer_size=buffer_size))
    else:
        labels, _ = ndi.label(mask, _structure(mask.ndim, connectivity))
        expected = clear_border(labels, buffer_size=buffer_size) != 0
        np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(st.one_of(layouts(max_side=30), layouts(ndim=3, max_side=10)), st.integers(0, 2))
def test_clear_border_of_a_label_image(layout: Layout, buffer_size: int) -> None:
    """Each label's own components are the objects (touching labels stay apart) and the
    kept pixels keep their ids, as scikit-image."""
    shape, blocks, seed = layout
    if buffer_size >= min(shape):
        return
    labels = (smooth_noise(shape, seed, sigma=1.0) * 12).astype(np.uint16) % 5
    step = {"op": "clear_border", "buffer_size": buffer_size}
    result = segment(labels, [step], block_shape=blocks)
    assert result.dtype == labels.dtype
    np.testing.assert_array_equal(result, clear_border(labels, buffer_size=buffer_size))


def test_clear_border_peer_cases() -> None:
    """scikit-image's test_clear_border.py: touching labels, a diagonal chain to a corner."""
    labels = np.array([[1, 2, 3, 1, 2], [3, 3, 5, 4, 2], [3, 4, 5, 4, 2], [3, 3, 2, 1, 2]])
    chain = np.zeros((6, 6), dtype=bool)
    chain[0, 0] = chain[1, 1] = chain[2, 2] = True  # touches the corner diagonally only
    for blocks in [(4, 5), (2, 2), (1, 3)]:
        result = segment(labels, [{"op": "clear_border"}], block_shape=blocks)
        np.testing.assert_array_equal(result, clear_border(labels))
        assert np.count_nonzero(result) == 5  # labels 5 and 4 inside
        np.testing.assert_array_equal(
            segment(chain, [{"op": "clear_border"}], block_shape=blocks), clear_border(chain)
        )
        assert not clear_border(chain).any()


def test_clear_border_refuses_a_buffer_as_wide_as_the_item() -> None:
    with pytest.raises(ValueError, match="buffer size may not be greater"):
        clear_border(np.ones((4, 6), dtype=bool), buffer_size=4)
    with pytest.raises(
        ValueError,
        match=r"pipeline\[0\]\.clear_border: `buffer_size` \(4\) must be smaller than every "
        r"side of the item \(4, 6\)",
    ):
        segment(np.ones((4, 6), dtype=bool), [{"op": "clear_border", "buffer_size": 4}])
    with pytest.raises(
        PlanError,
        match=r"clear_border takes a mask or a label image \(bool or integer\), got float32",
    ):
        segment(np.ones((4, 6), dtype=np.float32), [{"op": "clear_border"}])


def _keep_largest_reference(mask: np.ndarray, k: int, connectivity: int) -> np.ndarray:
    labels, n = ndi.label(mask, _structure(mask.ndim, connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    # Largest first; ties by the first pixel in scan order, i.e. by scipy's label number.
    order = np.lexsort((np.arange(n), -sizes))[:k]
    return np.isin(labels, order + 1)


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]), st.integers(1, 4))
def test_keep_largest_2d(layout: Layout, connectivity: int, k: int) -> None:
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.4)
    result = _run(mask, {"op": "keep_largest", "k": k, "connectivity": connectivity}, blocks)
    np.testing.assert_array_equal(result, _keep_largest_reference(mask, k, connectivity))


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.sampled_from([1, 3]), st.integers(1, 3))
def test_keep_largest_3d(layout: Layout, connectivity: int, k: int) -> None:
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.3)
    result = _run(mask, {"op": "keep_largest", "k": k, "connectivity": connectivity}, blocks)
    np.testing.assert_array_equal(result, _keep_largest_reference(mask, k, connectivity))


def _fill_holes_reference(mask: np.ndarray, connectivity: int, max_size: int | None) -> np.ndarray:
    structure = _structure(mask.ndim, connectivity)
    filled = ndi.binary_fill_holes(mask, structure=structure)
    if max_size is None:
        return filled
    holes, n = ndi.label(filled & ~mask, structure)
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    small = sizes <= max_size
    small[0] = False
    return mask | small[holes]


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]), st.sampled_from([None, 0, 2, 5]))
def test_fill_holes_2d(layout: Layout, connectivity: int, max_size: int | None) -> None:
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.6)
    result = _run(
        mask, {"op": "fill_holes", "connectivity": connectivity, "max_size": max_size}, blocks
    )
    np.testing.assert_array_equal(result, _fill_holes_reference(mask, connectivity, max_size))


@SETTINGS
@given(layouts(ndim=3, max_side=10), st.sampled_from([1, 2, 3]))
def test_fill_holes_3d(layout: Layout, connectivity: int) -> None:
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.7)
    result = _run(mask, {"op": "fill_holes", "connectivity": connectivity}, blocks)
    np.testing.assert_array_equal(result, _fill_holes_reference(mask, connectivity, None))


def test_fill_holes_ring_spanning_every_block() -> None:
    """A hole whose ring runs through every block is filled; a bay open to the border is not."""
    mask = np.zeros((40, 40), dtype=bool)
    mask[2:38, 2:38] = True
    mask[4:36, 4:36] = False  # the hole spans all 16 blocks of 10^2
    mask[20:22, 0:3] = False  # a bay from the border into the ring: not a hole
    for blocks in [(10, 10), (1, 40), (7, 3)]:
        result = _run(mask, {"op": "fill_holes"}, blocks)
        np.testing.assert_array_equal(result, ndi.binary_fill_holes(mask))


@SETTINGS
@given(
    st.one_of(layouts(max_side=40), layouts(ndim=3, max_side=10)),
    st.sampled_from([1, 2]),
    st.integers(0, 12),
)
def test_remove_small_holes(layout: Layout, connectivity: int, max_size: int) -> None:
    """skimage.morphology.remove_small_holes: background regions of max_size pixels or
    fewer are filled, at the item border too."""
    shape, blocks, seed = layout
    mask = _mask(shape, seed, 0.6)
    step = {"op": "remove_small_holes", "max_size": max_size, "connectivity": connectivity}
    result = segment(mask, [step], block_shape=blocks)
    expected = morphology.remove_small_holes(mask, max_size=max_size, connectivity=connectivity)
    np.testing.assert_array_equal(result, expected)


def test_remove_small_holes_fills_at_the_border_where_fill_holes_does_not() -> None:
    mask = np.ones((8, 9), dtype=bool)
    mask[0, 3:5] = False  # 2 px of background on the border
    mask[4, 4] = False  # a 1 px hole inside
    for blocks in [(8, 9), (3, 2)]:
        filled = segment(mask, [{"op": "remove_small_holes", "max_size": 2}], block_shape=blocks)
        np.testing.assert_array_equal(filled, morphology.remove_small_holes(mask, max_size=2))
        assert filled.all()
        fill_holes = segment(mask, [{"op": "fill_holes", "max_size": 2}], block_shape=blocks)
        assert not fill_holes[0, 3:5].any() and fill_holes[4, 4]


def test_remove_small_holes_of_a_label_image_is_its_mask() -> None:
    labels = np.array([[1, 1, 2, 2], [1, 0, 2, 2], [3, 3, 0, 0]], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "labeled images ... as a boolean array"
        expected = morphology.remove_small_holes(labels, max_size=1)
    result = segment(labels, [{"op": "remove_small_holes", "max_size": 1}], block_shape=2)
    np.testing.assert_array_equal(result, expected)
    with pytest.raises(
        PlanError, match=r"remove_small_holes takes a mask or a label image .* got float32"
    ):
        segment(labels.astype(np.float32), [{"op": "remove_small_holes"}])


@SETTINGS
@given(layouts(), st.floats(0.3, 0.5), st.floats(0.0, 0.2))
def test_hysteresis_2d(layout: Layout, low: float, gap: float) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    high = low + gap
    result = segment(image, [{"op": "hysteresis", "low": low, "high": high}], block_shape=blocks)
    expected = apply_hysteresis_threshold(image, low, high)
    np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(layouts(ndim=3, max_side=12), st.sampled_from([1, 3]))
def test_hysteresis_3d(layout: Layout, connectivity: int) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed, sigma=1.0)
    low, high = 0.48, 0.53
    step = {"op": "hysteresis", "low": low, "high": high, "connectivity": connectivity}
    result = segment(image, [step], block_shape=blocks)
    labels, n = ndi.label(image > low, _structure(3, connectivity))
    strong = np.bincount(labels[image > high], minlength=n + 1) > 0
    strong[0] = False
    np.testing.assert_array_equal(result, strong[labels])


def test_hysteresis_strong_pixel_at_the_far_end_of_a_long_line() -> None:
    image = np.zeros((5, 200), dtype=np.float32)
    image[2, 1:199] = 0.5  # weak, crossing 20 blocks
    image[2, 198] = 1.0  # one strong pixel at the far end
    image[4, 10:50] = 0.5  # weak only: dropped
    result = segment(image, [{"op": "hysteresis", "low": 0.4, "high": 0.9}], block_shape=(5, 10))
    np.testing.assert_array_equal(result, apply_hysteresis_threshold(image, 0.4, 0.9))
    assert result[2].sum() == 198 and result[4].sum() == 0


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]))
def test_label_per_class(layout: Layout, connectivity: int) -> None:
    shape, blocks, seed = layout
    classes = np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.uint8)
    step = {"op": "label", "connectivity": connectivity, "classes": True}
    result = segment(classes, [step], block_shape=blocks)
    # skimage.measure.label joins equal neighbours and numbers in scan order, as ndi.label
    reference = measure.label(classes, background=0, connectivity=connectivity)
    assert_labels_equal(result, reference)


@SETTINGS
@given(layouts(max_side=30))
def test_chain_after_connectivity_steps(layout: Layout) -> None:
    """Local and global steps after connectivity steps get their halo from the neighbours."""
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    pipeline = [
        {"op": "threshold", "value": 0.5},
        {"op": "fill_holes"},
        {"op": "binary_opening", "radius": 1},
        {"op": "remove_small_objects", "max_size": 3},
        {"op": "label", "connectivity": 2},
    ]
    result = segment(image, pipeline, block_shape=blocks)
    mask = ndi.binary_fill_holes(image > 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_* is the mode="ignore" reference
        mask = morphology.binary_opening(mask, morphology.disk(1))
    mask = morphology.remove_small_objects(mask, max_size=3)
    reference, _ = ndi.label(mask, _structure(2, 2))
    assert_labels_equal(result, reference)


def test_object_ops_validate_their_parameters() -> None:
    with pytest.raises(ConfigError, match="exactly one of `max_size`"):
        compile_pipeline(
            [{"op": "remove_small_objects"}], spatial_ndim=2, channels=1, dtype="uint8"
        )
    with pytest.raises(ConfigError, match=r"`low` \(2.0\) must not exceed `high` \(1.0\)"):
        compile_pipeline(
            [{"op": "hysteresis", "low": 2, "high": 1}], spatial_ndim=2, channels=1, dtype="f4"
        )
    with pytest.raises(PlanError, match="`classes: true` needs an integer class map"):
        compile_pipeline(
            [{"op": "label", "classes": True}], spatial_ndim=2, channels=1, dtype="float32"
        )


STREAMED = [
    [{"op": "gaussian", "sigma": 1}, {"op": "otsu"}, {"op": "label", "connectivity": 2}],
    [
        {"op": "threshold", "value": 0.5},
        {"op": "fill_holes"},
        {"op": "remove_small_objects", "max_size": 3},
        {"op": "label"},
    ],
    [{"op": "label", "classes": True}, {"op": "threshold", "value": 2}],
    [{"op": "region_grow", "tolerance": 0.08, "seeds": [[3, 4], [30, 40], [20, 2]]}],
    [{"op": "relabel"}],
    [{"op": "remove_small_objects", "max_size": 30}],
]


@pytest.mark.parametrize("pipeline", STREAMED)
@pytest.mark.parametrize("blocks", [(7, 5), (1, 40), (16, 16)])
def test_streaming_mode_equals_keeping_blocks(
    pipeline: list[dict[str, object]], blocks: tuple[int, int]
) -> None:
    """With nothing kept between phases (keep_limit=0) every phase recomputes: same output."""
    image = smooth_noise((40, 45), 7)
    if pipeline[0].get("classes") or pipeline[0]["op"] in ("relabel", "remove_small_objects"):
        image = (image * 5).astype(np.uint8)  # a class map / a label image
    kept = segment(image, pipeline, block_shape=blocks)
    streamed = segment(image, pipeline, block_shape=blocks, keep_limit=0)
    np.testing.assert_array_equal(streamed, kept)
    if pipeline[-1]["op"] in ("label", "relabel"):
        _, kept_table = segment(image, pipeline, block_shape=blocks, regions=True)
        _, table = segment(image, pipeline, block_shape=blocks, regions=True, keep_limit=0)
        pd.testing.assert_frame_equal(table, kept_table)


def _grow_reference(
    image: np.ndarray, low: float, high: float, seeds: np.ndarray, connectivity: int
) -> np.ndarray:
    accepted = (image >= low) & (image <= high)
    grown = np.zeros(image.shape, dtype=bool)
    for seed in seeds:
        if accepted[tuple(seed)]:
            grown |= flood(accepted, tuple(int(i) for i in seed), connectivity=connectivity)
    return grown


@SETTINGS
@given(layouts(), st.sampled_from([1, 2]), st.integers(1, 5), st.floats(0.4, 0.5))
def test_region_grow_from_points(layout: Layout, connectivity: int, n: int, low: float) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed)
    rng = np.random.default_rng(seed + 1)
    seeds = np.stack([rng.integers(0, s, size=n) for s in shape], axis=1)
    step = {
        "op": "region_grow",
        "low": low,
        "high": 0.62,
        "seeds": seeds.tolist(),
        "connectivity": connectivity,
    }
    result = segment(image, [step], block_shape=blocks)
    expected = _grow_reference(image, low, 0.62, seeds, connectivity)
    np.testing.assert_array_equal(result, expected)


@SETTINGS
@given(layouts(ndim=3, max_side=12))
def test_region_grow_from_a_seed_mask_channel(layout: Layout) -> None:
    shape, blocks, seed = layout
    image = smooth_noise(shape, seed, sigma=1.0)
    seeds_mask = np.random.default_rng(seed).random(shape) < 0.02
    stacked = np.stack([image, seeds_mask.astype(np.float32)])
    step = {"op": "region_grow", "low": 0.45, "high": 0.7}
    result = segment(stacked, [step], block_shape=blocks, channel_axis=0)
    expected = _grow_reference(image, 0.45, 0.7, np.argwhere(seeds_mask), 1)
    np.testing.assert_array_equal(result, expected)


def _flood_reference(
    image: np.ndarray, seeds: np.ndarray, tolerance: float, connectivity: int
) -> np.ndarray:
    grown = np.zeros(image.shape, dtype=bool)
    for seed in seeds:
        point = tuple(int(i) for i in seed)
        grown |= flood(image, point, tolerance=tolerance, connectivity=connectivity)
    return grown


@SETTINGS
@given(
    st.one_of(layouts(), layouts(ndim=3, max_side=12)),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 4),
    st.floats(0.01, 0.15),
)
def test_region_grow_within_a_tolerance_of_each_seed(
    layout: Layout, connectivity: int, n: int, tolerance: float
) -> None:
    shape, blocks, seed = layout
    connectivity = min(connectivity, len(shape))
    image = smooth_noise(shape, seed)
    rng = np.random.default_rng(seed + 2)
    seeds = np.stack([rng.integers(0, s, size=n) for s in shape], axis=1)
    step = {
        "op": "region_grow",
        "tolerance": tolerance,
        "seeds": seeds.tolist(),
        "connectivity": connectivity,
    }
    result = segment(image, [step], block_shape=blocks)
    np.testing.assert_array_equal(result, _flood_reference(image, seeds, tolerance, connectivity))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_region_grow_tolerance_bounds_like_flood_for_integers(dtype: type) -> None:
    """Bounds are clipped to the dtype and cast to it (a fractional tolerance truncates)."""
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    image = rng.integers(info.min, info.min + 12, size=(40, 50)).astype(dtype)
    image[20:, :] = rng.integers(info.max - 12, info.max, size=(20, 50), endpoint=True)
    seeds = np.array([[0, 0], [39, 49], [10, 25]])
    for tolerance in [0, 2.5, 3, 7.9]:
        step = {"op": "region_grow", "tolerance": tolerance, "seeds": seeds.tolist()}
        expected = _flood_reference(image, seeds, tolerance, 1)
        for blocks in [(40, 50), (9, 11), (1, 50)]:
            result = segment(image, [step], block_shape=blocks)
            np.testing.assert_array_equal(result, expected, err_msg=f"{tolerance} {blocks}")


def test_region_grow_tolerance_reports_seed_values_and_checks_its_input() -> None:
    image = np.arange(30 * 40, dtype=np.float32).reshape(30, 40)
    step = {"op": "region_grow", "tolerance": 3, "seeds": [[2, 3], [20, 30]]}
    plan = compile_pipeline([step], spatial_ndim=2, channels=1, dtype="float32")
    with LocalExecutor(1) as executor:
        run = run_item(
            ArrayReader(image, "item"),
            plan,
            block_shape=(8, 8),
            executor=executor,
            make_sink=lambda dtype: ArraySink(),
        )
    assert run.stats == {
        "pipeline[0].region_grow.seed0": 83.0,
        "pipeline[0].region_grow.seed1": 830.0,
    }
    with pytest.raises(ValueError, match=r"seed \[30, 3\] lies outside the item"):
        segment(image, [{**step, "seeds": [[30, 3]]}], block_shape=(8, 8))
    for wrong, message in [
        ({"low": 1, "high": 2}, "either `tolerance` or `low`/`high`"),
        ({"seeds": None}, "`tolerance` needs seed points"),
        ({"tolerance": -1}, "greater than or equal to 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            compile_pipeline([{**step, **wrong}], spatial_ndim=2, channels=1, dtype="float32")
    with pytest.raises(PlanError, match=r"pipeline\[0\] 'region_grow' needs a single-channel"):
        compile_pipeline([step], spatial_ndim=2, channels=2, dtype="float32")
    with pytest.raises(ConfigError, match="unknown operation '_grow_seed'"):
        compile_pipeline(
            [{"op": "_grow_seed", "seed": [1, 1]}], spatial_ndim=2, channels=1, dtype="float32"
        )


def test_region_grow_checks_its_seeds() -> None:
    with pytest.raises(PlanError, match="every seed needs 2 coordinates"):
        compile_pipeline(
            [{"op": "region_grow", "low": 0, "high": 1, "seeds": [[1, 2, 3]]}],
            spatial_ndim=2,
            channels=1,
            dtype="float32",
        )
    with pytest.raises(PlanError, match="without `seeds`, region_grow needs 2 channels"):
        compile_pipeline(
            [{"op": "region_grow", "low": 0, "high": 1}],
            spatial_ndim=2,
            channels=1,
            dtype="float32",
        )


def _label_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Arbitrary, sparse ids (some far apart, some objects in several disconnected parts)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**40, size=6, replace=False).astype(np.int64)
    ids[0] = 0
    pick = (smooth_noise(shape, seed) * 17).astype(np.int64) % len(ids)
    return ids[pick]


@SETTINGS
@given(
    st.one_of(layouts(), layouts(ndim=3, max_side=12)),
    st.sampled_from([np.int64, np.uint16, np.int8]),
)
def test_relabel_equals_relabel_sequential(layout: Layout, dtype: type) -> None:
    shape, blocks, seed = layout
    image = _label_image(shape, seed)
    if dtype is not np.int64:
        image = np.unique(image, return_inverse=True)[1].reshape(shape).astype(dtype) * 3
    result = segment(image, [{"op": "relabel"}], block_shape=blocks)
    expected = relabel_sequential(image)[0]
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == np.uint8  # the smallest dtype that holds every new id


def test_relabel_keeps_disconnected_parts_together_and_gives_labels() -> None:
    image = np.zeros((20, 30), dtype=np.int32)
    image[2:5, 2:5] = image[15:18, 20:25] = 70_000  # one object in two parts
    image[8:10, 8:28] = 12
    plan = compile_pipeline([{"op": "relabel"}], spatial_ndim=2, channels=1, dtype="int32")
    assert plan.out_kind == "labels"
    result, table = segment(image, [{"op": "relabel"}], block_shape=(6, 7), regions=True)
    assert set(np.unique(result)) == {0, 1, 2}
    assert (result[2:5, 2:5] == 2).all() and (result[15:18, 20:25] == 2).all()
    assert table.set_index("label").loc[2, "area"] == 9 + 15
    with pytest.raises(PlanError, match="relabel needs an integer label image, got float32"):
        compile_pipeline([{"op": "relabel"}], spatial_ndim=2, channels=1, dtype="float32")


def test_relabel_refuses_negative_ids_as_scikit_image() -> None:
    image = np.array([[0, 3, -2], [5, 5, 0]])
    with pytest.raises(ValueError, match="Cannot relabel array that contains negative values"):
        relabel_sequential(image)
    with pytest.raises(
        ValueError, match=r"pipeline\[0\]\.relabel: label ids must not be negative, got -2"
    ):
        segment(image, [{"op": "relabel"}], block_shape=2)


@pytest.mark.parametrize(
    "step",
    [
        {"op": "region_grow", "low": 0.2, "high": 0.6, "seeds": [[1, 1]]},
        {"op": "region_grow", "tolerance": 0.1, "seeds": [[1, 1]]},
    ],
)
def test_region_grow_refuses_float16_as_flood(step: dict[str, object]) -> None:
    image = np.full((6, 6), 0.5, dtype=np.float16)
    with pytest.raises(TypeError, match="float16 which is not supported"):
        flood(image, (1, 1), tolerance=0.1)
    with pytest.raises(
        PlanError,
        match=r"pipeline\[0\] 'region_grow': float16 images are not supported \(as "
        r"skimage\.segmentation\.flood\); convert to float32 first",
    ):
        segment(image, [step])
    as_float32 = segment(image.astype(np.float32), [step])  # the suggested conversion works
    np.testing.assert_array_equal(as_float32, np.ones((6, 6), dtype=np.uint8))

"""flow_dynamics: Cellpose's mask computation, blockwise-exact.

Two kinds of check. Layout invariance: every block layout gives the labels of the whole item
(hypothesis draws the shapes, blocks and flow fields). Equality with Cellpose's own
``cellpose.dynamics.compute_masks`` on whole images (the same partition; ids may differ),
where the ``cellpose`` package imports.

Importing cellpose here: cellpose 4.2.1 imports torchvision at module level
(``cellpose.transforms``; segment_anything for its network), and torchvision's PyPI wheels do
not import against the CPU torch of this project (``operator torchvision::nms does not
exist``). The mask computation never calls torchvision, so these tests put a stand-in for the
torchvision modules into ``sys.modules`` while cellpose imports (only where torchvision
itself does not import), and take it out again: every attribute of it is a function that
raises if called, so a code path that needed the real torchvision would fail loudly instead
of being silently faked.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from _cellpose import import_cellpose
from _compare import scan_order
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from segflow import segment
from segflow.ops.flows import FlowDynamicsParams, compute_masks_block
from segflow.ops.registry import OpContext

# cellpose's get_masks_torch builds a torch sparse tensor without opting in or out of its
# invariant checks; torch warns about that inside cellpose, nothing segflow does.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

try:
    cellpose_dynamics = import_cellpose()
except ImportError as error:  # the package is optional
    cellpose_dynamics = None
    CELLPOSE_MISSING = f"cellpose does not import: {error}"
else:
    CELLPOSE_MISSING = ""

needs_cellpose = pytest.mark.skipif(cellpose_dynamics is None, reason=CELLPOSE_MISSING)


def touching_discs(shape: tuple[int, int], seed: int, n: int) -> np.ndarray:
    """A label image of discs that overlap in chains (later discs on top), ids 1..k."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype=np.int32)
    for i in range(n):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 10)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i + 1
    return scan_order(labels).astype(np.int32)


def analytic_flows(labels: np.ndarray) -> np.ndarray:
    """Cellpose-like flows of a label image: 5 x the unit vector to each object's centre
    (cellprob +3 inside, -3 outside), ``(dY, dX, cellprob)``."""
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]].astype(np.float64)
    ids = np.arange(1, labels.max() + 1)
    centres = np.array(ndi.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 2)
    cy = np.concatenate([[0.0], centres[:, 0]])[labels] - yy
    cx = np.concatenate([[0.0], centres[:, 1]])[labels] - xx
    norm = np.hypot(cy, cx) + 1e-3
    inside = labels > 0
    prob = np.where(inside, 3.0, -3.0)
    return np.stack([5 * cy / norm * inside, 5 * cx / norm * inside, prob]).astype(np.float32)


def random_flows(shape: tuple[int, int], seed: int, scale: float = 3.0) -> np.ndarray:
    """Random flows (smoothed a little, so paths converge somewhere) and a random cellprob."""
    rng = np.random.default_rng(seed)
    flows = ndi.gaussian_filter(rng.normal(size=(2, *shape)), (0, 1, 1)) * scale * 3
    prob = ndi.gaussian_filter(rng.normal(size=shape), 1) * 3
    return np.concatenate([flows, prob[np.newaxis]]).astype(np.float32)


def analytic_flows_3d(shape: tuple[int, int, int], seed: int, n: int) -> np.ndarray:
    """Overlapping balls, 5 x the unit vector to each ball's centre: (dZ, dY, dX, cellprob)."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float64)
    labels = np.zeros(shape, dtype=np.int64)
    for i in range(n):
        centre = [rng.integers(0, s) for s in shape]
        radius = rng.integers(3, 6)
        labels[sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2] = i + 1
    ids = np.unique(labels)[1:]
    table = np.zeros((labels.max() + 1, 3))
    table[ids] = ndi.center_of_mass(np.ones_like(labels), labels, ids)
    towards = np.moveaxis(table[labels], -1, 0) - grid
    norm = np.sqrt((towards**2).sum(axis=0)) + 1e-3
    inside = labels > 0
    prob = np.where(inside, 3.0, -3.0)[np.newaxis]
    return np.concatenate([5 * towards / norm * inside, prob]).astype(np.float32)


def random_flows_3d(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flows = ndi.gaussian_filter(rng.normal(size=(3, *shape)), (0, 1, 1, 1)) * 9
    prob = ndi.gaussian_filter(rng.normal(size=shape), 1) * 3
    return np.concatenate([flows, prob[np.newaxis]]).astype(np.float32)


def whole(image: np.ndarray, **params: Any) -> np.ndarray:
    """The op's block function on the whole item (one block, no engine)."""
    shape = image.shape[1:]
    box = tuple(slice(0, n) for n in shape)
    ctx = OpContext(spatial_ndim=len(shape), box=box, shape=shape)
    return compute_masks_block(image, FlowDynamicsParams(**params), ctx)[0]


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """The same background and the same groups of pixels (ids may differ)."""
    assert a.shape == b.shape
    np.testing.assert_array_equal(a == 0, b == 0)
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def cellpose_masks(image: np.ndarray, **params: Any) -> np.ndarray:
    assert cellpose_dynamics is not None
    import torch

    ndim = image.shape[0] - 1
    return cellpose_dynamics.compute_masks(
        image[:ndim], image[ndim], flow_threshold=0, device=torch.device("cpu"), **params
    )


# --- equality with cellpose ------------------------------------------------------------------


@needs_cellpose
@pytest.mark.parametrize("seed", range(4))
def test_masks_from_cellposes_own_flows_equal_compute_masks(seed: int) -> None:
    """Flows made by Cellpose's own masks_to_flows from touching discs."""
    import torch

    labels = touching_discs((72, 96), seed, 30)
    mu, _ = cellpose_dynamics.masks_to_flows_gpu(labels, device=torch.device("cpu"))
    prob = np.where(labels > 0, 3.0, -3.0)
    image = np.concatenate([5 * mu, prob[np.newaxis]]).astype(np.float32)
    expected = cellpose_masks(image, min_size=-1)
    assert expected.max() > 10  # the comparison covers many masks
    assert_same_partition(whole(image, min_size=0, max_travel=200), expected)
    # min_size: Cellpose also fills each mask's holes then (not done here); these discs'
    # masks have none, so the size rule alone is compared, over the whole item.
    for min_size in (15, 60):
        expected = cellpose_masks(image, min_size=min_size)
        pipeline = [{"op": "flow_dynamics", "min_size": min_size}]
        result = segment(image, pipeline, block_shape=(24, 40), channel_axis=0)
        assert_same_partition(result, expected)


@needs_cellpose
@pytest.mark.parametrize("seed", range(6))
def test_masks_of_random_flows_equal_compute_masks(seed: int) -> None:
    image = random_flows((48, 64), seed)
    expected = cellpose_masks(image, min_size=-1, niter=120)
    assert expected.max() > 3
    assert_same_partition(whole(image, min_size=0, niter=120, max_travel=120), expected)


def trained_head_output() -> np.ndarray:
    """The shipped flow model's raw output (dY, dX, cellprob) on the bundled sample."""
    from pathlib import Path

    import imageio.v3 as iio

    from segflow.models.card import item_statistics, normalize_image
    from segflow.models.checkpoint import load_checkpoint
    from segflow.models.inference import predict_image
    from segflow.ops.intensity import to_luma

    root = Path(__file__).parents[2]
    loaded = load_checkpoint(root / "configs" / "models" / "nuclei-flows")
    card = loaded.card
    assert card is not None and card.head == "flows"
    (path,) = (root / "tests" / "data" / "nuclei").glob("*/image.png")
    grey = to_luma(np.moveaxis(np.asarray(iio.imread(path)), -1, 0))
    norm = normalize_image(grey, card.channels, item_statistics(grey, card.channels))
    return predict_image(
        loaded.module,
        norm,
        tile=card.tile,
        overlap=card.overlap,
        window=card.window,
        activation=card.activation,
        flows=True,
    )


@needs_cellpose
def test_masks_of_the_trained_segflow_flow_head_equal_compute_masks() -> None:
    """Flows from segflow's own trained flow head (configs/models/nuclei-flows) on the
    bundled nuclei sample: the op, whole and in blocks, gives cellpose's partition."""
    output = trained_head_output()
    expected = cellpose_masks(output, min_size=-1)
    assert expected.max() >= 30  # the sample's 36 nuclei, give or take
    assert_same_partition(whole(output, min_size=0), expected)
    result = segment(
        output, [{"op": "flow_dynamics", "min_size": 0}], block_shape=(64, 96), channel_axis=0
    )
    assert_same_partition(result, expected)


@needs_cellpose
@pytest.mark.slow
def test_masks_of_a_random_cellpose_network_equal_compute_masks() -> None:
    """Flows from Cellpose's own network (CPSAM, a ViT-L of 304 M parameters, randomly
    initialised from a seed, 64^2 input; about 20 s on 2 cores): its raw output."""
    import torch

    vit = sys.modules.get("cellpose.vit")
    if vit is None:
        pytest.skip("cellpose.vit did not import (its CPSAM needs segment-anything)")

    torch.manual_seed(0)
    net = vit.CPSAM(bsize=64).eval()
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.normal(size=(1, 3, 64, 64)), (0, 0, 2, 2)) * 5
    with torch.no_grad():
        output = net(torch.from_numpy(image.astype(np.float32)))[0][0].numpy()
    expected = cellpose_masks(output, min_size=-1)
    assert expected.max() >= 3
    assert_same_partition(whole(output, min_size=0, max_travel=200), expected)


@needs_cellpose
def test_max_size_fraction_equals_compute_masks() -> None:
    labels = touching_discs((40, 40), 3, 4)
    image = analytic_flows(labels)
    for fraction in (0.4, 0.05, 0.02):
        expected = cellpose_masks(image, min_size=-1, max_size_fraction=fraction)
        result = segment(
            image,
            [{"op": "flow_dynamics", "min_size": 0, "max_size_fraction": fraction}],
            channel_axis=0,
        )
        assert_same_partition(result, expected)


@needs_cellpose
@pytest.mark.parametrize("seed", range(3))
def test_3d_masks_equal_compute_masks(seed: int) -> None:
    """3-D: torch's scalar trilinear kernel, 5^3 seeds grown in 11^3 windows."""
    image = random_flows_3d((14, 20, 22), seed)
    expected = cellpose_masks(image, min_size=-1, niter=80)
    assert expected.max() > 10
    assert_same_partition(whole(image, min_size=0, niter=80, max_travel=80), expected)
    image = analytic_flows_3d((16, 24, 24), seed, 6)
    expected = cellpose_masks(image, min_size=-1)
    assert expected.max() >= 3
    assert_same_partition(whole(image, min_size=0), expected)


# --- layout invariance ------------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(12, 60),
    st.integers(12, 60),
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.data(),
)
def test_every_block_layout_gives_the_whole_items_labels(
    h: int, w: int, seed: int, synthetic: bool, data: st.DataObject
) -> None:
    if synthetic:
        image = analytic_flows(touching_discs((h, w), seed, max(h * w // 150, 1)))
    else:
        image = random_flows((h, w), seed, scale=1.0)
    params = {"niter": 40, "max_travel": 40, "min_size": data.draw(st.integers(0, 20))}
    pipeline = [{"op": "flow_dynamics", **params}]
    expected = segment(image, pipeline, channel_axis=0)  # one block
    blocks = (data.draw(st.integers(3, h)), data.draw(st.integers(3, w)))
    result = segment(image, pipeline, block_shape=blocks, channel_axis=0)
    np.testing.assert_array_equal(result, expected)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.booleans(), st.data())
def test_every_3d_block_layout_gives_the_whole_items_labels(
    seed: int, synthetic: bool, data: st.DataObject
) -> None:
    shape = (12, 18, 20)
    image = analytic_flows_3d(shape, seed, 5) if synthetic else random_flows_3d(shape, seed)
    pipeline = [{"op": "flow_dynamics", "niter": 30, "max_travel": 30, "min_size": 5}]
    expected = segment(image, pipeline, channel_axis=0)
    blocks = tuple(data.draw(st.integers(3, n)) for n in shape)
    result = segment(image, pipeline, block_shape=blocks, channel_axis=0)
    np.testing.assert_array_equal(result, expected)


def test_sizes_are_counted_over_the_whole_item() -> None:
    """min_size and max_size_fraction see whole masks, whatever the blocks cut."""
    labels = touching_discs((64, 64), 7, 12)
    image = analytic_flows(labels)
    raw = whole(image, min_size=0)
    sizes = np.bincount(raw.ravel())
    limit = int(np.median(sizes[sizes > 0][1:]))
    expected = np.where(np.isin(raw, np.flatnonzero(sizes < limit)), 0, raw)
    pipeline = [{"op": "flow_dynamics", "min_size": limit}]
    for blocks in ((64, 64), (16, 16), (7, 30)):
        result = segment(image, pipeline, block_shape=blocks, channel_axis=0)
        assert_same_partition(result, expected)


def test_paths_longer_than_max_travel_stop_the_item() -> None:
    image = np.zeros((3, 20, 200), dtype=np.float32)
    image[1] = 5.0  # every pixel moves one pixel a step to the right
    image[2] = 1.0
    pipeline = [{"op": "flow_dynamics", "niter": 100, "max_travel": 10}]
    with pytest.raises(ValueError, match=r"reaches more than `max_travel` pixels"):
        segment(image, pipeline, block_shape=(20, 50), channel_axis=0)


# --- flow_threshold: Cellpose's flow-error check -------------------------------------------


def noisy_cellpose_flows(seed: int, noise: float) -> np.ndarray:
    """Cellpose's own flows (masks_to_flows) of touching discs and a C-shaped mask (its mean
    lies outside it), plus Gaussian noise, so that some masks fail the check and some pass."""
    import torch

    labels = touching_discs((72, 96), seed, 24)
    yy, xx = np.mgrid[:72, :96]
    ring = ((yy - 20) ** 2 + (xx - 70) ** 2 <= 144) & ((yy - 20) ** 2 + (xx - 74) ** 2 > 49)
    labels[ring] = labels.max() + 1
    labels = scan_order(labels).astype(np.int32)
    mu, _ = cellpose_dynamics.masks_to_flows_gpu(labels, device=torch.device("cpu"))
    rng = np.random.default_rng(seed)
    prob = np.where(labels > 0, 3.0, -3.0)[np.newaxis]
    flows = 5 * mu + noise * ndi.gaussian_filter(rng.normal(size=mu.shape), (0, 1.5, 1.5))
    return np.concatenate([flows, prob]).astype(np.float32)


@needs_cellpose
@pytest.mark.parametrize("seed", range(3))
def test_flow_errors_equal_cellposes_flow_error(seed: int) -> None:
    """Every mask's error, bit for bit: the centres, the heat, the differences, the mean."""
    from segflow.ops.flow_error import flow_errors

    image = noisy_cellpose_flows(seed, 6.0)
    masks = cellpose_masks(image, min_size=-1)
    expected, _ = cellpose_dynamics.flow_error(masks, image[:2])
    boxes = ndi.find_objects(masks)
    n_iter = 2 * max(s[0].stop - s[0].start + s[1].stop - s[1].start + 2 for s in boxes)
    ids = np.arange(1, masks.max() + 1)
    result = flow_errors(masks.astype(np.int64), image[:2], ids, n_iter, np.float64)
    np.testing.assert_array_equal(result, expected)


def cellpose_checked(image: np.ndarray, threshold: float, **params: Any) -> np.ndarray:
    """compute_masks with its flow check (remove_bad_flow_masks), no size rule after it."""
    assert cellpose_dynamics is not None
    import torch

    return cellpose_dynamics.compute_masks(
        image[:2], image[2], flow_threshold=threshold, min_size=-1,
        device=torch.device("cpu"), **params,
    )  # fmt: skip


def assert_check_matters(image: np.ndarray, expected: np.ndarray, **params: Any) -> None:
    """The comparison removes some masks and keeps others."""
    unchecked = cellpose_masks(image, min_size=-1, **params)
    assert 0 < expected.max() < unchecked.max()


@needs_cellpose
@pytest.mark.parametrize("seed", range(3))
def test_flow_threshold_on_noisy_cellpose_flows_equals_remove_bad_flow_masks(seed: int) -> None:
    image = noisy_cellpose_flows(seed, 6.0)
    for threshold in (0.2, 0.4):
        expected = cellpose_checked(image, threshold)
        assert_check_matters(image, expected)
        pipeline = [{"op": "flow_dynamics", "flow_threshold": threshold, "min_size": 0}]
        for blocks in (None, (24, 40)):
            result = segment(image, pipeline, block_shape=blocks, channel_axis=0)
            assert_same_partition(result, expected)


@needs_cellpose
@pytest.mark.parametrize("seed", range(4))
def test_flow_threshold_on_random_flows_equals_remove_bad_flow_masks(seed: int) -> None:
    image = random_flows((48, 64), seed)
    expected = cellpose_checked(image, 1.0, niter=120)
    assert_check_matters(image, expected, niter=120)
    step = {"op": "flow_dynamics", "flow_threshold": 1.0, "min_size": 0, "niter": 120}
    result = segment(image, [{**step, "max_travel": 120}], channel_axis=0)
    assert_same_partition(result, expected)


@needs_cellpose
def test_flow_threshold_on_the_trained_flow_head_equals_remove_bad_flow_masks() -> None:
    """The shipped flow model's output on the bundled sample (the check keeps most of its
    nuclei): whole and in blocks, as remove_bad_flow_masks."""
    output = trained_head_output()
    expected = cellpose_checked(output, 0.4)
    assert expected.max() >= 30
    pipeline = [{"op": "flow_dynamics", "flow_threshold": 0.4, "min_size": 0}]
    for blocks in (None, (64, 96)):
        result = segment(output, pipeline, block_shape=blocks, channel_axis=0)
        assert_same_partition(result, expected)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(240, 330),
    st.integers(240, 330),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.5, 2.0, 4.0]),
    st.data(),
)
def test_flow_threshold_gives_the_whole_items_labels_on_every_layout(
    h: int, w: int, seed: int, noise: float, data: st.DataObject
) -> None:
    """Short paths (niter 4, max_travel 7: halo 3 * 7 + 12 + 4 * 14 + 1 = 90) keep a block's
    window below the item, so blocks see parts of it only; the check removes masks on
    both sides of the block borders. Flows: towards the centres of touching discs, plus
    smoothed noise (random flows converge too slowly for 4 steps)."""
    image = analytic_flows(touching_discs((h, w), seed, h * w // 120))
    rng = np.random.default_rng(seed)
    image[:2] += noise * ndi.gaussian_filter(rng.normal(size=(2, h, w)), (0, 2, 2))
    step = {"op": "flow_dynamics", "niter": 4, "max_travel": 7, "min_size": 0}
    unchecked = segment(image, [step], channel_axis=0)
    pipeline = [{**step, "flow_threshold": 0.5, "min_size": data.draw(st.integers(0, 20))}]
    expected = segment(image, pipeline, channel_axis=0)  # one block
    assert expected.max() < unchecked.max()  # the check removed masks
    blocks = (data.draw(st.integers(30, h)), data.draw(st.integers(30, w)))
    result = segment(image, pipeline, block_shape=blocks, channel_axis=0)
    np.testing.assert_array_equal(result, expected)
    # Streaming (nothing kept between phases: each phase reads and recomputes its blocks).
    result = segment(image, pipeline, block_shape=blocks, channel_axis=0, keep_limit=1)
    np.testing.assert_array_equal(result, expected)


def test_a_mask_reaching_past_the_halo_stops_the_item() -> None:
    from segflow.ops.flow_error import _check_reach

    ids = np.zeros((40, 40), dtype=np.int64)
    ids[30, 35] = 1 + 2 * 40 + 3  # its seed at (2, 3): 33 pixels away along x
    with pytest.raises(ValueError, match=r"seed at \(2, 3\) reaches the pixel at \(30, 35\)"):
        _check_reach(ids, (slice(0, 40), slice(0, 40)), (40, 40), 20)
    _check_reach(ids, (slice(0, 40), slice(0, 40)), (40, 40), 33)


def test_flow_threshold_is_refused_in_3d_and_below_zero() -> None:
    from segflow.errors import PlanError

    image = analytic_flows_3d((12, 16, 16), 0, 3)
    with pytest.raises(PlanError, match=r"`flow_threshold` \(0.4\) works on 2-D items only"):
        segment(image, [{"op": "flow_dynamics", "flow_threshold": 0.4}], channel_axis=0)
    with pytest.raises(ValueError, match=r"flow_threshold"):
        FlowDynamicsParams(flow_threshold=-1)


def test_the_flow_check_is_a_global_step_with_its_own_halo() -> None:
    """The masks, then a statistic (n_iter) and the check reading 4 * (max_travel + 7) + 1
    around each block, then the size rules; the first phase reads both halos."""
    from segflow.engine.pipeline import compile_pipeline

    step = {"op": "flow_dynamics", "flow_threshold": 0.4, "max_travel": 10}
    plan = compile_pipeline([step], spatial_ndim=2, channels=3, dtype="float32")
    assert [p.ends_with for p in plan.phases] == ["statistic", "label", "output"]
    assert plan.halo == (3 * 10 + 12 + 4 * 17 + 1,) * 2
    assert plan.phases[1].halo_in == (4 * 17 + 1,) * 2
    unchecked = compile_pipeline([{**step, "flow_threshold": None}], spatial_ndim=2, channels=3,
                                 dtype="float32")  # fmt: skip
    assert [p.ends_with for p in unchecked.phases] == ["label", "output"]

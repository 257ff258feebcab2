"""Synthetic nuclei (segflow.models.synthetic) and the flow head's targets
(segflow.models.flow_field)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from segflow.models.card import ModelCard
from segflow.models.flow_field import (
    FLOW_SCALE,
    flip_flows,
    flow_targets,
    label_flows,
    rotate_flows,
)
from segflow.models.inference import predict_image
from segflow.models.synthetic import synthetic_nuclei
from segflow.models.train import make_targets


@pytest.mark.parametrize("kind", ["fluorescence", "brightfield", "stained"])
def test_synthetic_is_reproducible_and_labels_are_exact(kind: str) -> None:
    image, labels = synthetic_nuclei((120, 150), seed=[7, 1], kind=kind)
    again, same = synthetic_nuclei((120, 150), seed=[7, 1], kind=kind)
    other, _ = synthetic_nuclei((120, 150), seed=[7, 2], kind=kind)
    assert (image == again).all() and (labels == same).all()
    assert image.shape != other.shape or not (image == other).all()
    assert image.shape == ((3,) if kind == "stained" else (1,)) + (120, 150)
    ids = np.unique(labels[labels > 0])
    assert ids.size >= 3 and (ids == np.arange(1, ids.size + 1)).all()  # consecutive
    sizes = ndi.sum(np.ones(labels.shape), labels, ids)
    assert sizes.min() >= 15
    for k, box in enumerate(ndi.find_objects(labels), start=1):  # one piece per nucleus
        assert ndi.label(labels[box] == k)[1] == 1


@pytest.mark.parametrize(("kind", "brighter"), [("fluorescence", True), ("brightfield", False)])
def test_synthetic_polarity(kind: str, brighter: bool) -> None:
    """Fluorescent nuclei are brighter than the background, absorbing ones darker."""
    for seed in range(4):
        image, labels = synthetic_nuclei((128, 128), seed=seed, kind=kind, layout="scattered")
        inside = float(np.median(image[0][labels > 0]))
        outside = float(np.median(image[0][labels == 0]))
        assert (inside > outside) == brighter, seed


def test_synthetic_packed_layout_touches() -> None:
    """Packed tissue has nuclei touching edge to edge (the dense embryo case)."""
    _, labels = synthetic_nuclei((160, 160), seed=3, layout="packed", radius=6)
    touching = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert touching.sum() > 50


def test_bad_kind_is_one_line() -> None:
    with pytest.raises(ValueError, match="`kind` \\('phase'\\)"):
        synthetic_nuclei((32, 32), kind="phase")  # type: ignore[arg-type]


def _objects() -> np.ndarray:
    """Two touching, asymmetric objects and a bent one."""
    labels = np.zeros((40, 48), dtype=np.int64)
    yy, xx = np.mgrid[0:40, 0:48]
    labels[((yy - 12) / 8) ** 2 + ((xx - 12) / 11) ** 2 < 1] = 1
    labels[((yy - 14) / 9) ** 2 + ((xx - 30) / 7) ** 2 < 1] = 2
    labels[30:34, 5:40] = 3
    labels[22:34, 36:40] = 3
    return labels


def test_flows_lead_to_each_objects_centre() -> None:
    """Following the flows from every pixel ends inside its own object, and all pixels of
    an object end close together (where the two touching objects meet, they part)."""
    labels = _objects()
    flows = label_flows(labels)
    assert flows.dtype == np.float32 and flows.shape == (2, *labels.shape)
    norm = np.sqrt((flows**2).sum(0))
    unit = np.isclose(norm, 1.0, atol=1e-5)
    assert (norm[labels == 0] == 0).all()
    # unit flows inside, but where the heat's gradient vanishes (a centre on an axis of
    # symmetry): at most a few pixels per object
    assert (unit | (norm == 0))[labels > 0].all() and (~unit[labels > 0]).sum() <= 6
    points = np.argwhere(labels > 0).astype(float)
    for _ in range(120):  # nearest-pixel Euler steps of 1 pixel
        at = np.rint(points).astype(int)
        points += flows[:, at[:, 0], at[:, 1]].T
    end = np.rint(points).astype(int)
    start = np.argwhere(labels > 0)
    assert (labels[end[:, 0], end[:, 1]] == labels[start[:, 0], start[:, 1]]).all()
    for k in (1, 2, 3):
        spread = points[labels[start[:, 0], start[:, 1]] == k].std(0)
        assert spread.max() < 1.5, (k, spread)


def _heat_by_shifted_sums(labels: np.ndarray) -> np.ndarray:
    """The heat map as first written: the 3^ndim shifted images summed, over the whole image."""
    import itertools

    from segflow.models.flow_field import _centres, _shifted

    ids = np.unique(labels[labels > 0])
    centres = _centres(labels, ids)
    extent = max(max(s.stop - s.start for s in box) for box in ndi.find_objects(labels) if box)
    offsets = list(itertools.product((-1, 0, 1), repeat=labels.ndim))
    same = [_shifted(labels, o) == labels for o in offsets]
    heat = np.zeros(labels.shape)
    for _ in range(2 * extent):
        heat[centres] += 1.0
        total = sum(np.where(s, _shifted(heat, o), 0.0) for o, s in zip(offsets, same, strict=True))
        heat = np.where(labels > 0, total / len(offsets), 0.0)
    return heat


@pytest.mark.parametrize("shape", [(40, 48), (33, 1), (1, 9), (7, 11, 13)])
def test_heat_map_equals_the_shifted_image_sums_bit_for_bit(shape: tuple[int, ...]) -> None:
    """The sparse neighbour sums give the same bits as summing shifted images (the flow
    targets of every shipped model's training are unchanged by the faster form)."""
    from segflow.models.flow_field import heat_map

    rng = np.random.default_rng(len(shape) + shape[0])
    for labels in (
        ndi.label(rng.random(shape) > 0.45)[0],
        _objects() if shape == (40, 48) else None,
    ):
        if labels is None:
            continue
        np.testing.assert_array_equal(heat_map(labels), _heat_by_shifted_sums(labels))
    assert not heat_map(np.zeros(shape, int)).any()


def test_flow_augmentation_matches_flows_of_the_transformed_labels() -> None:
    """Turning and flipping the targets gives the targets of the turned and flipped labels
    (the training augmentation keeps flows and image consistent)."""
    labels = _objects()
    targets = flow_targets(labels)
    assert targets.shape == (3, *labels.shape)
    assert np.isclose(np.abs(targets[:2]).max(), FLOW_SCALE)
    for k in range(4):
        turned = flow_targets(np.rot90(labels, k))
        np.testing.assert_allclose(rotate_flows(targets, k), turned, atol=1e-6)
    for axis in (-1, -2):
        flipped = flow_targets(np.flip(labels, axis))
        moved = flip_flows(targets, axis)
        # the centre pixel of a symmetric object may tie and move by one pixel: compare
        # where the flows are clear
        agree = np.isclose(moved, flipped, atol=1e-6).all(0)
        assert agree.mean() > 0.97
        assert (np.sign(moved[2]) == np.sign(flipped[2])).all()


def test_flows_head_card_and_targets() -> None:
    card = ModelCard(
        name="flows",
        architecture={"name": "segnet", "params": {"features": [4]}},
        spatial_dims=2,
        channels=[{"name": "luma"}],
        head="flows",
        tile=(32, 32),
    )
    assert card.classes == ("flow_y", "flow_x", "cellprob") and card.activation == "none"
    three = card.model_copy(update={"spatial_dims": 3, "tile": (8, 32, 32)}).model_dump()
    three.pop("classes")
    assert ModelCard.model_validate(three).classes[0] == "flow_z"
    targets = make_targets(_objects(), "flows")
    assert targets.shape == (3, 40, 48) and targets.dtype == np.float32


def _gradient_net() -> torch.nn.Module:
    """A 'flow head' that outputs the image's central-difference gradient (dy, dx) and the
    image itself: flipping the input flips the output and negates that axis's flow."""
    net = torch.nn.Conv2d(1, 3, 3, padding=1, bias=False)
    kernel = torch.zeros(3, 1, 3, 3)
    kernel[0, 0, 2, 1], kernel[0, 0, 0, 1] = 0.5, -0.5
    kernel[1, 0, 1, 2], kernel[1, 0, 1, 0] = 0.5, -0.5
    kernel[2, 0, 1, 1] = 1.0
    net.weight.data[:] = kernel
    return net.eval()


def test_tta_turns_flows_with_the_flips() -> None:
    """Test-time augmentation of a flow head un-flips the vectors: the flip-averaged output
    of a flip-equivariant flow net is its plain output (without it, the flows cancel)."""
    image = np.random.default_rng(0).random((1, 40, 52)).astype(np.float32)
    net = _gradient_net()
    plain = predict_image(net, image, tile=(32, 32), overlap=0.25, flows=True)
    averaged = predict_image(net, image, tile=(32, 32), overlap=0.25, tta=True, flows=True)
    np.testing.assert_allclose(averaged, plain, atol=1e-5)
    blind = predict_image(net, image, tile=(32, 32), overlap=0.25, tta=True)
    assert np.abs(blind[:2]).max() < 1e-5 < np.abs(plain[:2]).max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flow_head_tta_on_cuda_agrees_with_cpu() -> None:
    """The flow head's test-time augmentation on CUDA (bf16) turns the flows as on CPU."""
    image = np.random.default_rng(1).random((1, 70, 90)).astype(np.float32)
    net = _gradient_net()
    cpu = predict_image(net, image, tile=(32, 32), overlap=0.25, tta=True, flows=True)
    gpu = predict_image(
        net.cuda(), image, tile=(32, 32), overlap=0.25, tta=True, flows=True, device="cuda"
    )
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)  # bf16: about 8 bits of mantissa

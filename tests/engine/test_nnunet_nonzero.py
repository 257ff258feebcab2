"""nnU-Net's crop to the non-zero bounding box and ``use_mask_for_norm``, through segflow.

The results folder is built as in test_nnunet_source (a tiny PlainConvUNet, two seeded
folds saved as nnU-Net's trainer saves them), here with two MRI-like channels z-scored as
nnU-Net's ``ZScoreNormalization``: the first within the non-zero mask (``use_mask_for_norm``),
the second over the cropped image. The items are "brains": random positive values inside
an off-centre box, zero around it (nnU-Net crops that away) and zero cavities inside it
(holes of the non-zero mask, which nnU-Net fills).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _layouts import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_nnunet_source import DATASET, PATCH, PLANS, SPACING, _checkpoint, sound_voxels

from segflow import segment
from segflow.models.card import ChannelCard, item_statistics, nonzero_mask, normalize_image
from segflow.models.inference import predict_image
from segflow.models.sources import card_lines, describe_model, load_source

dna = pytest.importorskip("dynamic_network_architectures")
torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more

CHANNELS = 2
BRAIN_PLANS = copy.deepcopy(PLANS)
BRAIN_PLANS["configurations"]["3d_fullres"].update(
    normalization_schemes=["ZScoreNormalization", "ZScoreNormalization"],
    use_mask_for_norm=[True, False],
)
BRAIN_PLANS["foreground_intensity_properties_per_channel"]["1"] = PLANS[
    "foreground_intensity_properties_per_channel"
]["0"]
BRAIN_DATASET = {**DATASET, "channel_names": {"0": "T1", "1": "FLAIR"}}


def make_brain_results(folder: Path, masked: tuple[bool, bool] = (True, False)) -> Path:
    from segflow.models.nnunet_source import build_network, resolve_configuration

    plans = copy.deepcopy(BRAIN_PLANS)
    plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = list(masked)
    results = folder / "Dataset002_Brain" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    results.mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(plans))
    (results / "dataset.json").write_text(json.dumps(BRAIN_DATASET))
    config = resolve_configuration(plans, "3d_fullres", results)
    for fold in range(2):
        torch.manual_seed(10 + fold)
        network = build_network(config, CHANNELS, len(DATASET["labels"]), results)
        with torch.no_grad():  # affine norms away from 1/0, so every layer matters
            for name, p in network.named_parameters():
                if "norm" in name:
                    p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "weight" in name else p + 0.1)
        (results / f"fold_{fold}").mkdir()
        checkpoint = _checkpoint(network.eval(), plans, fold)
        torch.save(checkpoint, results / f"fold_{fold}" / "checkpoint_final.pth")
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_brain_results(tmp_path_factory.mktemp("nnunet_brain"))


@pytest.fixture(scope="module")
def unmasked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same folder without use_mask_for_norm: the crop alone."""
    return make_brain_results(tmp_path_factory.mktemp("nnunet_crop"), masked=(False, False))


def brain(shape: tuple[int, ...], box: tuple[slice, ...], seed: int) -> np.ndarray:
    """Two channels of positive values inside ``box``, 0 outside; zero cavities inside (a
    3 x 3 x 3 one in the middle where the box allows, and scattered single voxels), and a
    few voxels zero in the first channel only (inside the mask: the union is non-zero)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((CHANNELS, *shape), dtype=np.float32)
    inside = rng.normal(300.0, 90.0, (CHANNELS, *(s.stop - s.start for s in box)))
    image[(slice(None), *box)] = np.maximum(inside, 1.0)
    holes = rng.random(shape) < 0.04
    centre = [(s.start + s.stop) // 2 for s in box]
    middle = tuple(slice(max(c - 1, 0), c + 2) for c in centre)
    holes[middle] = True
    image[:, holes] = 0.0
    image[0, rng.random(shape) < 0.03] = 0.0
    return image


def _nnunet(
    results: Path, image: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nnUNetPredictor on ``image`` (c, z, y, x): classes, probabilities, and where nnU-Net
    computes soundly (sound_voxels on the non-zero box; outside it the result is exact)."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"),
        perform_everything_on_device=False, verbose=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(results), use_folds=(0, 1))
    classes, probabilities = predictor.predict_single_npy_array(
        image, {"spacing": list(spacing)}, None, None, True
    )
    crop = _nonzero_box(image)
    shape = tuple(s.stop - s.start for s in crop)
    sound = np.ones(image.shape[1:], dtype=bool)
    sound[crop] = sound_voxels(predictor, shape, spacing, SPACING, PATCH)
    return np.asarray(classes), np.asarray(probabilities), sound


def _nonzero_box(image: np.ndarray) -> tuple[slice, ...]:
    where = np.argwhere((image != 0).any(axis=0))
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(where.min(0), where.max(0), strict=True))


def _step(path: Path, **params: Any) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "raw", **params}  # fmt: skip


def test_the_card_masks_the_first_channel_and_crops(results: Path) -> None:
    described = describe_model(results)
    card = described.card
    first, second = (c.normalization for c in card.channels)
    assert (first.method, first.mask) == ("zscore", "nonzero")
    assert (second.method, second.mask) == ("zscore", "none")
    assert card.crop == "nonzero"
    lines = "\n".join(card_lines(str(results), described))
    assert "within the non-zero mask (use_mask_for_norm)" in lines
    assert "cropped to their non-zero bounding box" in lines
    assert "crop: the item's non-zero bounding box (background outside it)" in lines
    assert "along z of an anisotropic spacing; clipped to the input range)" in lines
    assert (
        "T1: item mean / standard deviation within its non-zero mask (z-score), 0 outside; "
        "FLAIR: item mean / standard deviation (z-score)"
    ) in lines
    identity = json.loads(card.identity_json())
    assert identity["crop"] == "nonzero"
    assert identity["channels"][0]["normalization"]["mask"] == "nonzero"
    assert "mask" not in identity["channels"][1]["normalization"]  # old cards keep their hash


def _compare(
    results: Path, shape: tuple[int, ...], box: tuple[slice, ...], spacing: tuple[float, ...],
    atol: float,
) -> None:  # fmt: skip
    image = brain(shape, box, seed=sum(shape))
    assert (nonzero_mask(image) & ~(image != 0).any(axis=0)).sum() > 20  # it has holes
    classes, probabilities, sound = _nnunet(results, image, spacing)
    ours = segment(image, [_step(results)], channel_axis=0, spacing=spacing, units="mm")
    outside = np.ones(shape, dtype=bool)
    outside[box] = False
    assert sound.mean() > 0.5
    np.testing.assert_array_equal(ours[:, outside], probabilities[:, outside])
    assert np.all(probabilities[0, outside] == 1.0)
    np.testing.assert_allclose(ours[:, sound], probabilities[:, sound], rtol=0, atol=atol)
    top2 = np.sort(probabilities, axis=0)[-2:]
    differs = (np.argmax(ours, axis=0) != classes) & sound
    assert np.all(top2[1][differs] - top2[0][differs] < 2 * atol)  # only near-ties may differ


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((12, 28, 24), (slice(1, 11), slice(5, 26), slice(2, 20))),
        ((10, 26, 21), (slice(3, 9), slice(2, 16), slice(1, 19))),
    ],
)  # the second: z and y of the box under a tile (padded as nnU-Net pads)
def test_segflow_equals_nnunet_predictor_on_a_brain(
    results: Path, shape: tuple[int, ...], box: tuple[slice, ...]
) -> None:
    # As in test_nnunet_source: nnU-Net blends in float16, 1e-3 bounds that where its sum
    # of weights is sound; outside the non-zero box both give background exactly.
    _compare(results, shape, box, tuple(SPACING), atol=1e-3)


SHAPE, BOX = (9, 22, 19), (slice(2, 9), slice(1, 17), slice(3, 19))


@pytest.mark.parametrize("spacing", [(3.0, 0.8, 0.8), (1.3, 1.6, 0.6)])  # z apart; splines
def test_a_resampled_brain_equals_nnunet_predictor(
    results: Path, spacing: tuple[float, ...]
) -> None:
    """Resampled, the crop's own range matters too: skimage's ``resize`` (nnU-Net's) clips
    its output to its input's range, each slice's when z is resampled apart, and the
    cubic splines overshoot at the brain's edge. segflow clips the same way
    (``resampling.clip_to_input``, ranges found with the box); without it the difference
    was 1.4e-2 here (measured 2026-12-07)."""
    assert describe_model(results).card.resampling.clip_to_input  # type: ignore[union-attr]
    _compare(results, SHAPE, BOX, spacing, atol=1e-3)


def test_without_the_crop_and_mask_the_result_differs(results: Path) -> None:
    """The comparison above bites: the whole item, z-scored as a whole, is not nnU-Net's."""
    shape, box = (12, 28, 24), (slice(1, 11), slice(5, 26), slice(2, 20))
    image = brain(shape, box, seed=sum(shape))
    _, probabilities, sound = _nnunet(results, image, tuple(SPACING))
    card = describe_model(results).card
    plain = [ChannelCard(name=c.name, normalization={"method": "zscore"}) for c in card.channels]
    x = normalize_image(image, plain, item_statistics(image, plain))
    loaded = load_source(results, card, batch_size=2)
    uncropped = predict_image(loaded.module, x, tile=card.tile, overlap=card.overlap,
                              window=card.window, activation=card.activation)  # fmt: skip
    assert np.abs(uncropped - probabilities)[:, sound].max() > 0.05


@given(
    layout=layouts(3, max_side=20),
    spacing=st.sampled_from([(2.0, 1.0, 1.0), (3.0, 0.8, 0.8), (1.3, 1.6, 0.6)]),
    margins=st.tuples(*[st.integers(0, 4)] * 6),
)
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_blockwise_equals_whole_item_on_every_layout(
    results: Path,
    layout: tuple[tuple[int, ...], tuple[int, ...], int],
    spacing: tuple[float, ...],
    margins: tuple[int, ...],
) -> None:
    shape, blocks, seed = layout
    box = tuple(
        slice(min(lo, n - 1), max(min(lo, n - 1) + 1, n - hi))
        for n, lo, hi in zip(shape, margins[:3], margins[3:], strict=True)
    )
    image = brain(shape, box, seed % 1000)
    image[(slice(None), *(slice(s.start, s.start + 1) for s in box))] = 7.0  # never all zero
    step = _step(results)
    out = segment(image, [step], block_shape=blocks, channel_axis=0, spacing=spacing, units="mm")
    whole = segment(image, [step], block_shape=shape, channel_axis=0, spacing=spacing, units="mm")
    # The box, the mask's holes, the statistics and the ranges are the whole item's in every
    # layout; what is left is the float64 blending and the splines' 24-voxel reach (1e-5,
    # as in test_nnunet_source)
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-5)


def test_the_crop_alone_equals_nnunet_predictor(unmasked: Path) -> None:
    """Without use_mask_for_norm: z-scored over the box (the zeros inside it count)."""
    assert describe_model(unmasked).card.channels[0].normalization.mask == "none"
    _compare(unmasked, (12, 28, 24), (slice(1, 11), slice(5, 26), slice(2, 20)),
             tuple(SPACING), atol=1e-3)  # fmt: skip


def test_streamed_blocks_equal_the_whole_item(unmasked: Path) -> None:
    """Nothing kept between phases (keep_limit 0): the phase after the box recomputes its
    input from the item, and gives the same output. (A card with a masked channel does not
    stream: its inference needs a halo after the mask's merge, see can_stream.)"""
    from segflow.engine.pipeline import compile_pipeline
    from segflow.engine.run import can_stream

    plan = compile_pipeline([_step(unmasked)], spatial_ndim=3, channels=2, dtype="float32")
    assert can_stream(plan)
    shape, box = (12, 28, 24), (slice(1, 11), slice(5, 26), slice(2, 20))
    image = brain(shape, box, seed=3)
    options = {"channel_axis": 0, "spacing": (3.0, 0.8, 0.8), "units": "mm"}
    whole = segment(image, [_step(unmasked)], **options)
    streamed = segment(image, [_step(unmasked)], block_shape=(5, 9, 7), keep_limit=0, **options)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5)  # as the test above


def test_an_all_zero_item_is_refused_in_one_line(results: Path) -> None:
    image = np.zeros((CHANNELS, 6, 20, 13), dtype=np.float32)
    with pytest.raises(ValueError, match=r"model.statistics: the item is all zero: .* it has "
                       r"no non-zero voxel") as error:  # fmt: skip
        segment(image, [_step(results)], channel_axis=0, spacing=tuple(SPACING), units="mm")
    assert "\n" not in str(error.value).strip()


def test_an_item_with_other_channels_is_refused_naming_them(results: Path) -> None:
    from segflow.engine.pipeline import compile_pipeline
    from segflow.errors import PlanError

    # the mask part adds a channel before the statistics part, which checks the item's count
    with pytest.raises(PlanError, match=r"expects 2 channels \(T1, FLAIR\), the image has 1 "):
        compile_pipeline([_step(results)], spatial_ndim=3, channels=1, dtype="float32")


def test_in_memory_statistics_take_the_mask() -> None:
    image = brain((6, 10, 9), (slice(1, 5), slice(2, 9), slice(1, 8)), seed=3)
    channels = [ChannelCard(name="t1", normalization={"method": "zscore", "mask": "nonzero"}),
                ChannelCard(name="flair", normalization={"method": "zscore"})]  # fmt: skip
    mask = nonzero_mask(image)
    stats = item_statistics(image, channels)
    assert stats[0] == pytest.approx((image[0][mask].mean(), image[0][mask].std()))
    assert stats[1] == pytest.approx((image[1].mean(), image[1].std()))
    x = normalize_image(image, channels, stats)
    assert np.all(x[0][~mask] == 0) and np.all(x[1][~mask] != 0)
    with pytest.raises(ValueError, match=r"`mask` \('nonzero'\) needs method 'zscore', not "
                       r"'percentile'"):  # fmt: skip
        ChannelCard(name="x", normalization={"method": "percentile", "mask": "nonzero"})

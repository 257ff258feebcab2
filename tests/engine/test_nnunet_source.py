"""nnU-Net v2 results folders run by the model step equal nnU-Net's own ``nnUNetPredictor``.

Every results folder here is built by the test: a plans.json with a tiny PlainConvUNet
3d_fullres configuration, a dataset.json, and two folds' checkpoint_final.pth from seeded
random initialisation, saved as nnU-Net's trainer saves them (the training log's numpy
scalars, ``init_args`` with the plans and a ``torch.device``). Tolerances (stated at each
comparison): nnU-Net accumulates its Gaussian-weighted logits in float16, segflow in float64;
the difference is a few 1e-4 of the probabilities.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _layouts import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import ConfigError, ModelError, PlanError
from segflow.models.card import item_statistics, normalize_image
from segflow.models.inference import predict_image
from segflow.models.sources import card_lines, describe_model, load_source

dna = pytest.importorskip("dynamic_network_architectures")
torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more

PATCH = [8, 16, 16]
SPACING = [2.0, 1.0, 1.0]
ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}  # fmt: skip
RESAMPLING = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
CONFIGURATION = {
    "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
    "batch_size": 2, "patch_size": PATCH, "median_image_size_in_voxels": [20, 40, 40],
    "spacing": SPACING, "normalization_schemes": ["CTNormalization"],
    "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": RESAMPLING,
    "resampling_fn_seg_kwargs": {**RESAMPLING, "is_seg": True, "order": 1},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {**RESAMPLING, "order": 1},
    "architecture": ARCHITECTURE, "batch_dice": True,
}  # fmt: skip
PLANS = {
    "dataset_name": "Dataset001_Tiny", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": SPACING,
    "original_median_shape_after_transp": [20, 40, 40], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {"3d_fullres": CONFIGURATION},
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": {
        "max": 900.0, "mean": 40.0, "median": 35.0, "min": -1000.0,
        "percentile_00_5": -120.0, "percentile_99_5": 260.0, "std": 70.0}},
}  # fmt: skip
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
           "numTraining": 2, "file_ending": ".nii.gz", "name": "Tiny"}  # fmt: skip


def _fold_network(seed: int, plans: dict[str, Any], classes: int) -> torch.nn.Module:
    from segflow.models.nnunet_source import build_network, resolve_configuration

    torch.manual_seed(seed)
    config = resolve_configuration(plans, "3d_fullres", Path("."))
    network = build_network(config, 1, classes, Path("."))
    with torch.no_grad():  # affine norms away from 1/0, so every layer matters
        for name, p in network.named_parameters():
            if "norm" in name:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "weight" in name else p + 0.1)
    return network.eval()


def _checkpoint(network: torch.nn.Module, plans: dict[str, Any], fold: int) -> dict[str, Any]:
    """What nnUNetTrainer.save_checkpoint writes (the log holds numpy scalars)."""
    return {
        "network_weights": network.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {
            "train_losses": [np.float64(0.52)],
            "ema_fg_dice": [np.float64(0.1)],
            "dice_per_class_or_region": [[np.float32(0.2), np.float32(0.3)]],
            "epoch_start_timestamps": [1.7e9],
        },
        "_best_ema": np.float64(0.1),
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": fold,
            "dataset_json": DATASET,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def make_results(folder: Path, plans: dict[str, Any] = PLANS, folds: int = 2) -> Path:
    results = folder / "Dataset001_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    results.mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(plans))
    (results / "dataset.json").write_text(json.dumps(DATASET))
    for fold in range(folds):
        (results / f"fold_{fold}").mkdir()
        network = _fold_network(fold, plans, len(DATASET["labels"]))
        torch.save(
            _checkpoint(network, plans, fold), results / f"fold_{fold}" / "checkpoint_final.pth"
        )
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_results(tmp_path_factory.mktemp("nnunet"))


def _ct(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """HU-like values, never exactly 0 (nnU-Net crops to the non-zero box; segflow does not)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40.0, 150.0, shape).astype(np.float32)
    image[image == 0] = 1.0
    return image


def _nnunet(
    results: Path, image: np.ndarray, spacing: tuple[float, ...] = tuple(SPACING)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nnUNetPredictor on ``image`` (z, y, x) at ``spacing``: classes, probabilities, and
    where every model-grid voxel the result reads has nnU-Net's own float16 sum of Gaussian
    weights at least 1e-3 (see below)."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"),
        perform_everything_on_device=False, verbose=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(results), use_folds=(0, 1))
    classes, probabilities = predictor.predict_single_npy_array(
        image[None], {"spacing": list(spacing)}, None, None, True
    )
    sound = sound_voxels(predictor, image.shape, spacing, SPACING, PATCH)
    return np.asarray(classes), np.asarray(probabilities), sound


def sound_voxels(
    predictor: Any, shape: tuple[int, ...], spacing: Sequence[float], target: Sequence[float],
    patch: Sequence[int],
) -> np.ndarray:  # fmt: skip
    """Item voxels whose value nnU-Net computes soundly: every model-grid voxel it reads back
    has nnU-Net's float16 sum of Gaussian weights at least 1e-3 (on the outer voxels,
    covered by tile borders only, its float16 products underflow)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from segflow.models.resampling import plan_resampling, resample_region

    grid = plan_resampling(shape, spacing, target)
    model = shape if grid is None else grid.model
    padded = tuple(max(n, t) for n, t in zip(model, patch, strict=True))
    gaussian = compute_gaussian(tuple(patch), 1 / 8, 10, device=torch.device("cpu"))
    weight_sum = torch.zeros(padded, dtype=torch.half)
    for tile in predictor._internal_get_sliding_window_slicers(padded):
        weight_sum[tile[1:]] += gaussian
    crop = tuple(slice((p - n) // 2, (p - n) // 2 + n) for p, n in zip(padded, model, strict=True))
    sound = weight_sum[crop].float().numpy() >= 1e-3
    if grid is None:
        return sound
    whole = (tuple(slice(0, n) for n in grid.model), tuple(slice(0, n) for n in grid.item))
    unsound = resample_region((~sound)[None].astype(float), whole[0], grid.model, grid.item,
                              whole[1], grid.back)[0]  # fmt: skip
    return np.asarray(unsound == 0)


def _segflow(results: Path, image: np.ndarray) -> np.ndarray:
    """segflow's probabilities on the whole item, from the loaded source (float32)."""
    card = describe_model(results).card
    x = normalize_image(image[None], card.channels, item_statistics(image[None], card.channels))
    loaded = load_source(results, card, batch_size=2)
    return predict_image(loaded.module, x, tile=card.tile, overlap=card.overlap,
                         window=card.window, activation=card.activation, batch_size=2)  # fmt: skip


def _step(path: Path, **params: Any) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "foreground", **params}  # fmt: skip


# -- the card and the equality with nnU-Net -----------------------------------------------------


def test_the_card_comes_from_plans_and_dataset_json(results: Path) -> None:
    described = describe_model(results)
    card = described.card
    assert (card.spatial_dims, card.tile, card.overlap) == (3, (8, 16, 16), 0.5)
    assert card.classes == ("background", "liver", "tumour")
    assert card.channels[0].name == "CT" and card.spacing == (2.0, 1.0, 1.0)
    norm = card.channels[0].normalization
    assert (norm.method, norm.low, norm.high) == ("fixed", 40.0, 110.0)  # mean, mean + std
    assert card.architecture.params["clip"] == [[-160 / 70, 220 / 70]]
    assert card.architecture.params["folds"] == ["0", "1"]
    assert card.activation == "softmax_after_blending"
    how = card.resampling
    assert how is not None and (how.order, how.order_back, how.order_z) == (3, 1, 0)
    assert how.clip == ((-160 / 70, 220 / 70),)  # the CT window, before and after resampling
    lines = "\n".join(card_lines(str(results), described))
    assert "CTNormalization" in lines and "resampled to the plans' spacing" in lines


@pytest.mark.parametrize("shape", [(12, 28, 24), (6, 20, 13)])  # the second: z under a tile
def test_segflow_equals_nnunet_predictor(results: Path, shape: tuple[int, ...]) -> None:
    image = _ct(shape, seed=sum(shape))
    classes, probabilities, sound = _nnunet(results, image)
    ours = _segflow(results, image)
    # nnU-Net blends in float16 (its Gaussian, predicted_logits and n_predictions are half
    # precision). Where its sum of weights is at least 1e-3 (the Gaussian's peak is 10),
    # that costs a few 1e-4 of the probabilities: 1e-3 bounds it. On the item's outer
    # voxels, covered only by tile borders, nnU-Net's products underflow in float16 and its
    # output is rounding noise (0.5 / 0 / 0 logits at a 3-D corner); segflow blends in
    # float64 and gives the tile's own output there.
    assert sound.mean() > 0.6
    np.testing.assert_allclose(ours[:, sound], probabilities[:, sound], rtol=0, atol=1e-3)
    top2 = np.sort(probabilities, axis=0)[-2:]
    differs = (np.argmax(ours, axis=0) != classes) & sound
    assert np.all(top2[1][differs] - top2[0][differs] < 2e-3)  # only near-ties may differ


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((9, 22, 19), (3.0, 0.8, 0.8)), ((14, 13, 30), (1.3, 1.6, 0.6))],
)  # z apart (order 0) as the first is anisotropic; all three axes by splines in the second
def test_an_item_at_another_spacing_equals_nnunet_predictor(
    results: Path, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> None:
    image = _ct(shape, seed=sum(shape))
    classes, probabilities, sound = _nnunet(results, image, spacing)
    ours = segment(image, [_step(results, output="raw")], spacing=spacing, units="mm")
    # The resampling itself equals nnU-Net's to float32 rounding (test_models_resampling);
    # what is left is nnU-Net's float16 blending, as in the test above, now on the model's
    # grid: 1e-3 bounds it where every voxel read back is sound.
    assert sound.mean() > 0.5
    np.testing.assert_allclose(ours[:, sound], probabilities[:, sound], rtol=0, atol=1e-3)
    top2 = np.sort(probabilities, axis=0)[-2:]
    differs = (np.argmax(ours, axis=0) != classes) & sound
    assert np.all(top2[1][differs] - top2[0][differs] < 2e-3)  # only near-ties may differ


@given(layout=layouts(3, max_side=20), spacing=st.sampled_from(
    [(3.0, 0.8, 0.8), (1.3, 1.6, 0.6), (2.0, 1.5, 0.5)]))  # fmt: skip
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
def test_blockwise_resampled_equals_whole_item_on_every_layout(
    results: Path,
    layout: tuple[tuple[int, ...], tuple[int, ...], int],
    spacing: tuple[float, ...],
) -> None:
    shape, blocks, seed = layout
    image = _ct(shape, seed % 1000)
    step = _step(results, output="raw")
    out = segment(image, [step], block_shape=blocks, spacing=spacing, units="mm")
    whole = segment(image, [step], block_shape=shape, spacing=spacing, units="mm")
    # A block's spline coefficients leave out item voxels more than 24 away (a weight of
    # 2e-14 of the window's range); the tiles it runs are the same, blended in float64
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-5)


@given(layout=layouts(3, max_side=20))
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_blockwise_equals_whole_item_on_every_layout(
    results: Path, layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    shape, blocks, seed = layout
    image = _ct(shape, seed % 1000)
    out = segment(image, [_step(results)], block_shape=blocks)
    whole = _segflow(results, image)
    # float64 blending sums the same tiles in the same order; the network is the same
    np.testing.assert_allclose(out, 1.0 - whole[0], rtol=0, atol=1e-5)


def test_classes_through_the_pipeline(results: Path) -> None:
    image = _ct((10, 24, 20), seed=5)
    out = segment(image, [_step(results, output="classes")], block_shape=(5, 9, 20))
    np.testing.assert_array_equal(out, np.argmax(_segflow(results, image), axis=0))


# -- bad results folders, one line each ---------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text.strip(), text
    return text


def _copy(results: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "Dataset001_Tiny" / results.name
    shutil.copytree(results, folder)
    return folder


def test_a_folder_without_plans_is_refused(results: Path, tmp_path: Path) -> None:
    folder = _copy(results, tmp_path)
    (folder / "plans.json").unlink()
    with pytest.raises(ModelError, match=r"nnU-Net results folder '.*' has no plans.json") as error:
        describe_model(folder)
    _one_line(error)


def test_a_missing_fold_is_refused(results: Path, tmp_path: Path) -> None:
    folder = _copy(results, tmp_path)
    shutil.copytree(folder / "fold_1", folder / "fold_2")
    shutil.rmtree(folder / "fold_1")
    with pytest.raises(ModelError, match=r"fold_1 is missing \(folds 0, 2 are there\)") as error:
        describe_model(folder)
    _one_line(error)
    (folder / "fold_1").mkdir()  # a fold whose training did not finish
    with pytest.raises(ModelError, match=r"fold_1 has no checkpoint_final.pth"):
        describe_model(folder)


class _Payload:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(
    results: Path, tmp_path: Path
) -> None:
    folder = _copy(results, tmp_path)
    marker = tmp_path / "ran"
    checkpoint = torch.load(results / "fold_1" / "checkpoint_final.pth", weights_only=False)
    checkpoint["init_args"]["payload"] = _Payload(marker)
    torch.save(checkpoint, folder / "fold_1" / "checkpoint_final.pth")
    card = describe_model(folder).card  # fold_0 is fine
    with pytest.raises(ModelError, match=r"fold_1/checkpoint_final.pth cannot be read as data "
                       r"only, .*Unsupported global") as error:  # fmt: skip
        load_source(folder, card)
    _one_line(error)
    assert not marker.exists()


def test_an_item_at_another_spacing_is_resampled_or_refused_naming_both(results: Path) -> None:
    def plan(spacing: tuple[float, ...], units: str = "mm", **params: Any) -> Any:
        return compile_pipeline([_step(results, **params)], spatial_ndim=3, channels=1,
                                dtype="float32", spacing=spacing, units=units)  # fmt: skip

    with pytest.raises(PlanError, match=r"trained at a pixel size of \(2, 1, 1\) mm, the item's "
                       r"is \(3, 0.8, 0.8\) mm") as error:  # fmt: skip
        plan((3.0, 0.8, 0.8), resample=False)
    _one_line(error)
    plan((2.1, 0.95, 1.0), resample=False)  # within the step's spacing_tolerance (25 %)
    resampled = plan((3.0, 0.8, 0.8))  # nnU-Net's way: resampled to (2, 1, 1) mm
    infer = resampled.phases[-1].steps[-1].params
    assert infer.pixel_size == (3.0, 0.8, 0.8)
    assert resampled.halo == (33, 48, 48)  # a tile of (2, 1, 1) mm in item pixels, splines
    named = plan((3.0, 0.8, 0.8), output="classes").out_categories
    assert named == ((0, "background", None), (1, "liver", None), (2, "tumour", None))
    in_um = plan((3000.0, 800.0, 800.0), units="um")
    assert in_um.phases[-1].steps[-1].params.pixel_size == pytest.approx((3.0, 0.8, 0.8))
    in_pixels = plan((1.0, 1.0, 1.0), units="pixel")  # nothing to compare: run as it is
    assert in_pixels.phases[-1].steps[-1].params.pixel_size is None
    with pytest.raises(PlanError, match=r"resample: true, but the item's pixel size is in "
                       r"'pixel'.*: set pixel_size"):  # fmt: skip
        plan((1.0, 1.0, 1.0), units="pixel", resample=True)
    with pytest.raises(PlanError, match=r"`pixel_size` \(1.0, 2.0\) must give 3 positive "
                       r"sizes, \(z\), y, x, in mm"):  # fmt: skip
        plan((3.0, 0.8, 0.8), pixel_size=(1.0, 2.0))


def test_a_network_outside_dynamic_network_architectures_is_refused(
    results: Path, tmp_path: Path
) -> None:
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    folder = _copy(results, tmp_path)
    (folder / "plans.json").write_text(json.dumps(plans))
    card = describe_model(folder).card
    with pytest.raises(ModelError, match=r"network 'os.system' is not one of "
                       r"dynamic_network_architectures'") as error:  # fmt: skip
        load_source(folder, card)
    _one_line(error)


def test_a_2d_item_is_refused_by_the_3d_configuration(results: Path) -> None:
    with pytest.raises((PlanError, ConfigError), match=r"is 3-D, the item is 2-D"):
        compile_pipeline([_step(results)], spatial_ndim=2, channels=1, dtype="float32")


def test_old_format_plans_build_the_same_network(results: Path) -> None:
    from segflow.models.nnunet_source import build_network, resolve_configuration

    kwargs = ARCHITECTURE["arch_kwargs"]
    old = {k: v for k, v in CONFIGURATION.items() if k != "architecture"}
    old.update(
        UNet_class_name="PlainConvUNet",
        UNet_base_num_features=4,
        unet_max_num_features=16,
        n_conv_per_stage_encoder=kwargs["n_conv_per_stage"],
        n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"],
        conv_kernel_sizes=kwargs["kernel_sizes"],
        pool_op_kernel_sizes=kwargs["strides"],
    )
    plans = {**PLANS, "configurations": {"3d_fullres": old}}
    network = build_network(resolve_configuration(plans, "3d_fullres", results), 1, 3, results)
    weights = torch.load(results / "fold_0" / "checkpoint_final.pth", weights_only=False)
    network.load_state_dict(weights["network_weights"])  # the same parameters, shapes and names


@pytest.mark.parametrize("tile", [(8, 16, 16), (5, 12), (128, 128, 128)])
def test_the_blending_window_is_nnunets(tile: tuple[int, ...]) -> None:
    nnunet = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    from segflow.models.tiling import tile_weights

    theirs = nnunet.compute_gaussian(tile, 1 / 8, 10, device=torch.device("cpu")).float().numpy()
    ours = tile_weights(tile, window="gaussian_nnunet")
    # nnU-Net holds its map in float16 (relative rounding 2**-11), scaled to a peak of 10;
    # its zeros become the smallest float16 value present, ours the smallest float32 one
    np.testing.assert_allclose(ours * 10, theirs, rtol=1e-3, atol=1e-7)

"""Make configs/models/sts-ct-nnunet: a tiny nnU-Net v2 3-D results folder trained here.

The CT example of issue 23 (configs/ct-nnunet.yaml) needs an nnU-Net v2 results folder whose
spacing is not the CT's, so that the model step resamples to it and back. This script writes
one as nnU-Net lays it out (``Dataset501_STS/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres``
with ``plans.json``, ``dataset.json`` and ``fold_0/checkpoint_final.pth``) and trains its
network for a few minutes on CPU:

* data: the IBSI soft-tissue sarcoma CT of ../shared/data (CC BY 3.0, see its PROVENANCE.md):
  STS_001 and STS_003 train, STS_002 (the copy in tests/data) is held out;
* plans: one ``3d_fullres`` configuration at 3 x 2 x 2 mm (z, y, x; the CT is
  3.27 x 0.98 x 0.98 mm), a 4-stage PlainConvUNet of 4..32 features, patch 16 x 48 x 48,
  ``CTNormalization`` with the training foreground's statistics, nnU-Net's default
  resampling (spline 3, order 0 along z of an anisotropic spacing; logits back with order 1);
* preprocessing: nnU-Net's own functions (``CTNormalization``, ``resample_data_or_seg_to_shape``);
* training: patches (two in three centred on tumour), random flips, cross-entropy + soft
  Dice, Adam, seeded; no test-time mirroring (the trainer name says so, as nnU-Net's
  ``nnUNetTrainerNoMirroring``), which keeps the example fast on CPU;
* the checkpoint holds what ``nnUNetTrainer.save_checkpoint`` writes, less the optimizer
  state (``nnUNetPredictor`` and segflow read ``network_weights``, ``init_args``,
  ``trainer_name`` and ``inference_allowed_mirroring_axes``).

Run: ``python benchmarks/train_nnunet_ct.py [--minutes 4]`` (needs nnunetv2, in the ``ml``
extra). It prints the held-out Dice of segflow's run at the CT's own spacing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medical" / "ibsi_sts_ct"
OUT = ROOT / "configs" / "models" / "sts-ct-nnunet"
FOLDER = "Dataset501_STS/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
SPACING = [3.0, 2.0, 2.0]
PATCH = [16, 48, 48]
TRAIN = ["STS_001", "STS_003"]
HELD_OUT = ROOT / "tests" / "data" / "ct" / "STS_002"
ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [4, 8, 16, 32],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2],
        "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}  # fmt: skip
RESAMPLING = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "sarcoma": 1},
           "numTraining": 2, "file_ending": ".nii.gz",
           "name": "IBSI soft-tissue sarcoma CT (tiny, segflow example)",
           "licence":
               "CC BY 3.0 (TCIA Soft-tissue-Sarcoma via the IBSI validation set)"}  # fmt: skip


def read_case(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Image (HU) and mask, ``(z, y, x)``, and the spacing in mm, via segflow's reader."""
    from segflow.io import open_item

    def whole(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
        reader = open_item(str(path))
        box = tuple(slice(0, n) for n in reader.info.spatial_shape)
        return reader.read(box)[0], tuple(abs(s) for s in reader.info.spacing)

    image, spacing = whole(folder / "CT_image.nii.gz")
    mask, _ = whole(folder / "CT_mask.nii.gz")
    return image.astype(np.float32), (mask > 0).astype(np.uint8), spacing


def foreground_properties(cases: list[tuple[np.ndarray, np.ndarray, Any]]) -> dict[str, float]:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` for the one CT channel."""
    values = np.concatenate([image[mask > 0] for image, mask, _ in cases]).astype(np.float64)
    low, median, high = np.percentile(values, [0.5, 50, 99.5])
    return {"max": float(values.max()), "mean": float(values.mean()), "median": float(median),
            "min": float(values.min()), "percentile_00_5": float(low),
            "percentile_99_5": float(high), "std": float(values.std())}  # fmt: skip


def make_plans(props: dict[str, float]) -> dict[str, Any]:
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": PATCH, "median_image_size_in_voxels": [56, 90, 90],
        "spacing": SPACING, "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": RESAMPLING,
        "resampling_fn_seg_kwargs": {**RESAMPLING, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**RESAMPLING, "order": 1},
        "architecture": ARCHITECTURE, "batch_dice": False,
    }  # fmt: skip
    return {
        "dataset_name": "Dataset501_STS", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.27, 0.9766, 0.9766],
        "original_median_shape_after_transp": [55, 180, 176],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": props},
    }  # fmt: skip


def preprocess(
    case: tuple[np.ndarray, np.ndarray, tuple[float, ...]], props: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's preprocessing of one case: CT normalisation, then resampling."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
    )
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    image, mask, spacing = case
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=props)
    data = norm.run(image.copy(), None)[None]
    shape = compute_new_shape(image.shape, spacing, SPACING)
    data = resample_data_or_seg_to_shape(data, shape, spacing, SPACING, **RESAMPLING)
    seg = resample_data_or_seg_to_shape(
        mask[None].astype(np.float32), shape, spacing, SPACING, **{**RESAMPLING, "is_seg": True,
                                                                   "order": 1}
    )  # fmt: skip
    return data.astype(np.float32), seg[0].astype(np.int64)


def sample(
    cases: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(batch):
        data, seg = cases[rng.integers(len(cases))]
        pad = [(0, 0)] + [(0, max(0, p - n)) for p, n in zip(PATCH, seg.shape, strict=True)]
        data, seg = np.pad(data, pad, mode="edge"), np.pad(seg, pad[1:])
        if rng.random() < 2 / 3:
            centre = np.argwhere(seg > 0)[rng.integers((seg > 0).sum())]
        else:
            centre = np.array([rng.integers(n) for n in seg.shape])
        start = [int(np.clip(c - p // 2, 0, n - p))
                 for c, p, n in zip(centre, PATCH, seg.shape, strict=True)]  # fmt: skip
        box = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        x, y = data[(slice(None), *box)], seg[box]
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis + 1), np.flip(y, axis)
        images.append(x.copy())
        labels.append(y.copy())
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def train(network: torch.nn.Module, cases: list[Any], minutes: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    losses: list[float] = []
    end = time.monotonic() + 60 * minutes
    network.train()
    while time.monotonic() < end:
        x, y = sample(cases, rng, batch=2)
        logits = network(x)
        probs = torch.softmax(logits, 1)[:, 1]
        target = (y == 1).float()
        dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + dice
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            print(f"iteration {len(losses)}: loss {np.mean(losses[-20:]):.3f}", flush=True)
    return losses


def checkpoint(network: torch.nn.Module, plans: dict[str, Any], losses: list[float]) -> dict:
    """What nnUNetTrainer.save_checkpoint writes, without the optimizer's state."""
    return {
        "network_weights": network.state_dict(), "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {"train_losses": [np.float64(v) for v in losses[-50:]]},
        "_best_ema": None, "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                      "dataset_json": DATASET, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainerNoMirroring", "inference_allowed_mirroring_axes": None,
    }  # fmt: skip


def held_out_dice(results: Path) -> float:
    from segflow import segment

    image, mask, spacing = read_case(HELD_OUT)
    step = {"op": "model", "path": str(results), "output": "classes", "device": "cpu"}
    classes = segment(image, [step], spacing=spacing, units="mm")
    both = float(np.logical_and(classes == 1, mask == 1).sum())
    return 2 * both / max(1.0, float((classes == 1).sum() + mask.sum()))


def main() -> None:
    from segflow.models.nnunet_source import build_network, resolve_configuration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=501)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    raw = [read_case(DATA / name) for name in TRAIN]
    props = foreground_properties(raw)
    plans = make_plans(props)
    cases = [preprocess(case, props) for case in raw]
    config = resolve_configuration(plans, "3d_fullres", OUT)
    network = build_network(config, 1, len(DATASET["labels"]), OUT)
    losses = train(network, cases, args.minutes, args.seed)
    results = OUT / FOLDER
    shutil.rmtree(OUT / FOLDER.split("/")[0], ignore_errors=True)
    (results / "fold_0").mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(plans, indent=1))
    (results / "dataset.json").write_text(json.dumps(DATASET, indent=1))
    torch.save(checkpoint(network.eval(), plans, losses),
               results / "fold_0" / "checkpoint_final.pth")  # fmt: skip
    print(f"{len(losses)} iterations in {args.minutes} min; last 50 losses "
          f"{np.mean(losses[-50:]):.3f}")  # fmt: skip
    print(f"held-out STS_002 Dice (segflow, resampled to {SPACING} mm and back): "
          f"{held_out_dice(results):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

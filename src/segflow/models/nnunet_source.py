"""nnU-Net v2 results folders as a model source: ``plans.json``, ``dataset.json``, folds.

A results folder (``Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres``) holds what
nnU-Net's ``nnUNetPredictor`` reads, and the card comes from the same files:

* the configuration: the checkpoints' ``init_args.configuration`` (what nnU-Net uses), else
  the folder's name ``TRAINER__PLANS__CONFIGURATION``, else the plans' only configuration;
  ``inherits_from`` is resolved as nnU-Net does;
* the network: the configuration's ``architecture`` (``network_class_name`` from
  ``dynamic_network_architectures``, ``arch_kwargs``, the ``_kw_requires_import`` names from
  ``torch.nn`` only: no other module is imported), without deep supervision; plans in the
  older format (``UNet_class_name``) are converted as nnU-Net converts them;
* the tile: the ``patch_size``, step half a tile (nnU-Net's ``tile_step_size`` 0.5), blended
  with nnU-Net's Gaussian (:func:`segflow.models.tiling.tile_weights`,
  ``gaussian_nnunet``), the softmax taken of the blended logits as nnU-Net does;
* the channels: ``dataset.json`` ``channel_names`` and each one's ``normalization_schemes``
  entry: ``CTNormalization`` (clip to the dataset's foreground percentiles 0.5 / 99.5 and
  z-score with its stored mean and standard deviation,
  ``foreground_intensity_properties_per_channel``), ``ZScoreNormalization`` (the item's mean
  and standard deviation: nnU-Net's per-image statistics become per-item ones),
  ``RescaleTo01Normalization``, ``RGBTo0_1Normalization`` and ``NoNormalization``; a
  ``ZScoreNormalization`` channel with ``use_mask_for_norm`` takes the item's mean and
  standard deviation within its non-zero mask and is 0 outside it (``mask: nonzero``; the
  other schemes ignore ``use_mask_for_norm``, as nnU-Net's do);
* the crop: every item is cropped to its non-zero bounding box as ``crop_to_nonzero`` does
  (``crop: nonzero``; the box of the voxels where any channel is not 0): the statistics,
  the resampling and the tile grid are the box's, and the prediction outside it is
  background (:mod:`segflow.ops.model_nonzero`); an all-zero item is refused in one line;
* the classes: ``dataset.json`` ``labels``, ordered by their values (0 .. n - 1); region-based
  trainings (a label naming several values) are refused;
* the spacing: the configuration's ``spacing`` in mm, axes ``(z), y, x`` (SimpleITK's order,
  reversed from ``x, y, z``), and how to resample to it: ``resampling_fn_data_kwargs``
  (spline order 3, order 0 along the out-of-plane axis of an anisotropic spacing) and
  ``resampling_fn_probabilities_kwargs`` (order 1 for the logits on their way back), with
  each CT channel's window as the clip and, as ``skimage.transform.resize`` clips, the
  scaled input's range (``clip_to_input``) (:mod:`segflow.models.resampling`, blockwise).

The network the step runs is the ensemble of every ``fold_*/checkpoint_final.pth``: each
fold's logits averaged over the mirrorings the checkpoint allows
(``inference_allowed_mirroring_axes``, as ``_internal_maybe_mirror_and_predict``), then
averaged over the folds, as ``predict_logits_from_preprocessed_data``. Leave the step's
``tta`` off: the mirroring is nnU-Net's own.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, plain containers,
numbers, strings, ``torch.device`` and numpy's numeric scalars (nnU-Net's training log holds
``numpy.float64`` values) and nothing else; a checkpoint that needs any other object is
refused in one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel
from segflow.models.inference import Device, resolve_device
from segflow.models.sources import ModelSource, SourceCard

CHECKPOINT = "checkpoint_final.pth"
ARCHITECTURES = "dynamic_network_architectures.architectures."
_FOLD = re.compile(r"^fold_(\d+|all)$")
#: nnU-Net's blending window (``compute_gaussian``: sigma 1/8 of the tile, centred on tile // 2).
WINDOW = "gaussian_nnunet"


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise ModelError(
            f"nnU-Net results folder '{folder}' has no {name}: segflow builds the network and "
            "its card from plans.json and dataset.json beside the fold_* folders"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"nnU-Net results folder '{folder}': {name} cannot be read ({exc})"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(f"nnU-Net results folder '{folder}': {name} is not a JSON object")
    return data


def fold_checkpoints(folder: Path) -> list[Path]:
    """Every fold's ``checkpoint_final.pth``; a fold folder without it, or a numbered fold
    missing between others, is refused in one line."""
    folds = sorted(p for p in folder.iterdir() if p.is_dir() and _FOLD.match(p.name))
    if not folds:
        raise ModelError(f"nnU-Net results folder '{folder}' has no fold_* folder")
    unfinished = [p.name for p in folds if not (p / CHECKPOINT).is_file()]
    if unfinished:
        raise ModelError(
            f"nnU-Net results folder '{folder}': {', '.join(unfinished)} has no {CHECKPOINT} "
            "(training not finished?): finish it or move the fold folder away"
        )
    numbers = sorted(int(p.name[5:]) for p in folds if p.name != "fold_all")
    missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
    if missing:
        raise ModelError(
            f"nnU-Net results folder '{folder}': fold_{missing[0]} is missing (folds "
            f"{', '.join(map(str, numbers))} are there): an ensemble without it is not the "
            "trained model"
        )
    return [p / CHECKPOINT for p in sorted(folds, key=lambda p: (p.name == "fold_all", p.name))]


def _numpy_scalars() -> list[Any]:
    """numpy's numeric scalar reconstructor and dtypes, under both their module names."""
    from numpy import dtypes

    numeric = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    numeric = [d for d in numeric if d not in (dtypes.ObjectDType, dtypes.VoidDType)]
    scalar = np._core.multiarray.scalar
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *numeric]


def read_checkpoint(path: Path, folder: Path) -> dict[str, Any]:
    """A checkpoint as data only (see the module docstring); one line when it is not."""
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line),
                   lines[0] if lines else type(exc).__name__)  # fmt: skip
        raise ModelError(
            f"nnU-Net results folder '{folder}': {path.relative_to(folder)} cannot be read as "
            f"data only, segflow does not unpickle other objects ({why[:200]})"
        ) from None
    weights = data.get("network_weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise ModelError(
            f"nnU-Net results folder '{folder}': {path.relative_to(folder)} has no "
            "network_weights state dict"
        )
    return data


def _configuration_name(folder: Path, plans: dict[str, Any], checkpoint: dict[str, Any]) -> str:
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise ModelError(f"nnU-Net results folder '{folder}': plans.json has no configurations")
    init = checkpoint.get("init_args")
    name = init.get("configuration") if isinstance(init, dict) else None
    parts = folder.name.split("__")
    if name is None and len(parts) == 3:
        name = parts[2]
    if name is None and len(configurations) == 1:
        name = next(iter(configurations))
    if name not in configurations:
        raise ModelError(
            f"nnU-Net results folder '{folder}': configuration {name!r} is not one of the "
            f"plans' ({', '.join(configurations)})"
        )
    return str(name)


def resolve_configuration(plans: dict[str, Any], name: str, folder: Path) -> dict[str, Any]:
    """The configuration with ``inherits_from`` resolved, in the current plans format."""
    config: dict[str, Any] = {}
    seen = []
    while name not in seen:
        seen.append(name)
        own = plans["configurations"].get(name)
        if not isinstance(own, dict):
            raise ModelError(
                f"nnU-Net results folder '{folder}': configuration {name!r} is missing"
            )
        config = {**own, **config}
        if "inherits_from" not in own:
            break
        name = own["inherits_from"]
    if "previous_stage" in config:
        raise ModelError(
            f"nnU-Net results folder '{folder}': configuration {seen[0]!r} is a cascade stage "
            "(it needs the previous stage's segmentation as input): run 3d_fullres or 3d_lowres"
        )
    return config if "architecture" in config else _converted(config, folder)


def _converted(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Old-format plans (``UNet_class_name``) in the current format, as nnU-Net converts."""
    classes = {"PlainConvUNet": ("unet.PlainConvUNet", "n_conv_per_stage"),
               "ResidualEncoderUNet": ("residual_unet.ResidualEncoderUNet",
                                       "n_blocks_per_stage")}  # fmt: skip
    old = config.get("UNet_class_name")
    if old not in classes:
        raise ModelError(
            f"nnU-Net results folder '{folder}': the configuration has neither an architecture "
            f"nor a UNet_class_name segflow knows ({old!r})"
        )
    dim = len(config["patch_size"])
    stages = len(config["n_conv_per_stage_encoder"])
    base, top = config["UNet_base_num_features"], config["unet_max_num_features"]
    kwargs = {
        "n_stages": stages,
        "features_per_stage": [min(base * 2**i, top) for i in range(stages)],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        classes[old][1]: config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }  # fmt: skip
    architecture = {
        "network_class_name": ARCHITECTURES + classes[old][0],
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return {**config, "architecture": architecture}


def _torch_nn(name: str, folder: Path) -> Any:
    """A ``torch.nn`` class named in the plans (nothing outside ``torch.nn`` is imported)."""
    import importlib

    module, _, attribute = name.rpartition(".")
    if not (module == "torch.nn" or module.startswith("torch.nn.")):
        raise ModelError(
            f"nnU-Net results folder '{folder}': plans name {name!r}; segflow imports "
            "torch.nn classes only for a network's parts"
        )
    found = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(found, type):
        raise ModelError(f"nnU-Net results folder '{folder}': plans name {name!r}, not a class")
    return found


def build_network(
    config: dict[str, Any], channels: int, classes: int, folder: Path
) -> torch.nn.Module:
    """The configuration's network, as ``get_network_from_plans`` builds it (no deep
    supervision), from ``dynamic_network_architectures`` only."""
    import importlib

    architecture = config["architecture"]
    name = str(architecture.get("network_class_name", ""))
    if not name.startswith(ARCHITECTURES):
        raise ModelError(
            f"nnU-Net results folder '{folder}': network {name!r} is not one of "
            "dynamic_network_architectures' (segflow imports no other network code)"
        )
    try:
        module = importlib.import_module(name.rpartition(".")[0])
    except ImportError as exc:
        raise ModelError(
            f"nnU-Net results folder '{folder}': network {name!r} cannot be imported ({exc}): "
            "pip install 'segflow[ml]' (dynamic_network_architectures)"
        ) from None
    kwargs = dict(architecture.get("arch_kwargs", {}))
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _torch_nn(str(kwargs[key]), folder)
    network_class = getattr(module, name.rpartition(".")[2], None)
    if not isinstance(network_class, type):
        raise ModelError(f"nnU-Net results folder '{folder}': no network {name!r}")
    kwargs["deep_supervision"] = False
    network = network_class(input_channels=channels, num_classes=classes, **kwargs)
    return network


def _channel(
    scheme: str, props: dict[str, Any] | None, folder: Path, index: int, masked: bool
) -> tuple[dict[str, Any], tuple[float, float], str | None]:
    """One channel's card normalisation, the clip of its scaled values and a note
    (``masked``: the plans' ``use_mask_for_norm``, which only ZScoreNormalization uses)."""
    unbounded = (-float("inf"), float("inf"))
    if scheme == "CTNormalization":
        keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
        if not isinstance(props, dict) or any(k not in props for k in keys):
            raise ModelError(
                f"nnU-Net results folder '{folder}': channel {index} uses CTNormalization but "
                f"plans.json foreground_intensity_properties_per_channel[{str(index)!r}] lacks "
                f"{', '.join(keys)}"
            )
        mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
        low, high = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        note = (f"channel {index}: nnU-Net CTNormalization: clip to the dataset's foreground "
                f"percentiles 0.5..99.5 ({low:g}..{high:g}), minus its mean {mean:g}, over its "
                f"std {std:g} (the card's fixed {mean:g}..{mean + std:g}; the clip applies to "
                "the scaled values, inside the network)")  # fmt: skip
        norm = {"method": "fixed", "low": mean, "high": mean + std}
        return norm, ((low - mean) / std, (high - mean) / std), note
    if scheme == "ZScoreNormalization" and masked:
        note = (f"channel {index}: nnU-Net ZScoreNormalization within the non-zero mask "
                "(use_mask_for_norm): the item's mean and std within it, 0 outside")  # fmt: skip
        return {"method": "zscore", "mask": "nonzero"}, unbounded, note
    if scheme == "ZScoreNormalization":
        note = f"channel {index}: nnU-Net ZScoreNormalization per image becomes per item"
        return {"method": "zscore"}, unbounded, note
    if scheme == "RescaleTo01Normalization":
        return {"method": "percentile", "low": 0.0, "high": 100.0}, unbounded, None
    if scheme == "RGBTo0_1Normalization":
        return {"method": "fixed", "low": 0.0, "high": 255.0}, unbounded, None
    if scheme == "NoNormalization":
        return {"method": "none"}, unbounded, None
    raise ModelError(
        f"nnU-Net results folder '{folder}': channel {index}'s normalisation {scheme!r} is not "
        "one segflow maps (CTNormalization, ZScoreNormalization, RescaleTo01Normalization, "
        "RGBTo0_1Normalization, NoNormalization)"
    )


def _channels(
    plans: dict[str, Any], config: dict[str, Any], dataset: dict[str, Any], folder: Path
) -> tuple[list[dict[str, Any]], list[tuple[float, float]], list[str]]:
    names = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(names, dict) or not names:
        raise ModelError(f"nnU-Net results folder '{folder}': dataset.json has no channel_names")
    schemes = list(config.get("normalization_schemes", []))
    masked = list(config.get("use_mask_for_norm", [False] * len(schemes)))
    if len(schemes) != len(names):
        raise ModelError(
            f"nnU-Net results folder '{folder}': dataset.json names {len(names)} channels, the "
            f"plans normalise {len(schemes)}"
        )
    props = plans.get("foreground_intensity_properties_per_channel", {})
    channels, clips, notes = [], [], []
    for c in range(len(names)):
        norm, clip, note = _channel(str(schemes[c]), props.get(str(c)), folder, c, masked[c])
        channels.append({"name": str(names.get(str(c), f"channel_{c}")), "normalization": norm})
        clips.append(clip)
        notes += [note] if note else []
    return channels, clips, notes


def _classes(dataset: dict[str, Any], folder: Path) -> list[str]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or "regions_class_order" in dataset:
        raise ModelError(
            f"nnU-Net results folder '{folder}': dataset.json labels are not a name -> value "
            "map (region-based trainings are not supported)"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise ModelError(
            f"nnU-Net results folder '{folder}': dataset.json labels {labels} are not one "
            "integer per class (region-based trainings are not supported)"
        )
    ordered = sorted(labels.items(), key=lambda item: item[1])
    if [v for _, v in ordered] != list(range(len(ordered))):
        raise ModelError(
            f"nnU-Net results folder '{folder}': dataset.json label values "
            f"{[v for _, v in ordered]} are not 0 .. {len(ordered) - 1}"
        )
    return [name for name, _ in ordered]


#: nnU-Net's resampling functions segflow does (both share resample_data_or_seg's arithmetic).
_RESAMPLERS = ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing")


def _resampler(config: dict[str, Any], key: str, folder: Path) -> dict[str, Any]:
    """One resampling function's keyword arguments; one line when segflow does not do it."""
    name = config.get(f"resampling_fn_{key}", _RESAMPLERS[0])
    kwargs = dict(config.get(f"resampling_fn_{key}_kwargs") or {})
    order, order_z = kwargs.get("order", 3 if key == "data" else 1), kwargs.get("order_z", 0)
    if name not in _RESAMPLERS or kwargs.get("is_seg") or {order, order_z} - {0, 1, 3}:
        raise ModelError(
            f"nnU-Net results folder '{folder}': resampling_fn_{key} {name!r} with {kwargs} is "
            f"not one segflow does ({' or '.join(_RESAMPLERS)}, is_seg false, orders 0, 1 "
            "or 3)"
        )
    return {"order": order, "order_z": order_z,
            "separate_z": kwargs.get("force_separate_z")}  # fmt: skip


def _resampling(
    config: dict[str, Any], clips: Sequence[tuple[float, float]], folder: Path
) -> dict[str, Any]:
    """The card's resampling: the plans' data and probability resamplers, the CT windows."""
    data = _resampler(config, "data", folder)
    back = _resampler(config, "probabilities", folder)
    if data["separate_z"] != back["separate_z"]:
        raise ModelError(
            f"nnU-Net results folder '{folder}': force_separate_z differs between "
            f"resampling_fn_data ({data['separate_z']}) and resampling_fn_probabilities "
            f"({back['separate_z']}), which segflow does not do"
        )
    bounded = [None if not np.isfinite(c).any() else tuple(c) for c in clips]
    return {**data, "order_back": back["order"], "order_z_back": back["order_z"],
            "clip": bounded if any(c is not None for c in bounded) else [],
            "clip_to_input": True}  # fmt: skip


def _mirror_axes(checkpoint: dict[str, Any], ndim: int) -> list[int]:
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return [int(a) for a in axes if 0 <= int(a) < ndim] if axes else []


def derive_card(folder: Path) -> SourceCard:
    """The card of an nnU-Net v2 results folder (see the module docstring)."""
    plans, dataset = _read_json(folder, "plans.json"), _read_json(folder, "dataset.json")
    checkpoints = fold_checkpoints(folder)
    first = read_checkpoint(checkpoints[0], folder)
    name = _configuration_name(folder, plans, first)
    config = resolve_configuration(plans, name, folder)
    transpose = list(plans.get("transpose_forward", []))
    if transpose != sorted(transpose):
        raise ModelError(
            f"nnU-Net results folder '{folder}': plans transpose_forward "
            f"{plans['transpose_forward']} reorders the axes, which segflow does not do"
        )
    channels, clips, notes = _channels(plans, config, dataset, folder)
    tile = tuple(int(t) for t in config["patch_size"])
    mirror = _mirror_axes(first, len(tile))
    folds = [p.parent.name[5:] for p in checkpoints]
    params = {"configuration": name, "folds": folds, "mirror_axes": mirror,
              "clip": [list(c) for c in clips]}  # fmt: skip
    card = {
        "name": str(dataset.get("name") or folder.parent.name or folder.name),
        "architecture": {"name": "nnunet", "params": params},
        "spatial_dims": len(tile),
        "channels": channels,
        "classes": _classes(dataset, folder),
        "tile": tile,
        "overlap": 0.5,
        "window": WINDOW,
        "spacing": tuple(float(s) for s in config["spacing"]),
        "units": "mm",
        "resampling": _resampling(config, clips, folder),
        "output_activation": "softmax_after_blending",
        "crop": "nonzero",
    }
    try:
        model_card = ModelCard.model_validate(card)
    except ValueError as exc:
        raise ModelError(
            f"nnU-Net results folder '{folder}': its plans do not make a model card "
            f"({' '.join(str(exc).splitlines()[:3])[:300]})"
        ) from None
    notes += [
        f"configuration {name}, folds {', '.join(folds)} (logits averaged), mirroring axes "
        f"{tuple(mirror)} (nnU-Net's; leave the step's tta off)",
        "items are cropped to their non-zero bounding box (crop_to_nonzero; background "
        "outside it), resampled to the plans' spacing and the logits back (nnU-Net's "
        "resampling_fn_data and resampling_fn_probabilities orders, see `resampling`)",
    ]
    return SourceCard(model_card, "nnunet", f"plans {folder / 'plans.json'}", notes=tuple(notes))


class NnunetEnsemble(torch.nn.Module):
    """The folds' networks as one: each fold's logits averaged over the allowed mirrorings
    (nnU-Net's order of flips), then over the folds; CT channels' scaled values clipped first."""

    def __init__(
        self, networks: Sequence[torch.nn.Module], mirror_axes: Sequence[int],
        clip: Sequence[Sequence[float]],
    ) -> None:  # fmt: skip
        super().__init__()
        import itertools

        self.networks = torch.nn.ModuleList(networks)
        axes = [a + 2 for a in mirror_axes]
        self.flips = [c for k in range(len(axes)) for c in itertools.combinations(axes, k + 1)]
        low, high = (torch.tensor([c[i] for c in clip], dtype=torch.float32) for i in (0, 1))
        self.clipped = bool(torch.isfinite(low).any() or torch.isfinite(high).any())
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)
        self.low: torch.Tensor
        self.high: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = torch.maximum(torch.minimum(x, self.high.view(shape)), self.low.view(shape))
        total: torch.Tensor | None = None
        for network in self.networks:
            prediction = network(x)
            for axes in self.flips:
                prediction = prediction + torch.flip(network(torch.flip(x, axes)), axes)
            prediction = prediction / (len(self.flips) + 1)
            total = prediction if total is None else total + prediction
        assert total is not None
        return total / len(self.networks)


class NnunetSource(ModelSource):
    name = "nnunet"
    description = (
        "nnU-Net v2 results folder (plans.json, dataset.json, fold_*/checkpoint_final.pth)"
    )

    def recognises(self, path: Path) -> bool:
        if not path.is_dir() or (path / "configs").is_dir():
            return False
        files = (path / "plans.json").is_file() + (path / "dataset.json").is_file()
        folds = any(_FOLD.match(p.name) for p in path.iterdir() if p.is_dir())
        return files == 2 or (files == 1 and folds)

    def describe(self, path: Path) -> SourceCard:
        return derive_card(path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        plans = _read_json(path, "plans.json")
        params = card.architecture.params
        config = resolve_configuration(plans, params["configuration"], path)
        networks = []
        for checkpoint in fold_checkpoints(path):
            data = read_checkpoint(checkpoint, path)
            network = build_network(config, len(card.channels), len(card.classes), path)
            try:
                network.load_state_dict(data["network_weights"])
            except RuntimeError as exc:
                raise ModelError(
                    f"nnU-Net results folder '{path}': {checkpoint.relative_to(path)} does not "
                    f"fit the plans' network ({str(exc).strip().splitlines()[0][:200]})"
                ) from None
            networks.append(network)
        module = NnunetEnsemble(networks, params["mirror_axes"], params["clip"]).eval()
        module = module.to(resolve_device(device))
        return LoadedModel(
            module=module, card=card, hash=self.identity(path, card), path=path, source=self.name
        )

    def identity(self, path: Path, card: ModelCard) -> str:
        """SHA-256 of the card, plans.json, dataset.json and the folds' final checkpoints
        (not the validation outputs and logs a results folder also holds)."""
        import hashlib

        from segflow.models.sources import file_sha256

        digest = hashlib.sha256(card.identity_json().encode())
        for file in [path / "plans.json", path / "dataset.json", *fold_checkpoints(path)]:
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file_sha256(file).encode())
        return digest.hexdigest()

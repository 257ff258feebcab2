"""Hugging Face transformers semantic segmentation models from a local folder.

A folder written by ``save_pretrained`` (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, and the image processor's ``preprocessor_config.json``) of a model
class ending in ``ForSemanticSegmentation`` (SegFormer, BEiT, DPT, MobileViT, UperNet, ...)
is loaded with ``AutoModelForSemanticSegmentation.from_pretrained(folder,
local_files_only=True)``: never a hub download, never remote code (a config with
``auto_map`` is refused). The card comes from the two JSON files, read without importing
transformers:

* channels: ``num_channels`` (``red``, ``green``, ``blue`` for three); normalisation: the
  processor's ``rescale_factor`` and ``image_mean`` / ``image_std`` as one fixed scaling per
  channel (``(x * rescale - mean) / std``);
* the tile: the processor's ``size`` (``height``, ``width``). The processor resizes the whole
  image to that size; segflow tiles the image at its own resolution instead (the model sees
  the scale it gets: resample the items to the training scale first);
* classes: ``id2label`` in label order; each tile's logits are upsampled bilinearly to the
  tile (``align_corners=False``, as ``post_process_semantic_segmentation``) and a softmax
  taken before blending.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel
from segflow.models.inference import Device, resolve_device
from segflow.models.sources import ModelSource, SourceCard

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: What a folder without preprocessor_config.json gets (SegFormer's processor defaults).
IMAGENET = {"do_rescale": True, "do_normalize": True, "size": {"height": 512, "width": 512},
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # fmt: skip


def _json(folder: Path, name: str, required: bool) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        if required:
            raise ModelError(f"transformers model '{folder}' has no {name}")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"transformers model '{folder}': {name} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"transformers model '{folder}': {name} is not a JSON object")
    return data


def _check_config(config: dict[str, Any], folder: Path) -> None:
    if "auto_map" in config:
        raise ModelError(
            f"transformers model '{folder}': config.json maps to code of its own (auto_map); "
            "segflow does not run downloaded code"
        )
    architectures = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForSemanticSegmentation") for a in architectures):
        raise ModelError(
            f"transformers model '{folder}': config.json architectures {architectures} has no "
            "...ForSemanticSegmentation model"
        )
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise ModelError(f"transformers model '{folder}' has no {' or '.join(WEIGHTS)}")


def _normalisations(processor: dict[str, Any], channels: int, folder: Path) -> list[dict[str, Any]]:
    rescale = (
        float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale") else 1.0
    )
    if not processor.get("do_normalize"):
        return [{"method": "fixed", "low": 0.0, "high": 1 / rescale}] * channels
    mean, std = processor.get("image_mean"), processor.get("image_std")
    mean = [mean] * channels if isinstance(mean, (int, float)) else list(mean or [])
    std = [std] * channels if isinstance(std, (int, float)) else list(std or [])
    if len(mean) != channels or len(std) != channels:
        raise ModelError(
            f"transformers model '{folder}': preprocessor_config.json image_mean {mean} / "
            f"image_std {std} do not have one value per channel ({channels})"
        )
    return [
        {"method": "fixed", "low": m / rescale, "high": (m + s) / rescale}
        for m, s in zip(mean, std, strict=True)
    ]


def _tile(processor: dict[str, Any], folder: Path) -> tuple[int, int]:
    size = processor.get("size") or {}
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ModelError(
        f"transformers model '{folder}': preprocessor_config.json size {size} has no height "
        "and width (give the step's `tile`)"
    )


def derive_card(folder: Path) -> SourceCard:
    """The card of a transformers semantic segmentation folder (see the module docstring)."""
    config = _json(folder, "config.json", required=True)
    _check_config(config, folder)
    processor = _json(folder, "preprocessor_config.json", required=False)
    channels = int(config.get("num_channels", 3))
    names = ["red", "green", "blue"] if channels == 3 else [f"channel_{c}" for c in range(channels)]
    labels = config.get("id2label") or {}
    classes = [str(labels[k]) for k in sorted(labels, key=int)]
    notes = []
    if not processor:
        notes.append("no preprocessor_config.json: tile 512 x 512, ImageNet normalisation")
        processor = IMAGENET
    norms = _normalisations(processor, channels, folder)
    card = {
        "name": folder.name, "architecture": {"name": "transformers"}, "spatial_dims": 2,
        "channels": [{"name": n, "normalization": m} for n, m in zip(names, norms, strict=True)],
        "classes": classes, "tile": _tile(processor, folder), "overlap": 0.5,
        "output_activation": "softmax",
    }  # fmt: skip
    try:
        model_card = ModelCard.model_validate(card)
    except ValueError as exc:
        raise ModelError(
            f"transformers model '{folder}': its config does not make a model card "
            f"({' '.join(str(exc).splitlines()[:3])[:300]})"
        ) from None
    notes.append("the processor resizes a whole image to the tile; segflow tiles the image at "
                 "its own resolution (resample items to the training scale)")  # fmt: skip
    return SourceCard(model_card, "transformers", f"config {folder / 'config.json'}",
                      notes=tuple(notes))  # fmt: skip


class UpsampledLogits(torch.nn.Module):
    """The model's logits upsampled to its input, bilinear (``align_corners=False``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values=x).logits
        return torch.nn.functional.interpolate(
            logits, size=x.shape[-2:], mode="bilinear", align_corners=False
        )


class TransformersSource(ModelSource):
    name = "transformers"
    description = "Hugging Face transformers semantic segmentation folder (config.json + weights)"

    def recognises(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    def describe(self, path: Path) -> SourceCard:
        return derive_card(path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        try:
            from transformers import AutoModelForSemanticSegmentation
        except ImportError:
            raise ModelError(
                "transformers models need transformers: pip install 'segflow[ml]'"
            ) from None
        try:
            model = AutoModelForSemanticSegmentation.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ModelError(
                f"transformers model '{path}' cannot be loaded ({type(exc).__name__}: {text})"
            ) from None
        module = UpsampledLogits(model).eval().to(resolve_device(device))
        return LoadedModel(
            module=module, card=card, hash=self.identity(path, card), path=path, source=self.name
        )

"""MONAI bundles as a model source: ``configs/metadata.json`` + ``configs/inference.json``.

The card comes from the bundle's own files:

* ``metadata.json`` ``network_data_format``: ``inputs.image`` ``num_channels`` and
  ``spatial_shape`` (2-D or 3-D), ``outputs.pred`` ``num_channels`` and ``channel_def`` (the
  class names). A bundle without ``metadata.json`` is refused.
* ``inference.json`` (or ``.yaml``) ``inferer``: a ``SlidingWindowInferer``'s ``roi_size``
  (the tile), ``overlap`` (MONAI's default 0.25) and ``mode`` (``constant``, MONAI's default,
  or ``gaussian`` with sigma_scale 0.125); a ``SimpleInferer`` runs the metadata's
  ``spatial_shape`` as the tile.
* its ``preprocessing`` transforms, mapped to whole-item statistics: ``ScaleIntensity(d)``
  (to [0, 1]: the item's 0th and 100th percentiles), ``ScaleIntensityRange(d)`` (to [0, 1]
  or unscaled: fixed ``a_min``/``a_max``, with ``clip``) and ``NormalizeIntensity(d)`` (the
  item's mean and population standard deviation: over all channels together, or each
  channel's with ``channel_wise``; with ``nonzero``, over the non-zero values only, the
  zeros left 0: the card's ``mask: nonzero_elements``, element by element as MONAI, unlike
  nnU-Net's hole-filled mask; given ``subtrahend`` or ``divisor`` are refused); loading and
  typing transforms pass. Any other transform is refused in one line (resampling with
  ``Spacing(d)``, reorienting with ``Orientation(d)`` and cropping change the grid segflow
  writes).
* its ``postprocessing``: ``Activations(d)`` softmax or sigmoid is applied to each tile
  before blending (MONAI applies it after: equal where one tile covers a pixel, and wherever
  the bundle has no activation); without one the blended output is the network's own.

The network is ``models/model.ts`` (TorchScript), or ``models/model.pt`` (a state dict, read
with ``torch.load(weights_only=True)``, never unpickling objects) loaded into the network
that ``inference.json``'s ``network_def`` builds with MONAI's ``ConfigParser``. A bundle's
config may hold Python expressions (``$...``) that the parser evaluates: only run bundles you
trust, as you would their scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel, load_torchscript
from segflow.models.inference import Device, resolve_device
from segflow.models.sources import ModelSource, SourceCard

#: Transforms that neither change values nor the grid (loading, channel-first, typing).
PASSING = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor",
           "CastToType", "Identity", "ToDevice"}  # fmt: skip
INTENSITY = {"ScaleIntensity", "ScaleIntensityRange", "NormalizeIntensity"}
INFERENCE_FILES = ("inference.json", "inference.yaml", "inference.yml")


def _read(path: Path, bundle: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelError(f"MONAI bundle '{bundle}': {path.name} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"MONAI bundle '{bundle}': {path.name} is not a JSON object")
    return data


def _inference_config(bundle: Path) -> tuple[Path | None, dict[str, Any]]:
    for name in INFERENCE_FILES:
        path = bundle / "configs" / name
        if path.is_file():
            return path, _read(path, bundle)
    return None, {}


def _io_format(meta: dict[str, Any], bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    fmt = meta.get("network_data_format", {})
    image = fmt.get("inputs", {}).get("image") if isinstance(fmt, dict) else None
    pred = fmt.get("outputs", {}).get("pred") if isinstance(fmt, dict) else None
    for name, part, keys in (("inputs.image", image, ("num_channels", "spatial_shape")),
                             ("outputs.pred", pred, ("num_channels",))):  # fmt: skip
        missing = [k for k in keys if not isinstance(part, dict) or k not in part]
        if missing:
            raise ModelError(
                f"MONAI bundle '{bundle}': configs/metadata.json network_data_format.{name} "
                f"has no {', '.join(missing)}"
            )
    assert isinstance(image, dict) and isinstance(pred, dict)
    return image, pred


def _names(part: dict[str, Any], count: int, prefix: str) -> list[str]:
    names = part.get("channel_def") or {}
    return [str(names.get(str(k), names.get(k, f"{prefix}_{k}"))) for k in range(count)]


def _transforms(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    section = config.get(key)
    if isinstance(section, dict):
        section = section.get("transforms", [])
    return [t for t in (section or []) if isinstance(t, dict)]


def _kind(transform: dict[str, Any]) -> str:
    name = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in PASSING | INTENSITY else name


def _literal(transform: dict[str, Any], key: str, default: Any, bundle: Path) -> Any:
    value = transform.get(key, default)
    if isinstance(value, str) and value[:1] in ("@", "$", "%"):
        raise ModelError(
            f"MONAI bundle '{bundle}': {transform['_target_']} {key} {value!r} is an "
            "expression; segflow maps literal values only"
        )
    return value


def _normalization(transform: dict[str, Any], bundle: Path, channels: int) -> dict[str, Any]:
    """The card's normalisation for one MONAI intensity transform (or one line why not) on
    an input of ``channels`` channels."""
    kind, name = _kind(transform), transform["_target_"]

    def get(key: str, default: Any = None) -> Any:
        return _literal(transform, key, default, bundle)

    if kind == "ScaleIntensity" and (get("minv", 0.0), get("maxv", 1.0)) == (0, 1):
        if get("factor") is None:
            return {"method": "percentile", "low": 0.0, "high": 100.0}
    if kind == "ScaleIntensityRange" and get("b_min") in (None, 0) and get("b_max") in (None, 1):
        clip = bool(get("clip", False)) and get("b_min") == 0 and get("b_max") == 1
        return {"method": "fixed", "low": get("a_min"), "high": get("a_max"), "clip": clip}
    if kind == "NormalizeIntensity" and get("subtrahend") is None and get("divisor") is None:
        norm: dict[str, Any] = {"method": "zscore"}
        if get("nonzero", False):  # each element's own value, not nnU-Net's filled mask
            norm["mask"] = "nonzero_elements"
        if channels > 1 and not get("channel_wise", False):  # over all channels together
            norm["joint"] = True
        return norm
    raise ModelError(
        f"MONAI bundle '{bundle}': preprocessing {name} with "
        f"{ {k: v for k, v in transform.items() if k not in ('_target_', 'keys')} } has no "
        "whole-item equivalent (segflow maps ScaleIntensity to [0, 1], ScaleIntensityRange to "
        "[0, 1] or unscaled, and NormalizeIntensity without subtrahend/divisor)"
    )


def _preprocessing(config: dict[str, Any], bundle: Path, channels: int) -> dict[str, Any]:
    norm: dict[str, Any] = {"method": "none"}
    for transform in _transforms(config, "preprocessing"):
        kind = _kind(transform)
        if kind in PASSING:
            continue
        if kind not in INTENSITY:
            raise ModelError(
                f"MONAI bundle '{bundle}': preprocessing {transform.get('_target_')} is not "
                "supported (segflow maps intensity scaling only; resampling, reorienting and "
                "cropping would change the grid it writes: give items already on the "
                "bundle's grid and remove the transform from a copy of inference.json)"
            )
        if norm["method"] != "none":
            raise ModelError(
                f"MONAI bundle '{bundle}': preprocessing scales intensities twice; segflow "
                "maps one intensity transform"
            )
        norm = _normalization(transform, bundle, channels)
    return norm


def _activation(config: dict[str, Any], bundle: Path) -> str:
    for transform in _transforms(config, "postprocessing"):
        if _kind(transform).rstrip("d") == "Activations":
            if _literal(transform, "softmax", False, bundle):
                return "softmax"
            if _literal(transform, "sigmoid", False, bundle):
                return "sigmoid"
    return "none"


def _inferer(
    config: dict[str, Any], image: dict[str, Any], bundle: Path
) -> tuple[tuple[int, ...], float, str]:
    """Tile, overlap and blending window from the bundle's inferer."""
    inferer = config.get("inferer") if isinstance(config.get("inferer"), dict) else {}
    assert isinstance(inferer, dict)
    kind = str(inferer.get("_target_", "")).rsplit(".", 1)[-1]
    shape = image["spatial_shape"]
    if kind == "SlidingWindowInferer":
        roi = _literal(inferer, "roi_size", None, bundle)
        overlap = float(_literal(inferer, "overlap", 0.25, bundle))
        mode = _literal(inferer, "mode", "constant", bundle)
        sigma = float(_literal(inferer, "sigma_scale", 0.125, bundle))
        if mode not in ("constant", "gaussian") or (mode == "gaussian" and sigma != 0.125):
            raise ModelError(
                f"MONAI bundle '{bundle}': inferer mode {mode!r} (sigma_scale {sigma}) is not "
                "segflow's: constant, or gaussian with sigma_scale 0.125"
            )
        if isinstance(roi, list) and all(isinstance(r, int) and r > 0 for r in roi):
            return tuple(roi), overlap, str(mode)
    if all(isinstance(s, int) and s > 0 for s in shape):
        return tuple(shape), 0.25, "constant"
    raise ModelError(
        f"MONAI bundle '{bundle}': no tile: the inferer has no roi_size and the metadata's "
        f"spatial_shape {shape} is not fixed (give the step's `tile`)"
    )


class MonaiBundleSource(ModelSource):
    name = "monai-bundle"
    description = "MONAI bundle folder (configs/metadata.json, models/model.ts or model.pt)"

    def recognises(self, path: Path) -> bool:
        return path.is_dir() and (path / "configs").is_dir()

    def describe(self, path: Path) -> SourceCard:
        meta_path = path / "configs" / "metadata.json"
        if not meta_path.is_file():
            raise ModelError(
                f"MONAI bundle '{path}' has no configs/metadata.json: segflow derives the "
                "card (channels, classes, spatial shape) from its network_data_format"
            )
        image, pred = _io_format(_read(meta_path, path), path)
        _, config = _inference_config(path)
        tile, overlap, window = _inferer(config, image, path)
        names = _names(image, int(image["num_channels"]), "channel")
        norm = _preprocessing(config, path, len(names))
        card = {
            "name": path.name,
            "architecture": {"name": "monai-bundle"},
            "spatial_dims": len(image["spatial_shape"]),
            "channels": [{"name": n, "normalization": norm} for n in names],
            "classes": _names(pred, int(pred["num_channels"]), "class"),
            "tile": tile,
            "overlap": overlap,
            "window": window,
            "output_activation": _activation(config, path),
        }
        try:
            model_card = ModelCard.model_validate(card)
        except ValueError as exc:
            raise ModelError(
                f"MONAI bundle '{path}': its metadata does not make a model card "
                f"({' '.join(str(exc).splitlines()[:3])[:300]})"
            ) from None
        return SourceCard(model_card, self.name, f"bundle {meta_path}")

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        script = path / "models" / "model.ts"
        if script.is_file():
            loaded = load_torchscript(script, device=device)
            module: torch.nn.Module = loaded.module  # type: ignore[assignment]
        else:
            module = _state_dict_network(path).to(resolve_device(device))
        return LoadedModel(
            module=module, card=card, hash=self.identity(path, card), path=path, source=self.name
        )


def _state_dict_network(bundle: Path) -> torch.nn.Module:
    """``models/model.pt`` (tensors only) loaded into ``network_def``."""
    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        raise ModelError(f"MONAI bundle '{bundle}' has neither models/model.ts nor model.pt")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"MONAI bundle '{bundle}': models/model.pt cannot be read as tensors only "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # MONAI's CheckpointSaver layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"MONAI bundle '{bundle}': models/model.pt is not a state dict of tensors")
    network = _network_def(bundle)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"MONAI bundle '{bundle}': models/model.pt does not fit network_def "
            f"({str(exc).strip().splitlines()[0][:200]})"
        ) from None
    return network.eval()


def _network_def(bundle: Path) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    path, config = _inference_config(bundle)
    if path is None or "network_def" not in config:
        raise ModelError(
            f"MONAI bundle '{bundle}': models/model.pt needs configs/inference.json's "
            "network_def to build the network"
        )
    parser = ConfigParser()
    parser.read_config(str(path))
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:
        raise ModelError(
            f"MONAI bundle '{bundle}': network_def cannot be built ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
        ) from None
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"MONAI bundle '{bundle}': network_def is not a torch module")
    return network

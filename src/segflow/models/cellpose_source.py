"""Cellpose checkpoints: the file ``CellposeModel(pretrained_model=PATH)`` loads, as it is.

A Cellpose 4 checkpoint (``cpsam``, ``cpsam_v2`` or a model trained with cellpose 4) is a
``torch.save`` of the network's state dict, a file without a suffix of its own. segflow
recognises it by its content (a torch archive whose keys include cellpose's ``W2`` and
``diam_mean``) and derives its card from the weights, without importing cellpose:

* channels: the patch embedding's input channels (3); the network takes 1 to 3 (cellpose 4
  uses the first ``n`` input filters for an ``n``-channel image), the step's ``channels``
  picks how many;
* normalisation: each channel's 1st and 99th percentiles of the whole item to 0 and 1, as
  ``transforms.normalize_img`` with cellpose's defaults (a constant channel becomes 0);
* tile: the position embedding's grid times the patch size (256 for CPSAM, which cellpose
  runs at no other size; 384 for CPDINO, cellpose's default there), placed as cellpose
  places them (``tile_rule: cellpose``: the item padded with zeros to a multiple of 16 plus
  8 on each side, or around its centre to one tile; ``overlap`` 0.1, cellpose's
  ``tile_overlap``) and blended with cellpose's taper window; the grid depends on the item
  alone, so every block layout gives the whole item's flows;
* diameter: 30 pixels, the cell size cellpose 4's ``eval(diameter=d)`` zooms items to
  (``rescale = 30 / d``); the step's ``diameter`` does the same;
* output: 3 raw channels, ``flow_y``, ``flow_x`` (the flows towards each cell's centre) and
  ``cellprob`` (the logit of the cell probability): ``output: raw`` feeds ``flow_dynamics``.

The network itself is built and loaded by the installed cellpose package
(``CellposeModel(pretrained_model=PATH, use_bfloat16=False)``) in float32, on the step's
device; cellpose's own default is bfloat16 weights. A checkpoint whose keys do not match
the network is refused (cellpose loads with ``strict=False``, which would leave the missing
layers random). Never a download: the path must be the checkpoint file itself.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel
from segflow.models.inference import Device, resolve_device
from segflow.models.sources import ModelSource, SourceCard

#: Keys every cellpose network's state dict holds (its ``BaseModel`` parameters).
MARKERS = (b"diam_mean", b"diam_labels")
PATCH = "encoder.patch_embed.proj.weight"
TILE_OVERLAP = 0.1  # cellpose's tile_overlap default
DIAM_MEAN = 30.0  # eval(diameter=d) zooms by 30 / d (cellpose 4's models.py, whatever diam_mean)


def _archive_pickle(path: Path) -> bytes:
    """The pickle of a ``torch.save`` archive (its keys in plain text); b"" for other files."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return archive.read(names[0]) if len(names) == 1 else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return b""


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ModelError(f"cellpose checkpoint '{path}' cannot be read ({_line(exc)})") from None
    if not isinstance(state, dict):
        raise ModelError(f"cellpose checkpoint '{path}' is not a state dict ({type(state)})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _geometry(state: dict[str, torch.Tensor], path: Path) -> tuple[str, int, int, int]:
    """Backbone, input channels, output channels and tile of a cellpose 4 network."""
    if "W2" not in state or PATCH not in state:
        raise ModelError(
            f"cellpose checkpoint '{path}' is not a cellpose 4 network (no W2 or {PATCH}): "
            "cellpose 3 models do not run in cellpose 4; retrain it with cellpose 4"
        )
    channels = int(state[PATCH].shape[1])
    outputs, patch = int(state["W2"].shape[1]), int(state["W2"].shape[-1])
    if "encoder.cls_token" in state:  # CPDINO: cellpose's default tile for it
        return "dino", channels, outputs, 384
    grid = state.get("encoder.pos_embed")
    if grid is None or grid.ndim != 4:
        raise ModelError(f"cellpose checkpoint '{path}' has no encoder.pos_embed grid")
    return "sam_vitl", channels, outputs, int(grid.shape[1]) * patch


def derive_card(path: Path) -> SourceCard:
    """The card of a cellpose 4 checkpoint (see the module docstring)."""
    backbone, channels, outputs, tile = _geometry(_state_dict(path), path)
    if outputs != 3:
        raise ModelError(
            f"cellpose checkpoint '{path}' has {outputs} outputs, a 2-D flow head has 3 "
            "(flow_y, flow_x, cellprob)"
        )
    norm = {"method": "percentile", "low": 1.0, "high": 99.0}
    card = ModelCard.model_validate(
        {
            "name": path.name,
            "architecture": {"name": "cellpose", "params": {"backbone": backbone}},
            "spatial_dims": 2,
            "channels": [{"name": f"channel_{c}", "normalization": norm} for c in range(channels)],
            "head": "flows",
            "tile": (tile, tile),
            "overlap": TILE_OVERLAP,
            "tile_rule": "cellpose",
            "window": "taper",
            "diameter": DIAM_MEAN,
        }
    )
    notes = (
        f"takes 1 to {channels} channels (the step's `channels`), as cellpose 4 does",
        "float32 weights, bf16 autocast on CUDA (cellpose's default is bfloat16 weights)",
        f"trained at a cell diameter of {DIAM_MEAN:g} pixels: the step's `diameter` zooms "
        "items by 30 / diameter as cellpose's eval(diameter=...) does (unset: no zoom, "
        "cellpose's diameter=None)",
        "tiles placed and blended as cellpose does (its grid, overlap as its tile_overlap)",
    )
    return SourceCard(card, "cellpose", f"checkpoint {path}", notes=notes,
                      channel_range=(1, channels))  # fmt: skip


def _import_cellpose() -> Any:
    try:
        from cellpose import models
    except Exception as exc:
        raise ModelError(
            f"Cellpose checkpoints need the cellpose package, which does not import here "
            f"({_line(exc)}): pip install 'cellpose>=4,<5' with the torchvision built for "
            f"torch {torch.__version__}"
        ) from None
    return models


def _check_keys(net: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """cellpose loads with ``strict=False``: refuse a checkpoint that leaves layers unset."""
    missing = sorted(set(net.state_dict()) - set(state))
    extra = sorted(set(state) - set(net.state_dict()))
    if missing or extra:
        raise ModelError(
            f"cellpose checkpoint '{path}' does not fit cellpose's network: {len(missing)} "
            f"keys missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )


class CellposeFlows(torch.nn.Module):
    """A cellpose network's flows and cell probability logit, ``(batch, 3, y, x)``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def load_cellpose(path: Path, *, device: Device) -> torch.nn.Module:
    """The checkpoint's network, built and loaded by cellpose, in float32, eval mode."""
    models = _import_cellpose()
    try:
        model = models.CellposeModel(
            pretrained_model=str(path), device=resolve_device(device), use_bfloat16=False
        )
    except Exception as exc:
        raise ModelError(f"cellpose checkpoint '{path}' cannot be loaded ({_line(exc)})") from None
    _check_keys(model.net, _state_dict(path), path)
    return CellposeFlows(model.net).eval()


class CellposeSource(ModelSource):
    name = "cellpose"
    description = "Cellpose 4 checkpoint (the file CellposeModel(pretrained_model=...) loads)"

    def recognises(self, path: Path) -> bool:
        if not path.is_file() or path.suffix in (".pt2", ".onnx"):
            return False
        pickle = _archive_pickle(path)
        return all(marker in pickle for marker in MARKERS)

    def describe(self, path: Path) -> SourceCard:
        return derive_card(path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        module = load_cellpose(path, device=device)
        return LoadedModel(
            module=module, card=card, hash=self.identity(path, card), path=path, source=self.name
        )

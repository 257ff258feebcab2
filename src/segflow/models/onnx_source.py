"""ONNX graphs as a model source, run by ONNX Runtime.

What the card takes from the graph: the input's rank (4: 2-D, 5: 3-D, always ``(batch,
channels, *spatial)``), its channel count (a static axis 1), its spatial axes (all static: a
fixed-shape graph, whose shape *is* the tile; dynamic ones get :data:`DEFAULT_TILE`, which
the step's ``tile`` overrides) and the output's channel count (static, or from one dummy tile
run at planning). What the graph cannot say comes from its ``metadata_props`` when present:
a ``segflow.card`` JSON object with any of the card's fields, or the simple keys ``name``,
``classes`` (a JSON list or comma-separated names), ``channels``, ``normalization`` (a method
name or a JSON object), ``activation``, ``overlap``, ``window``, ``spacing`` and ``units``.
Without them: classes ``class_0..``, no normalisation (the pixel values as they are) and a
softmax over the output's channels (the graph is taken to give logits); the step's
``normalization`` and ``activation`` override these.

Sessions run with the worker's intra-op threads (what torch uses there: one per Dask worker
by default) on CPU, or on the CUDA execution provider (TensorRT first where installed) when
``device`` asks for a GPU and ONNX Runtime has one; a graph with a fixed batch axis is run in
chunks of that batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel
from segflow.models.inference import Device
from segflow.models.sources import ModelSource, SourceCard

#: The tile of a graph whose spatial axes are dynamic (the step's ``tile`` overrides it).
DEFAULT_TILE: dict[int, tuple[int, ...]] = {2: (256, 256), 3: (96, 96, 96)}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CARD_KEY = "segflow.card"
_SIMPLE_KEYS = ("name", "classes", "channels", "normalization", "activation", "overlap",
                "window", "spacing", "units")  # fmt: skip


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            "ONNX models need onnxruntime: pip install 'segflow[ml]' (or onnxruntime-gpu)"
        ) from None
    return onnxruntime


def providers(device: Device) -> list[str]:
    """Execution providers for ``device``: CPU, or the GPU ones ONNX Runtime has, then CPU."""
    available = _runtime().get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ModelError(
            "`device` 'cuda' was asked but ONNX Runtime has no CUDA execution provider "
            f"(it has {', '.join(available)}): install onnxruntime-gpu, or use 'cpu' or 'auto'"
        )
    return [*gpu, "CPUExecutionProvider"]


def open_session(path: Path, device: Device = "cpu", threads: int | None = None) -> Any:
    """An ONNX Runtime session of ``path``; one line naming the file when it cannot be read."""
    ort = _runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: provider fallbacks are our business
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device))
    except ModelError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ModelError(
            f"ONNX model '{path}' cannot be read by ONNX Runtime ({type(exc).__name__}: {text})"
        ) from None


class OnnxNetwork:
    """The session as the tiled inference calls a network: a float32 tensor ``(batch,
    channels, *tile)`` in (on the CPU), the graph's first output out as a tensor."""

    def __init__(self, session: Any) -> None:
        self.session = session
        graph_input = session.get_inputs()[0]
        self.input = graph_input.name
        self.output = session.get_outputs()[0].name
        batch = graph_input.shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None

    def run(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output], {self.input: array})[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        if self.batch is None or len(array) == self.batch:
            return torch.from_numpy(self.run(array))
        pieces = []
        for first in range(0, len(array), self.batch):
            chunk = array[first : first + self.batch]
            filled = np.concatenate([chunk, *[chunk[-1:]] * (self.batch - len(chunk))])
            pieces.append(self.run(filled)[: len(chunk)])
        return torch.from_numpy(np.concatenate(pieces))


def _metadata(session: Any, path: Path) -> dict[str, Any]:
    """The card fields the graph's ``metadata_props`` give (``segflow.card`` and simple keys)."""
    props: Mapping[str, str] = session.get_modelmeta().custom_metadata_map
    found: dict[str, Any] = {}
    if CARD_KEY in props:
        try:
            found = dict(json.loads(props[CARD_KEY]))
        except (ValueError, TypeError):
            raise ModelError(
                f"ONNX model '{path}': metadata {CARD_KEY!r} is not a JSON object"
            ) from None
    for key in _SIMPLE_KEYS:
        if key in props and key not in found:
            found[key] = _simple(key, props[key])
    if "activation" in found:
        found["output_activation"] = found.pop("activation")
    return found


def _simple(key: str, text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if key in ("classes", "channels") and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if key == "channels":
        value = [v if isinstance(v, dict) else {"name": str(v)} for v in value]
    if key == "normalization" and isinstance(value, str):
        value = {"method": value}
    return value


def _input_layout(session: Any, path: Path) -> tuple[int, tuple[int | None, ...]]:
    """Channels and spatial sides (None: dynamic) of the graph's one image input."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(
            f"ONNX model '{path}' has {len(inputs)} inputs ({names}): segflow feeds one image "
            "tensor (batch, channels, *spatial)"
        )
    graph_input = inputs[0]
    shape = list(graph_input.shape)
    layout = f"input {graph_input.name!r} of shape {shape}"
    if graph_input.type != "tensor(float)":
        raise ModelError(
            f"ONNX model '{path}': {layout} is {graph_input.type}, segflow feeds float32"
        )
    if len(shape) not in (4, 5) or not isinstance(shape[1], int) or shape[1] < 1:
        raise ModelError(
            f"ONNX model '{path}': unsupported input layout, {layout}: segflow feeds (batch, "
            "channels, y, x) or (batch, channels, z, y, x) with a fixed channel count "
            "(channels-last graphs need a transpose at export)"
        )
    spatial = tuple(s if isinstance(s, int) and s > 0 else None for s in shape[2:])
    return shape[1], spatial


def _output_channels(session: Any, path: Path, channels: int, tile: Sequence[int]) -> int:
    """The graph's output channels: its static axis 1, or what a dummy tile gives."""
    outputs = session.get_outputs()
    shape = list(outputs[0].shape)
    if len(shape) != len(tile) + 2:
        raise ModelError(
            f"ONNX model '{path}': output {outputs[0].name!r} of shape {shape} is not "
            f"(batch, classes, *spatial) with {len(tile)} spatial axes"
        )
    if isinstance(shape[1], int) and shape[1] > 0:
        return shape[1]
    network = OnnxNetwork(session)
    dummy = torch.zeros((network.batch or 1, channels, *tile))
    return int(network(dummy).shape[1])


def derive_card(session: Any, path: Path) -> SourceCard:
    """The card of an ONNX graph (see the module docstring)."""
    channels, spatial = _input_layout(session, path)
    meta = _metadata(session, path)
    ndim = len(spatial)
    fixed = all(s is not None for s in spatial)
    tile = tuple(
        s if s is not None else d for s, d in zip(spatial, DEFAULT_TILE[ndim], strict=True)
    )
    notes = [] if fixed else [f"tile: {tile}, segflow's default (the graph's spatial axes are "
                              "dynamic): the step's `tile` overrides it"]  # fmt: skip
    if "tile" in meta:
        if fixed and tuple(meta["tile"]) != tile:
            raise ModelError(
                f"ONNX model '{path}': metadata tile {meta['tile']} differs from the graph's "
                f"fixed input {tile}"
            )
        tile, notes = tuple(meta.pop("tile")), ["tile: from the graph's metadata"]
    if "overlap" not in meta:
        notes.append("overlap: 0.5, segflow's default (the step's `overlap` overrides it)")
    classes_out = _output_channels(session, path, channels, tile)
    fields = _defaults(path, channels, classes_out, tile, notes)
    fields.update({k: v for k, v in meta.items() if k not in ("spatial_dims",)})
    fields["architecture"] = {"name": "onnx"}
    card = _card(fields, path)
    if len(card.classes) != classes_out or len(card.channels) != channels:
        raise ModelError(
            f"ONNX model '{path}': its metadata names {len(card.channels)} channels and "
            f"{len(card.classes)} classes, the graph has {channels} and {classes_out}"
        )
    return SourceCard(card, "onnx", f"ONNX graph {path}", fixed_tile=fixed, notes=tuple(notes))


def _defaults(
    path: Path, channels: int, classes: int, tile: tuple[int, ...], notes: list[str]
) -> dict[str, Any]:
    if classes < 2:
        raise ModelError(
            f"ONNX model '{path}' gives {classes} output channel: the model step needs one "
            "channel per class, background first (export a 2-class head)"
        )
    notes += ["normalisation: none unless the metadata says (the step's `normalization` "
              "overrides it)", "activation: softmax over the output channels (logits) "
              "unless the metadata says (the step's `activation` overrides it)"]  # fmt: skip
    return {
        "name": path.stem,
        "spatial_dims": len(tile),
        "channels": [
            {"name": f"channel_{c}", "normalization": {"method": "none"}} for c in range(channels)
        ],
        "classes": [f"class_{k}" for k in range(classes)],
        "tile": tile,
        "output_activation": "softmax",
    }


def _card(fields: dict[str, Any], path: Path) -> ModelCard:
    try:
        return ModelCard.model_validate(fields)
    except ValueError as exc:
        problem = str(exc).strip().splitlines()
        raise ModelError(
            f"ONNX model '{path}': its metadata does not make a model card "
            f"({' '.join(problem[:3])[:300]})"
        ) from None


class OnnxSource(ModelSource):
    name = "onnx"
    description = "ONNX graph (.onnx), run by ONNX Runtime"

    def recognises(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".onnx"

    def describe(self, path: Path) -> SourceCard:
        return derive_card(open_session(path, "cpu", threads=1), path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        network = OnnxNetwork(open_session(path, device))
        return LoadedModel(
            module=network,
            card=card,
            hash=self.identity(path, card),
            path=path,
            source=self.name,
            input_device="cpu",
        )

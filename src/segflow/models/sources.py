"""Model sources: which loader turns which model file or folder into what the ``model`` step runs.

A model the user already has comes in its own format: a segflow checkpoint folder, a
TorchScript file or ``torch.export`` program with a card beside it, an ONNX graph, a MONAI
bundle. Each format is a :class:`ModelSource`: a cheap :meth:`~ModelSource.recognises`, a
:meth:`~ModelSource.describe` that derives the :class:`~segflow.models.card.ModelCard` from
the format's own metadata (channels and 2-D/3-D, normalisation as whole-item statistics,
tile, overlap and blending window, spacing, class names and the output activation; never
typed by hand), a :meth:`~ModelSource.load` that builds the network callable on a
``(batch, channels, *spatial)`` float32 tensor, and an :meth:`~ModelSource.identity` (the
model hash the config hash and the index record).

Where a format lacks something (the tile of an ONNX graph with dynamic spatial axes) the
source states its default in :attr:`SourceCard.notes` and the ``model`` step's parameters
override it (:class:`CardOverrides`, part of the config hash); what a format fixes (a
fixed-shape graph's tile) cannot be overridden. At load, one batch of dummy tiles goes
through the network and its output is checked against the card (:func:`verify_network`, as
MONAI's ``verify_net_in_out``) before any block runs.

Sources are tried in registration order, most specific first. A third-party package adds
one with an entry point in the ``segflow.model_sources`` group naming a :class:`ModelSource`
subclass; it is tried before the built-in ones (as readers are, :mod:`segflow.io.registry`).
nnU-Net v2 results folders (:mod:`segflow.models.nnunet_source`: an ensemble of folds is one
callable averaging its members, the plans' target spacing is the card's ``spacing``) and
bioimage.io packages (:mod:`segflow.models.bioimageio_source`: their preprocessing maps onto
the card's per-channel normalisation) and Hugging Face transformers semantic segmentation
folders (:mod:`segflow.models.transformers_source`) and Cellpose 4 checkpoints
(:mod:`segflow.models.cellpose_source`: the network as cellpose builds it, its flows raw for
``flow_dynamics``) fit the same interface.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from segflow.errors import ModelError, ModelNotFoundError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import (
    CARD_FILE,
    LoadedModel,
    _file_model_hash,
    load_checkpoint,
    load_exported,
    load_torchscript,
    read_card,
)
from segflow.models.inference import Activation, Device

ENTRY_POINT_GROUP = "segflow.model_sources"


@dataclass(frozen=True)
class SourceCard:
    """A model's card as its source derived it, and how messages name the model.

    ``where`` names what the card came from (``card m/card.json``, ``ONNX graph``);
    ``fixed_tile``: the format fixes the tile (a fixed-shape graph), no override may change
    it; ``notes``: what was defaulted or mapped, one line each (``segflow models inspect``);
    ``channel_range``: the input channel counts the network takes where it takes several
    (a Cellpose network: 1 to 3), the card listing the most; None: exactly the card's.
    """

    card: ModelCard
    source: str
    where: str
    fixed_tile: bool = False
    notes: tuple[str, ...] = ()
    channel_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class CardOverrides:
    """The ``model`` step's overrides of what a format may lack (None: the source's value)."""

    tile: tuple[int, ...] | None = None
    overlap: float | None = None
    normalization: Mapping[str, Any] | None = None  # a Normalization's fields
    activation: Activation | None = None
    channels: int | None = None

    def apply(self, described: SourceCard, name: str) -> ModelCard:
        """The card with these overrides; a fixed tile overridden is refused naming ``name``."""
        card = described.card
        if self.tile is not None and described.fixed_tile and tuple(self.tile) != card.tile:
            raise ModelError(
                f"model {name!r}: `tile` {tuple(self.tile)} cannot be used, the model's "
                f"{described.where} fixes its input to {card.tile}"
            )
        update: dict[str, Any] = {}
        if self.channels is not None:
            card = card.model_copy(update={"channels": _channels(described, self.channels, name)})
        if self.tile is not None:
            update["tile"] = tuple(self.tile)
        if self.overlap is not None:
            update["overlap"] = self.overlap
        if self.activation is not None:
            update["output_activation"] = self.activation
        if self.normalization is not None:
            update["channels"] = [
                {"name": c.name, "normalization": dict(self.normalization)} for c in card.channels
            ]
        if not update:
            return card
        try:
            return ModelCard.model_validate({**card.model_dump(), **update})
        except ValueError as exc:
            raise ModelError(f"model {name!r}: {_first_line(exc)}") from None


class ModelSource:
    """One model format: what it recognises, the card it derives, how it loads."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def recognises(self, path: Path) -> bool:
        """Whether ``path`` (an existing file or folder) is this format: cheap."""
        raise NotImplementedError

    def describe(self, path: Path) -> SourceCard:
        """The card derived from the model's own metadata (see the module docstring)."""
        raise NotImplementedError

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        """The network ready for inference on ``device`` (eval mode), with ``card``."""
        raise NotImplementedError

    def identity(self, path: Path, card: ModelCard) -> str:
        """The model hash: SHA-256 of the model's files and its derived card."""
        digest = hashlib.sha256(card.identity_json().encode())
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
            digest.update(file_sha256(file).encode())
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _channels(described: SourceCard, channels: int, name: str) -> tuple[Any, ...]:
    """The card's first ``channels`` channels, where the network takes that many."""
    card = described.card
    low, high = described.channel_range or (len(card.channels), len(card.channels))
    if not low <= channels <= high:
        takes = f"{low} to {high}" if low < high else f"exactly {high}"
        raise ModelError(
            f"model {name!r}: `channels` ({channels}) cannot be used, the model's "
            f"{described.where} takes {takes} input channels"
        )
    return card.channels[:channels]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def sidecar_card(path: Path) -> SourceCard:
    """The ``.json`` card beside a TorchScript file or ``.pt2`` program (required)."""
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ModelError(
            f"model '{path}' has no model card ({card_path}): segflow needs the card "
            "(channels, classes, tile, normalisation) to run a model"
        )
    return SourceCard(read_card(card_path), "torch", f"card {card_path}")


class CheckpointSource(ModelSource):
    name = "segflow"
    description = "segflow checkpoint folder (card.json + weights.pt)"

    def recognises(self, path: Path) -> bool:
        return path.is_dir() and (path / CARD_FILE).is_file()

    def describe(self, path: Path) -> SourceCard:
        return SourceCard(read_card(path / CARD_FILE), self.name, f"card {path / CARD_FILE}")

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        return load_checkpoint(path, device=device)

    def identity(self, path: Path, card: ModelCard) -> str:
        return load_checkpoint(path, device="cpu").hash  # weights + card, however serialised


class ExportedSource(ModelSource):
    name = "torch.export"
    description = "torch.export program (.pt2) with a .json card beside it"

    def recognises(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".pt2"

    def describe(self, path: Path) -> SourceCard:
        return sidecar_card(path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        return load_exported(path, device=device)

    def identity(self, path: Path, card: ModelCard) -> str:
        return _file_model_hash(path, card)  # as load_exported computes it, unloaded


class TorchScriptSource(ModelSource):
    name = "torchscript"
    description = "TorchScript file (.pt, .ts) with a .json card beside it"
    suffixes: ClassVar[tuple[str, ...]] = (".pt", ".ts", ".torchscript", ".jit")

    def recognises(self, path: Path) -> bool:
        return path.is_file() and path.suffix in self.suffixes

    def describe(self, path: Path) -> SourceCard:
        return sidecar_card(path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        return load_torchscript(path, device=device)

    def identity(self, path: Path, card: ModelCard) -> str:
        return _file_model_hash(path, card)  # as load_torchscript computes it, unloaded


_SOURCES: list[ModelSource] = []


def register_source(source: ModelSource | type[ModelSource], *, first: bool = False) -> None:
    """Add a source (an instance or a class); one of the same name is replaced in place."""
    instance = source() if isinstance(source, type) else source
    for i, known in enumerate(_SOURCES):
        if known.name == instance.name:
            _SOURCES[i] = instance
            return
    _SOURCES.insert(0, instance) if first else _SOURCES.append(instance)


def sources() -> list[ModelSource]:
    """Every registered source, in the order they are tried."""
    _load_builtins()
    _load_entry_points()
    return list(_SOURCES)


def source_for(path: str | Path) -> ModelSource:
    """The source of the model at ``path``; one line naming it when none recognises it."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelNotFoundError(f"`path` {str(path)!r}: no such checkpoint folder or model file")
    for source in sources():
        if source.recognises(resolved):
            return source
    known = "; ".join(s.description for s in sources())
    raise ModelError(f"model '{path}': no model source recognises it (known: {known})")


def stamps(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of the model's files: a new version invalidates the caches."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        out.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


def describe_model(path: str | Path) -> SourceCard:
    """The derived card of the model at ``path``, read once per process and file version."""
    resolved = Path(path).expanduser()
    source = source_for(path)
    return _describe(source.name, str(resolved.resolve()), stamps(resolved.resolve()))


@functools.lru_cache(maxsize=32)
def _describe(source: str, path: str, stamp: tuple[tuple[str, int, int], ...]) -> SourceCard:
    return _named(source).describe(Path(path))


def model_identity(path: str | Path) -> str:
    """The model hash of ``path``, computed once per process and file version."""
    resolved = Path(path).expanduser().resolve()
    source = source_for(resolved)
    return _identity(source.name, str(resolved), stamps(resolved))


@functools.lru_cache(maxsize=32)
def _identity(source: str, path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    return _named(source).identity(Path(path), describe_model(path).card)


def _named(name: str) -> ModelSource:
    for source in sources():
        if source.name == name:
            return source
    raise KeyError(name)


def load_source(
    path: str | Path, card: ModelCard, *, device: Device = "cpu", batch_size: int = 1
) -> LoadedModel:
    """The model at ``path`` loaded by its source, its output checked on dummy tiles."""
    resolved = Path(path).expanduser()
    source = source_for(resolved)
    loaded = source.load(resolved, card, device=device)
    verify_network(loaded, card, batch_size=batch_size, name=str(path))
    return loaded


def verify_network(loaded: LoadedModel, card: ModelCard, *, batch_size: int, name: str) -> None:
    """Run ``batch_size`` zero tiles through the network; refuse an output whose batch,
    channels or spatial shape differs from the card's, in one line naming the model."""
    device = loaded.input_device or ("cuda" if _on_cuda(loaded.module) else "cpu")
    x = torch.zeros((batch_size, len(card.channels), *card.tile), device=device)
    expected = (batch_size, len(card.classes), *card.tile)
    try:
        with torch.inference_mode():
            out = loaded.module(x)
    except Exception as exc:
        raise ModelError(
            f"model {name!r}: a dummy input {tuple(x.shape)} (batch, channels, *tile) does "
            f"not go through the network ({_first_line(exc)})"
        ) from None
    shape = tuple(getattr(out, "shape", ()))
    if shape != expected:
        raise ModelError(
            f"model {name!r}: a dummy input {tuple(x.shape)} gives an output of shape {shape}, "
            f"the card expects {expected} (batch, {len(card.classes)} classes "
            f"{list(card.classes)}, *tile)"
        )


def _on_cuda(module: Any) -> bool:
    params: Sequence[torch.Tensor] = []
    if isinstance(module, torch.nn.Module):
        params = [*module.parameters(), *module.buffers()]
    return any(p.is_cuda for p in params[:1])


def _normalisation_text(card: ModelCard) -> str:
    parts = []
    for channel in card.channels:
        norm = channel.normalization
        if norm.method == "percentile":
            text = f"item percentiles {norm.low:g}..{norm.high:g} -> 0..1"
        elif norm.method == "fixed":
            text = f"fixed {norm.low:g}..{norm.high:g} -> 0..1"
        elif norm.method == "zscore" and norm.mask == "nonzero":
            text = "item mean / standard deviation within its non-zero mask (z-score), 0 outside"
        elif norm.method == "zscore" and norm.mask == "nonzero_elements":
            text = "item mean / standard deviation of its non-zero values (z-score), zeros kept"
        elif norm.method == "zscore":
            text = "item mean / standard deviation (z-score)"
        else:
            text = "none (values as they are)"
        text += ", over the joint channels together" if norm.joint else ""
        parts.append(f"{channel.name}: {text}{', clipped' if norm.clip else ''}")
    return "; ".join(parts)


def _rule_text(card: ModelCard) -> str:
    return "" if card.tile_rule == "even" else f", placed as {card.tile_rule} places them"


def _activation_text(activation: str) -> str:
    if activation == "softmax_after_blending":
        return "softmax of the blended logits"
    return f"{activation} per tile"


def _diameter_text(card: ModelCard) -> str:
    if card.diameter is None:
        return "not stated (the step's `diameter` cannot zoom items for it)"
    return f"{card.diameter:g} px in training (the step's `diameter` zooms items to it)"


def card_lines(path: str, described: SourceCard, card: ModelCard | None = None) -> list[str]:
    """What ``segflow models inspect`` prints: the derived card, one line per part."""
    card = card or described.card
    axes = "c, z, y, x" if card.spatial_dims == 3 else "c, y, x"
    spacing = "not stated" if card.spacing is None else f"{card.spacing} {card.units or ''}"
    how = card.resampling
    if how is not None:
        spacing += (
            f"; items resampled to it (spline order {how.order}, back {how.order_back}; "
            f"{how.order_z} / {how.order_z_back} along z of an anisotropic spacing"
            f"{'; clipped to the input range' if how.clip_to_input else ''})"
        )
    lines = [
        f"model: {path}",
        f"source: {described.source} ({described.where})",
        f"input: {len(card.channels)} channel(s), {card.spatial_dims}-D, axes ({axes})",
        f"normalisation (whole item): {_normalisation_text(card)}",
        f"tile: {card.tile}{' (fixed by the model)' if described.fixed_tile else ''}, "
        f"overlap {card.overlap:g}, blending {card.window}{_rule_text(card)}",
        f"spacing: {spacing.strip()}",
        f"object diameter: {_diameter_text(card)}",
        *(["crop: the item's non-zero bounding box (background outside it)"] if card.crop else []),
        f"output: {len(card.classes)} classes ({', '.join(card.classes)}), activation "
        f"{_activation_text(card.activation)}, head {card.head}",
    ]
    return lines + [f"note: {note}" for note in described.notes]


@functools.cache
def _load_builtins() -> None:
    from segflow.models.bioimageio_source import BioimageioSource
    from segflow.models.cellpose_source import CellposeSource
    from segflow.models.monai_bundle import MonaiBundleSource
    from segflow.models.nnunet_source import NnunetSource
    from segflow.models.onnx_source import OnnxSource
    from segflow.models.transformers_source import TransformersSource

    builtins: list[type[ModelSource]] = [
        CheckpointSource,
        MonaiBundleSource,
        NnunetSource,
        BioimageioSource,
        TransformersSource,
        OnnxSource,
        CellposeSource,
        ExportedSource,
        TorchScriptSource,
    ]
    for source in builtins:
        if not any(s.name == source.name for s in _SOURCES):
            _SOURCES.append(source())


@functools.cache
def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        source = entry.load()
        if not (isinstance(source, type) and issubclass(source, ModelSource)):
            raise ModelError(
                f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP!r} "
                "is not a ModelSource subclass"
            )
        register_source(source, first=True)


__all__ = [
    "ENTRY_POINT_GROUP",
    "CardOverrides",
    "CheckpointSource",
    "ExportedSource",
    "ModelSource",
    "SourceCard",
    "TorchScriptSource",
    "card_lines",
    "describe_model",
    "file_sha256",
    "load_source",
    "model_identity",
    "register_source",
    "source_for",
    "sources",
    "verify_network",
]

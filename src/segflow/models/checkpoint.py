"""Checkpoints: a folder with the weights and the model card; TorchScript and ``torch.export``.

A segflow checkpoint is a folder::

    model/
        card.json      the model card (segflow.models.card.ModelCard), written last
        weights.pt     torch.save of the network's state dict (tensors only)

The card records the weights file's SHA-256, so a truncated or altered file is refused before
it is read; weights are read with ``torch.load(weights_only=True)``, which never unpickles
arbitrary objects. The network is rebuilt from the card and must accept every tensor, with
the same names and shapes.

:func:`model_hash` is the model's identity (weights + card): a SHA-256 of the card's canonical
JSON and of every tensor's name, dtype, shape and bytes. It does not depend on how the weights
were serialised or where the folder lies, so the engine can cache models and skip items by it.

Users' own models load as they are: a TorchScript file (:func:`load_torchscript`) or a
``torch.export`` program (``.pt2``, :func:`load_exported`), each with an optional card beside
it (same name, ``.json``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from segflow.errors import ModelError
from segflow.models.card import ModelCard, WeightsCard
from segflow.models.inference import Device, resolve_device
from segflow.models.networks import build_network

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference: eval mode, on its device, with its card and identity.

    ``module`` maps a float32 tensor ``(batch, channels, *tile)`` to ``(batch, classes,
    *tile)``: a torch module, or a callable of another runtime (ONNX Runtime), which then
    takes its input on ``input_device`` (``"cpu"``) and places the work itself.
    """

    module: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    card: ModelCard | None
    hash: str
    path: Path
    source: str = "segflow"
    input_device: Device | None = None


def _tensor_bytes(state: Mapping[str, torch.Tensor]) -> Iterator[bytes]:
    """Each tensor's name, dtype, shape and raw bytes, in name order."""
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        yield f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode()
        yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_hash(card: ModelCard, state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a model's card and weights: its identity.

    Examples
    --------
    >>> card = ModelCard(name="m", architecture={"name": "segnet"}, spatial_dims=2,
    ...                  channels=[{"name": "x"}], classes=["bg", "fg"], tile=(64, 64))
    >>> state = {"w": torch.ones(2)}
    >>> model_hash(card, state) == model_hash(card, {"w": torch.ones(2)})
    True
    >>> model_hash(card, state) == model_hash(card, {"w": torch.zeros(2)})
    False
    """
    digest = hashlib.sha256(card.identity_json().encode())
    for part in _tensor_bytes(state):
        digest.update(part)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str
) -> None:
    """Refuse weights whose tensor names or shapes differ from the card's network."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if shapes:
            problems.append(f"shapes differ: {'; '.join(shapes[:3])}")
        raise ModelError(
            f"{where}: the weights do not fit the card's network: {', '.join(problems)}"
        )


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | os.PathLike[str], model: nn.Module, card: ModelCard) -> str:
    """Write ``model``'s weights and ``card`` into ``directory``; return the model hash.

    The card's network must accept the model's state dict (names and shapes). The weights are
    written first and the card last, each atomically, so a folder with a card always has the
    weights that card describes.

    Examples
    --------
    >>> import tempfile
    >>> card = ModelCard(name="m", architecture={"name": "segnet", "params": {"features": [4]}},
    ...                  spatial_dims=2, channels=[{"name": "x"}], classes=["bg", "fg"],
    ...                  tile=(16, 16))
    >>> net = build_network(card.network_spec())
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     digest = save_checkpoint(tmp, net, card)
    ...     loaded = load_checkpoint(tmp)
    >>> loaded.hash == digest, loaded.card.weights.file
    (True, 'weights.pt')
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _check_state(state, build_network(card.network_spec()).state_dict(), f"model {card.name!r}")
    weights_path = directory / WEIGHTS_FILE
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomic(weights_path, buffer.getvalue())
    card = card.model_copy(
        update={"weights": WeightsCard(file=WEIGHTS_FILE, sha256=_file_sha256(weights_path))}
    )
    _write_atomic(directory / CARD_FILE, (card.model_dump_json(indent=2) + "\n").encode())
    return model_hash(card, state)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Parse a model card file, refusing anything that is not a valid card.

    Examples
    --------
    >>> read_card("no/such/card.json")
    Traceback (most recent call last):
    ...
    segflow.errors.ModelError: model card 'no/such/card.json' is missing
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model card '{path}' is missing")
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelError(f"model card '{path}' is invalid: {problems}") from None


def load_checkpoint(directory: str | os.PathLike[str], *, device: Device = "cpu") -> LoadedModel:
    """Load a checkpoint folder written by :func:`save_checkpoint` (see the module docstring).

    Raises :class:`~segflow.errors.ModelError` naming the file when the card is missing or
    invalid, the weights file is missing, altered or truncated, cannot be read as tensors
    only, or does not fit the card's network.
    """
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise ModelError(
            f"checkpoint '{directory}' has no model card {CARD_FILE}: save models with "
            "save_checkpoint, or write the card next to the weights"
        )
    card = read_card(card_path)
    if card.weights is None:
        raise ModelError(f"model card '{card_path}' names no weights file")
    weights_path = directory / card.weights.file
    if not weights_path.is_file():
        raise ModelError(f"weights file '{weights_path}' named by the card is missing")
    actual = _file_sha256(weights_path)
    if actual != card.weights.sha256:
        raise ModelError(
            f"weights file '{weights_path}' has SHA-256 {actual[:12]}..., the card says "
            f"{card.weights.sha256[:12]}...: the file was altered or truncated after saving"
        )
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"weights file '{weights_path}' cannot be read as tensors only "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file '{weights_path}' does not hold a state dict of tensors")
    module = build_network(card.network_spec())
    _check_state(state, module.state_dict(), f"weights file '{weights_path}'")
    module.load_state_dict(state)
    module.eval().to(resolve_device(device))
    return LoadedModel(module=module, card=card, hash=model_hash(card, state), path=directory)


def _sidecar_card(path: Path) -> ModelCard | None:
    card_path = path.with_suffix(".json")
    return read_card(card_path) if card_path.is_file() else None


def _file_model_hash(path: Path, card: ModelCard | None) -> str:
    digest = hashlib.sha256((card.identity_json() if card else "").encode())
    digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


def load_torchscript(path: str | os.PathLike[str], *, device: Device = "cpu") -> LoadedModel:
    """Load a TorchScript file as it is (``torch.jit.load``), with its ``.json`` card if any.

    TorchScript archives hold code and tensors, read by TorchScript's own loader (not
    Python's pickle). The model hash covers the file's bytes and the card.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"TorchScript file '{path}' is missing")
    torch_device = resolve_device(device)
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript in favour of torch.export; users still bring
            # TorchScript models, and reading them is what this function is for.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=torch_device)
    except Exception as exc:
        raise ModelError(
            f"TorchScript file '{path}' cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    card = _sidecar_card(path)
    return LoadedModel(
        module=module.eval(),
        card=card,
        hash=_file_model_hash(path, card),
        path=path,
        source="torchscript",
    )


def load_exported(path: str | os.PathLike[str], *, device: Device = "cpu") -> LoadedModel:
    """Load a ``torch.export`` program (``.pt2``) as it is, with its ``.json`` card if any.

    An exported program is a graph captured with fixed shapes: run it with the batch size and
    tile it was exported with. It is returned as the program's module (it cannot be switched
    to eval mode: export captured the mode it was exported in).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"exported program '{path}' is missing")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(
            f"exported program '{path}' cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    module = program.module().to(resolve_device(device))
    card = _sidecar_card(path)
    return LoadedModel(
        module=module,
        card=card,
        hash=_file_model_hash(path, card),
        path=path,
        source="torch.export",
    )


def load_model(path: str | os.PathLike[str], *, device: Device = "cpu") -> LoadedModel:
    """Load any supported model: a checkpoint folder, a ``.pt2`` program or a TorchScript file.

    Examples
    --------
    >>> load_model("no/such/model.pt2")
    Traceback (most recent call last):
    ...
    segflow.errors.ModelError: exported program 'no/such/model.pt2' is missing
    """
    path = Path(path)
    if path.is_dir():
        return load_checkpoint(path, device=device)
    if path.suffix == ".pt2":
        return load_exported(path, device=device)
    if path.suffix in (".pt", ".ts", ".torchscript", ".jit"):
        return load_torchscript(path, device=device)
    raise ModelError(
        f"model '{path}' is neither a checkpoint folder, a .pt2 program nor a TorchScript "
        "file (.pt, .ts)"
    )

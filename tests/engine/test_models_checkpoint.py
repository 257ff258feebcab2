"""Checkpoints: round trip, model identity, every refusal, TorchScript and torch.export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    load_exported,
    load_model,
    load_torchscript,
    model_hash,
    save_checkpoint,
)
from segflow.models.inference import predict_image
from segflow.models.networks import build_network

torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more


def _card(**changes: object) -> ModelCard:
    fields: dict[str, object] = {
        "name": "tiny",
        "architecture": {"name": "segnet", "params": {"features": [4, 8]}},
        "spatial_dims": 2,
        "channels": [{"name": "dapi"}],
        "classes": ["background", "nucleus"],
        "tile": (16, 16),
        "spacing": (0.5, 0.5),
        "training": {"data": "nuclei", "licence": "CC0-1.0", "data_fingerprint": "abc"},
        "metrics": {"foreground_iou": 0.8},
    }
    fields.update(changes)
    return ModelCard.model_validate(fields)


def _saved(tmp_path: Path, name: str = "model") -> tuple[Path, torch.nn.Module, str]:
    torch.manual_seed(0)
    card = _card()
    net = build_network(card.network_spec()).eval()
    folder = tmp_path / name
    return folder, net, save_checkpoint(folder, net, card)


def test_round_trip_gives_the_same_network_and_hash(tmp_path: Path) -> None:
    folder, net, digest = _saved(tmp_path)
    loaded = load_checkpoint(folder)
    assert loaded.hash == digest and loaded.card is not None
    assert loaded.card.model_dump(exclude={"weights"}) == _card().model_dump(exclude={"weights"})
    assert not loaded.module.training
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=0)
    # The identity does not depend on the folder or on saving again.
    _, _, again = _saved(tmp_path, "elsewhere")
    assert again == digest == load_model(folder).hash


def test_hash_changes_with_weights_or_card(tmp_path: Path) -> None:
    _, net, digest = _saved(tmp_path)
    state = net.state_dict()
    card = _card()
    assert model_hash(card, state) == digest
    assert model_hash(card.model_copy(update={"metrics": {"foreground_iou": 0.9}}), state) != digest
    changed = {k: v.clone() for k, v in state.items()}
    changed["head.bias"][0] += 1e-6
    assert model_hash(card, changed) != digest


def test_missing_or_invalid_card_is_refused(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    card_path = folder / CARD_FILE
    text = card_path.read_text()
    card_path.unlink()
    with pytest.raises(ModelError, match=r"checkpoint '.*model' has no model card card.json"):
        load_checkpoint(folder)
    card_path.write_text(text.replace('"tile"', '"tiles"'))
    with pytest.raises(ModelError, match=r"model card '.*card.json' is invalid: .*tiles"):
        load_checkpoint(folder)
    card_path.write_text(text.replace('"tile": [\n    16,', '"tile": [\n    10,'))
    with pytest.raises(
        ModelError, match=r"is invalid: .*`tile` \(10, 16\) must be a multiple of 4"
    ):
        load_checkpoint(folder)


def test_altered_or_truncated_weights_are_refused(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"weights.pt' has SHA-256 .* altered or truncated"):
        load_checkpoint(folder)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelError, match=r"altered or truncated after saving"):
        load_checkpoint(folder)
    # Even with a card that vouches for the truncated file, it cannot be read.
    _vouch_for(folder)
    with pytest.raises(ModelError, match=r"weights.pt' cannot be read as tensors only"):
        load_checkpoint(folder)
    weights.unlink()
    with pytest.raises(ModelError, match=r"weights file '.*weights.pt' named by the card is miss"):
        load_checkpoint(folder)


class _Payload:
    """Runs code when unpickled: what weights_only=True must refuse."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("arbitrary code ran",))


def _vouch_for(folder: Path) -> None:
    """Rewrite the card's SHA-256 to match whatever the weights file now holds."""
    import hashlib

    card = json.loads((folder / CARD_FILE).read_text())
    card["weights"]["sha256"] = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_pickled_objects_are_never_unpickled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, net, _ = _saved(tmp_path)
    torch.save({**net.state_dict(), "evil": _Payload()}, folder / WEIGHTS_FILE)
    _vouch_for(folder)
    with pytest.raises(ModelError, match=r"cannot be read as tensors only \(UnpicklingError"):
        load_checkpoint(folder)
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path: Path) -> None:
    folder, net, _ = _saved(tmp_path)
    card = json.loads((folder / CARD_FILE).read_text())
    card["architecture"]["params"]["features"] = [4, 6]
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"do not fit the card's network: shapes differ: "):
        load_checkpoint(folder)
    card["architecture"]["params"]["features"] = [4]
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"do not fit the card's network: unexpected \["):
        load_checkpoint(folder)
    with pytest.raises(ModelError, match=r"model 'tiny': the weights do not fit"):
        save_checkpoint(tmp_path / "other", net, _card(classes=["a", "b", "c"]))


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)
    ).eval()


def test_torchscript_loads_as_it_is(tmp_path: Path) -> None:
    net = _tiny_net()
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        # torch 2.13 deprecates tracing; users still bring TorchScript files, so make one.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(net, torch.zeros(1, 1, 16, 16)).save(str(path))
    loaded = load_model(path)
    assert loaded.card is None
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x))
    card = _card(architecture={"name": "torchscript"})
    path.with_suffix(".json").write_text(card.model_dump_json())
    with_card = load_torchscript(path)
    assert with_card.card == card and with_card.hash != loaded.hash
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"TorchScript file '.*net.pt' cannot be loaded"):
        load_torchscript(path)


def test_exported_program_runs_tiled_with_its_batch_size(tmp_path: Path) -> None:
    net = _tiny_net()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 16, 16),)), str(path))
    loaded = load_model(path)
    image = np.random.default_rng(0).normal(size=(1, 40, 23)).astype(np.float32)
    options = {"tile": (16, 16), "overlap": 0.5, "batch_size": 2}
    exported = predict_image(loaded.module, image, **options)  # type: ignore[arg-type]
    eager = predict_image(net, image, **options)  # type: ignore[arg-type]
    # The exported graph runs the same kernels; allow float32 rounding of a reordered graph.
    np.testing.assert_allclose(exported, eager, rtol=0, atol=1e-6)
    path.write_bytes(b"not a program")
    with pytest.raises(ModelError, match=r"exported program '.*net.pt2' cannot be loaded"):
        load_exported(path)
    with pytest.raises(ModelError, match=r"model '.*net.onnx' is neither a checkpoint folder"):
        load_model(tmp_path / "net.onnx")

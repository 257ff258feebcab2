"""The segment flow with a model step: the model's hash decides what is redone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xarray
from _geodata import blob_image, collection_config, write_geotiff

from segflow.flows.segment import segment_collection
from segflow.models.card import ModelCard
from segflow.models.checkpoint import load_checkpoint, save_checkpoint
from segflow.models.networks import build_network
from segflow.store.index import read_index

pytestmark = pytest.mark.usefixtures("prefect_harness")

CARD = ModelCard.model_validate(
    {
        "name": "tiny",
        "architecture": {"name": "segnet", "params": {"features": [4, 8]}},
        "spatial_dims": 2,
        "channels": [{"name": "grey"}],
        "head": "foreground_boundary",
        "tile": (32, 32),
        "overlap": 0.25,
    }
)


def _save(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    save_checkpoint(folder, build_network(CARD.network_spec()).eval(), CARD)
    return load_checkpoint(folder).hash


def _statuses(config: dict[str, object]) -> dict[str, str]:
    summary = segment_collection(config)
    return {r["id"]: r["status"] for r in summary["rows"]}  # type: ignore[index]


def test_a_changed_checkpoint_redoes_items_an_unchanged_one_skips_them(
    tmp_path: Path, dask_address: str
) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("a", "b"):
        write_geotiff(folder / f"{name}.tif", blob_image())
    model = tmp_path / "model"
    first = _save(model, seed=0)
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    config["pipeline"] = [
        {"op": "model", "path": str(model), "device": "cpu", "output": "probabilities"}
    ]

    assert _statuses(config) == {"a": "done", "b": "done"}
    index = read_index(str(store)).set_index("id")
    assert set(index["model_hash"]) == {first}
    probs = xarray.open_zarr(f"{store}/a")["probabilities"]
    assert probs.dims == ("class", "y", "x")
    assert list(probs["class"].values) == ["background", "foreground", "boundary"]

    assert _statuses(config) == {"a": "skipped", "b": "skipped"}  # the same model

    second = _save(model, seed=1)  # retrained in place: same path, other weights
    assert second != first
    assert _statuses(config) == {"a": "done", "b": "done"}
    index = read_index(str(store)).set_index("id")
    assert set(index["model_hash"]) == {second}

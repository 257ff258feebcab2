"""Smoke test of the train flow and ``segflow train``: small, real files, real Prefect."""

from __future__ import annotations

import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from segflow.flows.cli import app
from segflow.models.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _write_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(3):
        item = folder / f"cell_{k}"
        item.mkdir(parents=True)
        labels = np.zeros((32, 32), np.uint16)
        labels[4:12, 5:13], labels[18:28, 16:24] = 1, 2
        rgb = np.repeat((labels > 0)[None] * 180 + 20, 3, axis=0) + rng.integers(0, 20, (3, 32, 32))
        tifffile.imwrite(item / "image.tif", rgb.astype(np.uint8).transpose(1, 2, 0))
        tifffile.imwrite(item / "labels.tif", labels)


def test_train_cli_writes_a_checkpoint_and_resumes(tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    config = {
        "name": "tiny-nuclei",
        "data": {"images": "data/*/image.tif", "references": "{dir}/labels.tif",
                 "channels": "luma", "validation": ["cell_2"]},
        "model": {"architecture": {"name": "segnet", "params": {"features": [4, 8]}},
                  "spatial_dims": 2, "channels": [{"name": "luma"}],
                  "head": "foreground_boundary", "tile": [16, 16],
                  "training": {"data": "synthetic", "licence": "CC0-1.0"}},
        "training": {"batch_size": 2, "steps_per_epoch": 2, "max_epochs": 2, "seed": 1},
        "output": "model",
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))

    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "tiny-nuclei: training" in result.output
    # Not a terminal: one line per finished epoch with its loss and validation score, once
    # (Prefect's INFO line of the epoch goes to the log file the command names).
    for epoch in (1, 2):
        [line] = [line for line in result.output.splitlines() if f"epoch {epoch}" in line]
        assert line.startswith(f"tiny-nuclei epoch {epoch} done: loss ") and ", val " in line
    assert " | INFO " not in result.output
    [log_line] = [line for line in result.stderr.splitlines() if "Prefect's log: " in line]
    log = Path(log_line.split("Prefect's log: ")[1].split(" (--verbose")[0]).read_text()
    assert "epoch 2: loss " in log and "Finished in state Completed()" in log
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train-model"])),
            sort="START_TIME_DESC",
            limit=1,
        )
    assert re.fullmatch(r"tiny-nuclei-\d{4}-\d\d-\d\dT\d\d:\d\dZ", flow_run.name)
    assert {"train", "config:tiny-nuclei", f"output:{tmp_path / 'model'}"} <= set(flow_run.tags)
    loaded = load_checkpoint(tmp_path / "model" / "best")
    assert loaded.card is not None and loaded.card.channels[0].name == "luma"
    assert iio.imread(tmp_path / "model" / "loss.png").shape == (400, 640, 3)

    # A rerun resumes the finished run: no epoch is trained again, same best checkpoint.
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "model" / "best").hash == loaded.hash

    config["data"]["images"] = "nowhere/*.tif"  # type: ignore[index]
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output  # a config problem, found before Prefect starts
    assert "data.images: no file matches" in result.output


def test_train_into_an_output_trained_on_other_settings_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    _write_data(tmp_path / "data")
    config = {
        "name": "tiny",
        "data": {"images": "data/*/image.tif", "references": "{dir}/labels.tif",
                 "channels": "luma"},
        "model": {"architecture": {"name": "segnet", "params": {"features": [4]}},
                  "spatial_dims": 2, "channels": [{"name": "luma"}],
                  "head": "foreground_boundary", "tile": [16, 16]},
        "training": {"batch_size": 1, "steps_per_epoch": 1, "max_epochs": 1, "seed": 1},
        "output": "model",
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(app, ["train", str(path)]).exit_code == 0
    config["training"]["seed"] = 2  # type: ignore[index]
    path.write_text(yaml.safe_dump(config))
    tifffile.imwrite(tmp_path / "data" / "cell_0" / "labels.tif", np.zeros((32, 32), np.uint16))

    result = CliRunner().invoke(app, ["train", str(path)])

    assert result.exit_code == 2  # as an invalid config: nothing ran
    assert result.output.splitlines() == [
        f"{path}: output '{tmp_path / 'model'}' holds a run trained with other data or "
        "settings (training.seed 1, now 2; the data (images and references)): rerun with "
        "--restart to train afresh there, or set another output"
    ]
    restarted = CliRunner().invoke(app, ["train", str(path), "--restart"])
    assert restarted.exit_code == 0, restarted.output

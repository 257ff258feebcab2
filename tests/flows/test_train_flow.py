"""Smoke test of the train flow and ``segflow train``: small, real files, real Prefect."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import yaml
from _geodata import lock_held_elsewhere
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


def _tiny_config(tmp_path: Path, **training: Any) -> Path:
    _write_data(tmp_path / "data")
    config = {
        "name": "tiny",
        "data": {"images": "data/*/image.tif", "references": "{dir}/labels.tif",
                 "channels": "luma", "validation": ["cell_2"]},
        "model": {"architecture": {"name": "segnet", "params": {"features": [4]}},
                  "spatial_dims": 2, "channels": [{"name": "luma"}],
                  "head": "foreground_boundary", "tile": [16, 16]},
        "training": {"batch_size": 1, "steps_per_epoch": 1, "max_epochs": 1, "seed": 1,
                     **training},
        "output": "model",
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_second_training_into_the_same_output_is_refused_in_one_line(tmp_path: Path) -> None:
    # The first training is another live process holding the output's lock (as a training
    # does from its first epoch to its end).
    path = _tiny_config(tmp_path)
    output = tmp_path / "model"
    with lock_held_elsewhere(output, "other-training"):
        result = CliRunner().invoke(app, ["train", str(path)])
        assert result.exit_code == 2, result.output  # refused before Prefect starts
        [line] = result.output.splitlines()
        assert line.startswith(
            f"{path}: training output '{output}' is in use by another segflow run "
            "(run other-training of "
        )
        # Two started at once: the one that finds the lock taken inside its flow run ends
        # Failed with the same line, and nothing was trained.
        from segflow.flows.train import train_flow

        state = train_flow(str(path), return_state=True)
        assert state.is_failed()
        assert "is in use by another segflow run (run other-training of" in str(state.message)
    assert not (output / "last").exists() and not (output / "best").exists()
    assert CliRunner().invoke(app, ["train", str(path)]).exit_code == 0  # free again
    assert not (output / ".segflow" / "lock.json").exists()


def test_ctrl_c_stops_training_after_its_step_with_one_line_saying_how_to_resume(
    tmp_path: Path, prefect_harness: None
) -> None:
    from prefect.settings import PREFECT_API_URL

    path = _tiny_config(tmp_path, max_epochs=10_000, steps_per_epoch=4)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "segflow.flows", "train", str(path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # one line per finished epoch (not a terminal)
        seen.append(line)
        if line.startswith("tiny epoch 2 done: "):
            break
    assert seen and seen[-1].startswith("tiny epoch 2 done: "), "".join(seen)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGINT, output
    assert "Traceback" not in output and "Crash detected" not in output, output
    lines = [line for line in output.splitlines() if "stopped (SIGINT)" in line]
    assert len(lines) == 1, output
    [line] = lines
    stopped = int(re.search(r"in epoch (\d+):", line)[1])  # type: ignore[index]
    assert stopped >= 3
    assert line == (
        f"{path}: tiny: stopped (SIGINT) in epoch {stopped}: {tmp_path / 'model'}/last holds "
        f"the run as epoch {stopped - 1} left it; run the same command again to resume with "
        f"epoch {stopped}"
    )
    import torch

    state = torch.load(tmp_path / "model" / "last" / "training_state.pt", weights_only=True)
    assert state["epoch"] == stopped - 1  # the saved run is the last finished epoch's
    assert not (tmp_path / "model" / ".segflow" / "lock.json").exists()  # released

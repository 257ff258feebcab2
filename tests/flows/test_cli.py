"""The ``segflow`` command through typer's CliRunner: ops, validate, run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import xarray
from typer.testing import CliRunner

from segflow.flows.cli import app
from segflow.store import read_index
from segflow.store.regions import read_regions

CONFIGS = Path(__file__).parents[2] / "configs"
runner = CliRunner()


def test_ops_lists_every_operation_with_kind_halo_and_defaults() -> None:
    from segflow.ops import list_operations

    result = runner.invoke(app, ["ops"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    for op in list_operations():
        assert op.name in result.output
    assert "int(truncate * sigma + 0.5)" in result.output  # gaussian's halo rule
    assert "truncate: float = 4.0" in result.output
    assert "footprint: 'disk' | 'square' = 'disk'" in result.output
    assert "value: float (required)" in result.output


@pytest.mark.parametrize("name", ["aerial", "ct", "nuclei", "nuclei-unet"])
def test_validate_accepts_the_shipped_configs(name: str) -> None:
    result = runner.invoke(app, ["validate", str(CONFIGS / f"{name}.yaml")])

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {CONFIGS / name}.yaml: {name}: ")


def test_validate_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("input: {path: x}\nouput: {store: y}\npipeline: [{op: otsu}]\n")

    result = runner.invoke(app, ["validate", str(config)])

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{config}: output: required key is missing",
        f"{config}: ouput: unknown key (got {{'store': 'y'}})",
    ]
    assert "Traceback" not in result.output


def test_validate_names_the_step_parameter_and_value() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "aerial.yaml"), "--set", "pipeline.2.sigma=-1"]
    )

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{CONFIGS / 'aerial.yaml'}: pipeline[2].sigma: ")
    assert "must be >= 0" in line and "-1" in line


def test_validate_checks_the_pipeline_against_the_items() -> None:
    # Without combine_bands, otsu gets the 3 bands kept by select_bands.
    result = runner.invoke(
        app,
        ["validate", str(CONFIGS / "nuclei.yaml"), "--set", "pipeline.1={op: gaussian, sigma: 1}"],
    )

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "item 'image'" in line
    assert "pipeline[3] 'otsu' needs a single-channel image, got 3 channels" in line


def test_validate_reports_a_missing_input_path() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "ct.yaml"), "--set", "input.path=/no/such/ct.nii.gz"]
    )

    assert result.exit_code == 2
    assert "input.path: collection '/no/such/ct.nii.gz': no such file or folder" in result.stderr


def test_run_with_an_invalid_config_exits_2_before_running(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["run", str(CONFIGS / "aerial.yaml"), "--set", "blocks.shape=[0,256]"]
    )

    assert result.exit_code == 2
    assert "blocks.shape: " in result.stderr and "must be >= 1" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("prefect_harness")
def test_run_applies_overrides_and_prints_how_to_open(tmp_path: Path, dask_address: str) -> None:
    store = tmp_path / "aerial.zarr"

    result = runner.invoke(
        app,
        [
            "run", str(CONFIGS / "aerial.yaml"),
            "--set", f"output.store={store}",
            "--set", f"cluster.address={dask_address}",
            "--set", "blocks.shape=[512,512]",
            "--set", "output.chunks=[256,256]",
        ],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "aerial: 1 done, 0 skipped (already done), 0 failed" in result.stdout
    assert f"output: {store}" in result.stdout
    opener = f"xarray.open_zarr({str(store)!r}, group='RGB.byte')"
    assert opener in result.stdout
    ds = xarray.open_zarr(store, group="RGB.byte")
    assert ds["labels"].dims == ("y", "x")
    assert ds["labels"].encoding["chunks"] == (256, 256)  # the --set chunks were used
    regions = read_regions(str(store), "RGB.byte")  # the config asks for regions
    assert len(regions) == int(ds["labels"].max()) and regions["label"].is_unique
    index = read_index(store).set_index("id")
    assert index.loc["RGB.byte", "object_count"] == len(regions)
    assert index.loc["RGB.byte", "area_p50"] == regions["area"].median()


@pytest.mark.usefixtures("prefect_harness")
def test_run_exits_1_when_an_item_fails(tmp_path: Path, dask_address: str) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a PNG")

    result = runner.invoke(
        app,
        [
            "run", str(CONFIGS / "nuclei.yaml"),
            "--set", f"input.path={tmp_path / 'broken.png'}",
            "--set", f"output.store={tmp_path / 'out.zarr'}",
            "--set", f"cluster.address={dask_address}",
        ],
    )  # fmt: skip

    assert result.exit_code == 1
    assert "nuclei: 0 done, 0 skipped (already done), 1 failed" in result.stdout
    [failure] = [line for line in result.stdout.splitlines() if line.startswith("  failed ")]
    assert f"{tmp_path / 'broken.png'}" in failure and "ItemReadError" not in failure


@pytest.mark.usefixtures("prefect_harness")
def test_evaluate_scores_the_store_against_reference_labels(
    tmp_path: Path, dask_address: str
) -> None:
    store = tmp_path / "nuclei.zarr"
    common = ["--set", f"output.store={store}", "--set", f"cluster.address={dask_address}"]
    assert runner.invoke(app, ["run", str(CONFIGS / "nuclei.yaml"), *common]).exit_code == 0
    labels = str(CONFIGS.parent / "tests" / "data" / "nuclei" / "*" / "labels.tif")

    result = runner.invoke(
        app, ["evaluate", str(CONFIGS / "nuclei.yaml"), "--reference", labels, *common]
    )

    assert result.exit_code == 0, result.output
    assert "ap50" in result.stdout and "matched" in result.stdout
    scores = pd.read_parquet(store / "evaluation.parquet").set_index("id")
    index = read_index(store).set_index("id")
    assert 0.5 < scores.loc["image", "ap50"] <= 1.0  # the bundled config finds most nuclei
    assert index.loc["image", "ap50"] == scores.loc["image", "ap50"]
    assert scores.loc["image", "n_ref"] == 36  # nuclei in the bundled reference

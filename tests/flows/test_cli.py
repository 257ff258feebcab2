"""The ``segflow`` command through typer's CliRunner: ops, validate, run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray
import yaml
from _geodata import blob_image, collection_config, write_geotiff
from typer.testing import CliRunner

from segflow.flows.cli import app
from segflow.store import read_index
from segflow.store.regions import read_regions
from segflow.store.stamps import group_stamp

CONFIGS = Path(__file__).parents[2] / "configs"
runner = CliRunner()


@pytest.mark.parametrize("name", ["aerial", "ct", "nuclei", "nuclei-unet"])
def test_validate_accepts_the_shipped_configs(name: str) -> None:
    result = runner.invoke(app, ["validate", str(CONFIGS / f"{name}.yaml")])

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {CONFIGS / name}.yaml: {name}: ")


SHIPPED = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_validate_checks_each_shipped_config_against_1_3_and_4_bands(
    config: Path, tmp_path: Path
) -> None:
    """A 1-band, an RGB and an RGBA TIFF of the bundled grey nuclei image: configs starting
    with `luma` take all three, `rgb` (colour) refuses the 1-band one and `expect_bands`
    (Hounsfield units) the colour ones, each with one line naming the item and the count."""
    import tifffile

    from segflow.io import open_item

    png = CONFIGS.parent / "tests" / "data" / "nuclei"
    (path,) = png.glob("*/image.png")
    grey = open_item(str(path)).read((slice(0, 256), slice(0, 256)))[0]
    files = {
        "one": grey,
        "rgb": np.stack([grey] * 3, axis=-1),
        "rgba": np.stack([grey] * 3 + [np.full_like(grey, 255)], axis=-1),
    }
    for name, image in files.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", image)
    settings = yaml.safe_load(config.read_text())
    untrained = [
        step["path"]
        for step in settings["pipeline"]
        if step["op"] == "model" and not (config.parent / step["path"]).exists()
    ]
    if untrained:  # a recipe whose weights are not shipped (licence): `segflow train` makes them
        pytest.skip(f"{config.name}: its model is not trained here ({untrained[0]})")
    first = settings["pipeline"][0]["op"]
    by_first: dict[str, dict[str, int | None]] = {
        "rgb": {"one": 1},
        "expect_bands": {"rgb": 3, "rgba": 4},
    }
    refused = dict(by_first.get(first, {}))
    three_d = len(settings["blocks"]["shape"]) == 3
    if three_d and any(step["op"] == "model" for step in settings["pipeline"]):
        refused = {**refused, "one": None}  # a 3-D model refuses the 2-D slice that passes
    overrides = [f"input.path={tmp_path}/*.tif", f"output.store={tmp_path / 'out.zarr'}"]
    if first == "mask_nodata":  # aerial: a plain TIFF has no nodata tag to default to
        overrides.append("pipeline.0.value=0")
    if len(settings["blocks"]["shape"]) == 3:  # CT: these are 2-D slices
        overrides += ["blocks.shape=[128,128]", "output.chunks=[128,128]"]

    result = runner.invoke(
        app, ["validate", str(config), *[f"--set={override}" for override in overrides]]
    )

    assert result.exit_code == (2 if refused else 0), result.output
    lines = result.stderr.splitlines()
    assert len(lines) == len(refused), lines
    for line, (name, bands) in zip(lines, sorted(refused.items()), strict=True):
        assert line.startswith(f"{config}: item {name!r} ({tmp_path / name}.tif): pipeline[")
        assert (
            f"the image has {bands} band(s)" in line if bands else "is 3-D, the item is 2-D" in line
        )
    if not refused:
        assert result.stdout.startswith(f"OK {config}: ")


def test_validate_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("input: {path: x}\nouput: {store: y}\npipeline: [{op: otsu}]\n")

    result = runner.invoke(app, ["validate", str(config)])

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{config}: output: required key is missing",
        f"{config}: ouput: unknown key; did you mean 'output'?",
    ]
    assert "Traceback" not in result.output


def test_validate_names_the_step_parameter_and_value() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "aerial.yaml"), "--set", "pipeline.2.sigma=-1"]
    )

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("--set pipeline.2.sigma=-1: pipeline[2].sigma: ")
    assert "must be >= 0" in line and "-1" in line


def test_a_value_that_fits_no_member_of_a_union_is_one_line_naming_the_set() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "aerial.yaml"), "--set", "pipeline.2.sigma=abc"]
    )

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "--set pipeline.2.sigma=abc: pipeline[2].sigma expects a number or a list of numbers "
        "(got 'abc')"
    ]


def test_validate_checks_the_pipeline_against_the_items() -> None:
    # With the RGBA PNG's colour bands instead of its luma, otsu gets 3 bands.
    result = runner.invoke(
        app,
        ["validate", str(CONFIGS / "nuclei.yaml"), "--set", "pipeline.0={op: select_bands, "
         "bands: [1, 2, 3]}"],
    )  # fmt: skip

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "item 'image'" in line
    assert "pipeline[2] 'otsu' needs a single-channel image, got 3 channels" in line


def test_validate_suggests_band_axes_for_a_few_slice_tiff(tmp_path: Path) -> None:
    # A two-band float TIFF without axis metadata is read as a stack of two slices.
    import tifffile

    (tmp_path / "img").mkdir()
    tifffile.imwrite(tmp_path / "img" / "two.tif", np.zeros((2, 30, 41), np.float32))
    args = ["validate", str(CONFIGS / "nuclei.yaml"), "--set", f"input.path={tmp_path / 'img'}"]

    result = runner.invoke(app, args)

    assert result.exit_code == 2
    first = result.stderr.splitlines()[0]
    assert "item 'two' (" in first and "has 3 spatial axes ('z', 'y', 'x')" in first
    assert first.endswith(
        "; if its first axis (2) holds bands, not slices, say so: --set input.options.axes=cyx"
    )
    told = runner.invoke(app, [*args, "--set", "input.options.axes=cyx"])
    assert "spatial axes" not in told.stderr  # read as bands now (other checks may follow)


def test_validate_refuses_vectors_for_a_volume() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "ct.yaml"), "--set", "output.vectors=true"]
    )

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "item 'CT_image' (" in line
    assert line.endswith(
        "`output.vectors` (true) needs a 2-D item (y, x), this one has 3 spatial axes "
        "('z', 'y', 'x'): set output.vectors: false for volumes"
    )


def test_validate_refuses_regions_for_a_pipeline_without_labels() -> None:
    # nuclei.yaml ends in a label step: cut it, and its regions have no objects to describe.
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "nuclei.yaml"), "--set", "pipeline.4={op: fill_holes}"]
    )

    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert "item 'image' (" in line
    assert line.endswith(
        "`output.regions` (true) needs a pipeline that ends in labels, this one gives mask: "
        "set output.regions: false or end the pipeline with a label step"
    )


@pytest.mark.parametrize("command", ["validate", "run"])
def test_validate_and_run_refuse_regions_without_labels_before_anything_runs(
    command: str, tmp_path: Path
) -> None:
    # One check for both (segflow.engine.collection.check_item_fit): the writer's own.
    store = tmp_path / "n.zarr"
    result = runner.invoke(
        app,
        [
            command, str(CONFIGS / "nuclei.yaml"),
            "--set", "pipeline.4={op: fill_holes}",
            "--set", f"output.store={store}",
        ],
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{CONFIGS / 'nuclei.yaml'}: item 'image' (")
    assert line.endswith(
        "`output.regions` (true) needs a pipeline that ends in labels, this one gives mask: "
        "set output.regions: false or end the pipeline with a label step"
    )
    assert not store.exists()  # nothing ran


def test_validate_refuses_dicom_seg_for_a_nifti_item() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "ct.yaml"), "--set", "output.dicom_seg=true"]
    )

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "item 'CT_image' (" in line
    assert line.endswith(
        "`output.dicom_seg` (true) needs a DICOM series as input, this item is 'nifti': a SEG "
        "references the source images; set output.dicom_seg: false for other formats"
    )


def test_validate_reports_a_missing_input_path() -> None:
    result = runner.invoke(
        app, ["validate", str(CONFIGS / "ct.yaml"), "--set", "input.path=/no/such/ct.nii.gz"]
    )

    assert result.exit_code == 2
    assert "input.path: collection '/no/such/ct.nii.gz': no such file or folder" in result.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_run_of_many_configs_leaves_out_an_untrained_model_and_runs_the_others(
    tmp_path: Path, dask_address: str
) -> None:
    """The README: `segflow run configs/*.yaml` runs every config but those whose model
    is not trained, each reported in one line; exit 1 once the others are done."""
    untrained = CONFIGS / "em-unet.yaml"
    weights = yaml.safe_load(untrained.read_text())["pipeline"][1]["path"]
    if (untrained.parent / weights).exists():
        pytest.skip(f"{untrained.name}: its model is trained here")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_geotiff(tiles / "tile_a.tif", blob_image())
    good = tmp_path / "tiles.yaml"
    good.write_text(yaml.safe_dump(collection_config(tiles, tmp_path / "out.zarr", dask_address)))

    result = runner.invoke(app, ["run", str(untrained), str(good)])

    assert result.exit_code == 1, result.output
    assert [line for line in result.stderr.splitlines() if "em-unet" in line] == [
        f"{untrained}: not run, its model is not trained: pipeline[1] (model): `path` "
        f"'{(untrained.parent / weights).resolve()}': no such checkpoint folder or model file; "
        "train it with `segflow train` (see configs/train/)"
    ]
    assert read_index(str(tmp_path / "out.zarr"))["status"].tolist() == ["done"]


def test_run_of_only_untrained_configs_exits_2() -> None:
    untrained = CONFIGS / "em-unet.yaml"
    weights = yaml.safe_load(untrained.read_text())["pipeline"][1]["path"]
    if (untrained.parent / weights).exists():
        pytest.skip(f"{untrained.name}: its model is trained here")

    result = runner.invoke(app, ["run", str(untrained)])

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{untrained}: not run, its model is not trained: pipeline[1] ")


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
    opener = f"xarray.open_zarr({str(store) + '/RGB.byte'!r})"
    assert f'open:   {sys.executable} -c "import xarray; print({opener})"' in result.stdout
    ds = xarray.open_zarr(f"{store}/RGB.byte")
    assert ds["labels"].dims == ("y", "x")
    assert ds["labels"].encoding["chunks"] == (256, 256)  # the --set chunks were used
    regions = read_regions(str(store), "RGB.byte")  # the config asks for regions
    assert len(regions) == int(ds["labels"].max()) and regions["label"].is_unique
    index = read_index(store).set_index("id")
    assert index.loc["RGB.byte", "object_count"] == len(regions)
    assert f"  made:   {len(regions)} objects\n" in result.stdout
    assert index.loc["RGB.byte", "area_p50"] == regions["area"].median()
    # Prefect's INFO lines went to the log file the command named, not to the terminal.
    log = _prefect_log(result.output)
    assert f"item RGB.byte: done, {len(regions)} objects" in log
    assert "Finished in state Completed()" in log


@pytest.mark.usefixtures("prefect_harness")
def test_run_off_a_terminal_prints_one_line_per_finished_item(
    tmp_path: Path, dask_address: str
) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "tile_a.tif", blob_image())
    config = tmp_path / "tiles.yaml"
    config.write_text(
        yaml.safe_dump(collection_config(folder, tmp_path / "out.zarr", dask_address))
    )
    args = ["run", str(config)]

    first = runner.invoke(app, args)  # CliRunner's stderr is not a terminal
    write_geotiff(folder / "tile_b.tif", blob_image(), x0=500_720.0)
    second = runner.invoke(app, args)

    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    item_lines = [
        [line for line in result.stderr.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
        for result in (first, second)
    ]
    # tile_a, skipped in the second run, counts towards 2/2 without a line of its own.
    assert item_lines == [["[1/1] tile_a: done"], ["[2/2] tile_b: done"]]
    assert "━" not in first.stderr + second.stderr  # no live bar drawn into a log


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
    # What was scored says which config made it.
    assert scores.loc["image", "config_name"] == index.loc["image", "config_name"] == "nuclei"
    assert scores.loc["image", "config_hash"] == index.loc["image", "config_hash"]


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs())


@pytest.mark.usefixtures("prefect_harness")
def test_run_with_nothing_to_do_starts_no_flow_but_redoes_an_uncommitted_item(
    tmp_path: Path, dask_address: str
) -> None:
    store = tmp_path / "nuclei.zarr"
    command = [
        "run", str(CONFIGS / "nuclei.yaml"),
        "--set", f"output.store={store}", "--set", f"cluster.address={dask_address}",
    ]  # fmt: skip
    assert runner.invoke(app, command).exit_code == 0
    runs = _flow_runs()
    # The flow run stamped the item's row and nothing rewrote its group after: the next
    # plan takes the row's word without reading the group (segflow.store.stamps).
    stamp = read_index(str(store)).set_index("id").loc["image", "commit_stamp"]
    assert stamp == group_stamp(str(store), "image")

    again = runner.invoke(app, command)

    assert again.exit_code == 0, again.output
    assert "nuclei: 0 done, 1 skipped (already done), 0 failed" in again.stdout
    assert f"xarray.open_zarr({str(store) + '/image'!r})" in again.stdout
    assert again.stderr.startswith("nothing to do: every item is done")
    assert _flow_runs() == runs  # decided before any flow run

    # A done index row over a group without its commit record (an interrupted rewrite on
    # an object store leaves that) is redone, by a flow run.
    metadata_path = store / "image" / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["attributes"]["segflow_commit"]
    metadata_path.write_text(json.dumps(metadata))

    redo = runner.invoke(app, command)

    assert redo.exit_code == 0, redo.output
    assert "nuclei: 1 done, 0 skipped (already done), 0 failed" in redo.stdout
    assert "nothing to do" not in redo.output
    assert _flow_runs() == runs + 1


def test_run_with_nothing_to_do_imports_neither_prefect_nor_dask(tmp_path: Path) -> None:
    """The command decides before importing Prefect or Dask (a real process: in this one
    the test harness has imported both). The store is made by the engine, as a run would."""
    from segflow.config import load_config
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import discover_items
    from segflow.store.index import write_index

    store = str(tmp_path / "nuclei.zarr")
    config = load_config(CONFIGS / "nuclei.yaml", [f"output.store={store}"])
    (reader,), _ = discover_items(config.input.path)
    with LocalExecutor(1) as executor:
        result = segment_item(
            reader, config.pipeline, store=store, block_shape=config.blocks.shape,
            executor=executor, chunks=config.output.chunks, config_hash=config.config_hash(),
            regions=config.output.regions,
        )  # fmt: skip
    assert result.status == "done", result.error
    write_index(store, [result.as_row()])
    check = (
        "import sys\nfrom segflow.flows.cli import main\n"
        f"sys.argv = ['segflow', 'run', {str(CONFIGS / 'nuclei.yaml')!r}, "
        f"'--set', 'output.store={store}']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('prefect', 'distributed', 'dask') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    done = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert "nuclei: 0 done, 1 skipped (already done), 0 failed" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_ops_lists_one_line_per_operation() -> None:
    from segflow.ops import list_operations

    result = runner.invoke(app, ["ops"], env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(list_operations()) + 2  # a title, one per operation, a hint
    for op, line in zip(list_operations(), lines[1:-1], strict=True):
        assert line.split()[0] == op.name
        assert len(line) <= 80
    assert "  otsu" in result.stdout and "Otsu threshold of the whole item" in result.stdout
    assert lines[-1] == "segflow ops NAME: its parameters, defaults and halo rule"


def test_ops_name_shows_parameters_defaults_and_halo_rule() -> None:
    gaussian = runner.invoke(app, ["ops", "gaussian"])
    opening = runner.invoke(app, ["ops", "binary_opening"])
    threshold = runner.invoke(app, ["ops", "threshold"])

    assert gaussian.exit_code == opening.exit_code == threshold.exit_code == 0
    assert gaussian.stdout.startswith("gaussian (local): ")
    assert "halo: int(truncate * sigma + 0.5)" in gaussian.stdout
    assert "  truncate: float = 4.0" in gaussian.stdout
    assert "  footprint: 'disk' | 'square' = 'disk'" in opening.stdout
    assert "  value: float (required)" in threshold.stdout


def test_ops_with_an_unknown_name_exits_2_with_one_line() -> None:
    result = runner.invoke(app, ["ops", "gausian"])

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("segflow ops: unknown operation 'gausian'; did you mean 'gaussian'?")


def test_version_is_the_code_version_the_index_records() -> None:
    import segflow

    result = runner.invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.stdout.startswith(f"segflow {segflow.__version__} (Python ")
    assert sys.executable in result.stdout


def test_validate_says_what_it_derived_from_blocks_shape_alone() -> None:
    config = CONFIGS / "aerial.yaml"  # output.chunks [256, 256]

    result = runner.invoke(app, ["validate", str(config), "--set", "blocks.shape=[128,128]"])

    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"{config}: output.chunks [256, 256] (from the file) do not divide --set blocks.shape "
        "[128, 128]: using output.chunks=[128, 128]"
    ]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_blocks_that_miss_the_storage_unit_name_the_fix_before_running(
    command: str, tmp_path: Path
) -> None:
    config = CONFIGS / "aerial.yaml"
    sets = ["blocks.shape=[128,128]", "output.chunks=[256,256]"]  # both set: nothing derived

    result = runner.invoke(
        app,
        [command, str(config), "--set", f"output.store={tmp_path / 'a.zarr'}",
         *[f"--set={s}" for s in sets]],
    )  # fmt: skip

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{config}: item 'RGB.byte' (")
    assert "`blocks.shape` (128, 128) does not align with the output storage unit" in line
    assert line.endswith("(--set output.chunks=[128,128] or --set blocks.shape=[256,256] fixes it)")
    assert not (tmp_path / "a.zarr").exists()  # nothing ran


def test_evaluate_a_store_never_run_exits_2_with_one_line(tmp_path: Path) -> None:
    config = CONFIGS / "nuclei.yaml"
    store = tmp_path / "never.zarr"

    result = runner.invoke(
        app,
        ["evaluate", str(config), "--reference", str(tmp_path), "--set", f"output.store={store}"],
    )

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{config}: store '{store}' has no item made by config 'nuclei' to score: run "
        f"`segflow run {config}` with the same --set options first"
    ]


@pytest.mark.usefixtures("prefect_harness")
def test_evaluate_with_a_reference_that_names_no_file_or_a_binary_mask(
    tmp_path: Path, dask_address: str
) -> None:
    import tifffile

    from segflow.io import open_item

    store = tmp_path / "nuclei.zarr"
    common = ["--set", f"output.store={store}", "--set", f"cluster.address={dask_address}"]
    config = str(CONFIGS / "nuclei.yaml")
    assert runner.invoke(app, ["run", config, *common]).exit_code == 0
    nothing = runner.invoke(app, ["evaluate", config, "--reference", "/no/such/*.tif", *common])

    assert nothing.exit_code == 2
    assert nothing.stderr.splitlines() == [
        f"{config}: --reference '/no/such/*.tif' names no file (a file, a folder or a glob)"
    ]

    # The sample's labels as a 0/255 mask named like the item's source (image.png).
    (labels,) = (CONFIGS.parent / "tests" / "data" / "nuclei").glob("*/labels.tif")
    mask = (open_item(str(labels)).read((slice(0, 256), slice(0, 256)))[0] > 0) * np.uint8(255)
    tifffile.imwrite(tmp_path / "image.tif", mask)

    binary = runner.invoke(
        app, ["evaluate", config, "--reference", str(tmp_path / "image.tif"), *common]
    )

    assert binary.exit_code == 0, binary.output
    assert "dice_1" in binary.stdout and "ap50" not in binary.stdout
    assert (  # after Prefect's log lines
        "image: the reference has one value besides 0 (255), a mask: scored as a mask: Dice/IoU "
        "of the foreground; AP needs an instance label image (one id per object)"
    ) in binary.stderr.splitlines()
    scores = pd.read_parquet(store / "evaluation.parquet").set_index("id")
    assert 0.5 < scores.loc["image", "dice_1"] <= 1
    assert scores.loc["image", "eval_note"].startswith("the reference has one value besides 0")

    # A reference of another shape: one line naming both shapes (not a block's slice error).
    small = tmp_path / "small" / "image.tif"
    small.parent.mkdir()
    tifffile.imwrite(small, mask[:100, :100])
    wrong = runner.invoke(app, ["evaluate", config, "--reference", str(small), *common])

    assert wrong.exit_code == 1
    shapes = f"item 'image': reference '{small}' has shape (100, 100), the item has (256, 256)"
    assert [line for line in wrong.output.splitlines() if "shape" in line] == [shapes]
    # As quiet as `segflow run`: Prefect's INFO lines are in the log file it names.
    assert " | INFO " not in wrong.output
    assert "Finished in state" in _prefect_log(wrong.output)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["evaluate-collection"])),
            sort="START_TIME_DESC",
            limit=1,
        )
    assert re.fullmatch(r"nuclei-evaluate-\d{4}-\d\d-\d\dT\d\d:\d\dZ", flow_run.name)
    assert {"evaluate", "config:nuclei", f"store:{store}"} <= set(flow_run.tags)


@pytest.mark.usefixtures("prefect_harness")
def test_a_mask_pipeline_says_how_much_foreground_it_made(
    tmp_path: Path, dask_address: str
) -> None:
    store = tmp_path / "mask.zarr"

    result = runner.invoke(
        app,
        [
            "run", str(CONFIGS / "nuclei.yaml"),
            "--set", f"output.store={store}", "--set", f"cluster.address={dask_address}",
            "--set", "pipeline.4={op: fill_holes}", "--set", "output.regions=false",
        ],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    mask = xarray.open_zarr(f"{store}/image")["mask"].values
    made = f"{100 * mask.mean():.1f} % foreground"
    assert 1 < 100 * mask.mean() < 50  # the nuclei of the sample, not nothing or everything
    assert f"  made:   {made}\n" in result.stdout
    log = _prefect_log(result.output)
    assert f"item image: done, {made}, " in log  # Prefect's log line, in its log file
    assert "None objects" not in result.output + log


def _prefect_log(output: str) -> str:
    """The log file a run named on its first line (Prefect's INFO lines go there)."""
    [line] = [line for line in output.splitlines() if "Prefect's log: " in line]
    return Path(line.split("Prefect's log: ")[1].split(" (--verbose")[0]).read_text()


@pytest.mark.parametrize("command", ["run", "validate", "evaluate", "train", "ops", "formats"])
def test_help_shows_types_a_user_reads(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    assert "<" not in result.output and ">" not in result.output  # no <list[Path]>, <bool>
    if command in ("run", "validate", "evaluate"):
        assert "PATH..." in result.output and "KEY=VALUE" in result.output


def test_the_summary_names_the_first_failures_and_counts_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from segflow.engine.collection import run_summary
    from segflow.flows.run_cli import FAILURES_SHOWN, _print_summary

    rows = [
        {"id": f"t{i:03d}", "status": "failed", "error": f"item 't{i:03d}': too many bands"}
        for i in range(FAILURES_SHOWN + 5)
    ]
    _print_summary(run_summary("many", "/out/many.zarr", rows))

    out = capsys.readouterr().out
    assert out.count("too many bands") == FAILURES_SHOWN
    assert "… and 5 more (each with its reason in the index)" in out


def test_two_configs_on_one_store_are_refused_before_anything_runs(tmp_path: Path) -> None:
    store = tmp_path / "shared.zarr"
    classical, unet = CONFIGS / "nuclei.yaml", CONFIGS / "nuclei-unet.yaml"

    result = runner.invoke(
        app, ["run", str(classical), str(unet), "--set", f"output.store={store}"]
    )

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"{unet}: output.store: configs 'nuclei' and 'nuclei-unet' ({classical}, {unet}) would "
        f"write into one store '{store}' and replace each other's items: give each its own "
        f"output.store, or --set output.allow_other_configs=true to let them share it"
    ]
    assert not store.exists()


def test_a_store_made_by_another_config_is_refused_and_not_scored(tmp_path: Path) -> None:
    """A store one config made (here through the engine, without Prefect): another config's
    run is refused before it starts, and evaluate says which config made the items."""
    from segflow.config import load_config
    from segflow.engine.collection import plan_collection, run_item
    from segflow.engine.executor import LocalExecutor

    store = tmp_path / "nuclei.zarr"
    made = load_config(CONFIGS / "nuclei.yaml", [f"output.store={store}"])
    executor = LocalExecutor(1)
    try:
        for item in plan_collection(made).work():
            run_item(made, item, executor=executor, run_id="r1")
    finally:
        executor.close()
    other = CONFIGS / "nuclei-unet.yaml"

    result = runner.invoke(app, ["run", str(other), "--set", f"output.store={store}"])

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"{other}: output.store: store '{store}' holds 1 item made by config 'nuclei'; config "
        f"'nuclei-unet' would replace or mix with them: choose another output.store, or --set "
        f"output.allow_other_configs=true to let both write into it"
    ]
    scored = runner.invoke(
        app,
        ["evaluate", str(other), "--reference", str(tmp_path), "--set", f"output.store={store}"],
    )
    assert scored.exit_code == 2, scored.output
    assert "has no item made by config 'nuclei-unet' to score (its items were made by " in (
        scored.stderr
    )
    assert "config 'nuclei')" in scored.stderr
    allowed = runner.invoke(
        app,
        [
            "validate", str(other), "--set", f"output.store={store}",
            "--set", "output.allow_other_configs=true",
        ],
    )  # fmt: skip
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_discovers_its_collection_once(
    tmp_path: Path, dask_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's plan (made to tell whether anything is to do) goes to the flow run,
    which does not walk and open the collection again."""
    import segflow.io

    calls: list[str] = []
    discover = segflow.io.discover_items

    def counted(path: str, **kwargs: Any) -> Any:
        calls.append(path)
        return discover(path, **kwargs)

    monkeypatch.setattr(segflow.io, "discover_items", counted)
    store = tmp_path / "nuclei.zarr"
    command = [
        "run", str(CONFIGS / "nuclei.yaml"),
        "--set", f"output.store={store}", "--set", f"cluster.address={dask_address}",
    ]  # fmt: skip

    result = runner.invoke(app, command)

    assert result.exit_code == 0, result.output
    assert "nuclei: 1 done" in result.stdout
    assert len(calls) == 1, calls

"""A store's versions through the command: history, tag, prune, export --as-of."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray
from typer.testing import CliRunner

import segflow
from segflow.flows.cli import app
from segflow.store.versions import current_version, list_versions

CONFIGS = Path(__file__).parents[2] / "configs"
runner = CliRunner()


def _flow_runs() -> dict[str, str]:
    """Flow run id -> name, of every flow run of the test's Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {str(r.id): r.name for r in client.read_flow_runs()}


@pytest.mark.usefixtures("prefect_harness")
def test_reruns_keep_versions_history_names_the_flow_runs_and_as_of_reads_the_old(
    tmp_path: Path, dask_address: str
) -> None:
    store = tmp_path / "nuclei.zarr"
    command = [
        "run", str(CONFIGS / "nuclei.yaml"),
        "--set", f"output.store={store}", "--set", f"cluster.address={dask_address}",
        "--set", "output.retention.keep_days=0",
    ]  # fmt: skip
    assert runner.invoke(app, command).exit_code == 0
    first = xarray.open_zarr(f"{store}/image")["labels"].values
    held = segflow.open_store(str(store))["image"]  # an analyst's open dataset
    before = set(_flow_runs())
    rerun = [*command, "--set", "pipeline.1.sigma=3.0", "--set", "output.overwrite=true"]
    assert runner.invoke(app, rerun).exit_code == 0, "rerun failed"
    (second_run,) = set(_flow_runs()) - before
    assert not np.array_equal(xarray.open_zarr(f"{store}/image")["labels"].values, first)
    np.testing.assert_array_equal(held["labels"].values, first)  # its version, unchanged

    history = runner.invoke(app, ["history", str(store)])

    assert history.exit_code == 0, history.output
    lines = history.stdout.splitlines()
    assert len(lines) == 2 and f"run {second_run} ({_flow_runs()[second_run]})" in lines[1]
    assert all("1 item(s)" in line for line in lines)
    first_run = lines[0].split("run ", 1)[1].split(" ", 1)[0]
    assert first_run in _flow_runs()
    # as_of reads the first version; the catalogue still shows the latest (documented).
    then = segflow.open_store(str(store), as_of=first_run)
    row = then.catalogue.set_index("id").loc["image"]
    assert row["version"] == current_version(str(store), "image")
    assert os.path.basename(then.item_path("image")) == list_versions(str(store), "image")[0]
    versions = runner.invoke(app, ["history", str(store), "image"]).stdout.splitlines()
    assert len(versions) == 2 and versions[1].endswith("(latest)")

    tagged = runner.invoke(app, ["tag", str(store), "night-1", "--as-of", first_run])
    assert tagged.exit_code == 0, tagged.output
    out = tmp_path / "old.tif"
    export = ["export", str(store), "--format", "cog", "--array", "labels", "--out", str(out)]
    assert runner.invoke(app, [*export, "--as-of", "night-1"]).exit_code == 0
    import rasterio

    with rasterio.open(out) as cog:
        np.testing.assert_array_equal(cog.read(1), first)  # bit for bit
    # A third run (keep_last 2 by default, keep_days 0 here) would prune the first
    # version, but the tag keeps it; untagged, prune removes it.
    assert runner.invoke(app, [*command, "--set", "output.overwrite=true"]).exit_code == 0
    assert len(list_versions(str(store), "image")) == 3
    dry = runner.invoke(app, ["prune", str(store), "--no-keep-tags", "--dry-run"])
    assert dry.exit_code == 0 and dry.stdout.count("would remove image ") == 1, dry.output
    assert len(list_versions(str(store), "image")) == 3
    done = runner.invoke(app, ["prune", str(store), "--no-keep-tags"])
    assert "1 old version(s) removed (keep_last 2, keep_days 0" in done.stdout, done.output
    assert len(list_versions(str(store), "image")) == 2
    assert current_version(str(store), "image") == list_versions(str(store), "image")[-1]
    missing = runner.invoke(app, [*export, "--as-of", "night-1"])
    assert missing.exit_code == 2
    assert "kept no version of any item committed by" in missing.output


def test_history_of_a_folder_that_is_no_store_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["history", str(tmp_path)])

    assert result.exit_code == 2
    line = f"'{tmp_path}' is not a segflow store (no segflow marker in its zarr.json)"
    assert result.output.strip() == line


def _files(folder: str) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (size, modification time in ns)."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(parent, name))
            found[os.path.relpath(os.path.join(parent, name), folder)] = (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return found


@pytest.mark.usefixtures("prefect_harness")
def test_a_committed_version_is_never_written_after_its_commit(
    tmp_path: Path, dask_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quick looks, consolidation, reruns, prune: nothing touches a committed version."""
    from segflow.store import versions
    from segflow.store.layout import consolidate_store
    from segflow.store.quicklook import QUICKLOOK_NAME

    committed: dict[str, dict[str, tuple[int, int]]] = {}
    publish = versions.publish_version

    def spy(store: str, staged: str, item_id: str, version: str) -> None:
        publish(store, staged, item_id, version)
        folder = os.path.join(versions.versions_dir(store, item_id), version)
        committed[folder] = _files(folder)  # the version as its commit left it

    monkeypatch.setattr(versions, "publish_version", spy)
    store = tmp_path / "nuclei.zarr"
    command = [
        "run", str(CONFIGS / "nuclei.yaml"),
        "--set", f"output.store={store}", "--set", f"cluster.address={dask_address}",
        "--set", "run.quicklooks=5", "--set", "run.quicklook_size=32",
    ]  # fmt: skip
    assert runner.invoke(app, command).exit_code == 0
    rerun = [*command, "--set", "pipeline.1.sigma=3.0", "--set", "output.overwrite=true"]
    assert runner.invoke(app, rerun).exit_code == 0
    nothing = runner.invoke(app, [*command, "--set", "pipeline.1.sigma=3.0"])
    assert nothing.exit_code == 0, nothing.output  # done already: nothing to do
    consolidate_store(str(store))
    assert runner.invoke(app, ["prune", str(store), "--keep-last", "2"]).exit_code == 0

    assert len(committed) == 2, committed
    for folder, files in committed.items():
        assert QUICKLOOK_NAME in files, f"{folder}: no quick look in the committed version"
        assert _files(folder) == files, f"{folder} changed after its commit"
    assert (store / "image" / QUICKLOOK_NAME).is_file()  # the latest version's, via the link


def _committed_store(tmp_path: Path) -> Path:
    """A store with one committed item, ``tile``."""
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader

    store = tmp_path / "out.zarr"
    image = (np.random.default_rng(0).random((32, 32)) > 0.6).astype(np.float32)
    with LocalExecutor(1) as executor:
        result = segment_item(ArrayReader(image, "tile"), [{"op": "threshold", "value": 0.5},
                              {"op": "label"}], store=str(store), block_shape=16,
                              executor=executor)  # fmt: skip
    assert result.status == "done", result.error
    return store


def _set_format(node_file: Path, key: str, **values: Any) -> None:
    import json

    node = json.loads(node_file.read_text())
    node["attributes"][key] = {**node["attributes"][key], **values}
    node_file.write_text(json.dumps(node))


def test_a_store_a_newer_segflow_wrote_is_refused_in_one_line_and_never_modified(
    tmp_path: Path,
) -> None:
    from segflow.store.commit import STORE_FORMAT, StoreFormatError

    store = _committed_store(tmp_path)
    _set_format(store / "zarr.json", "segflow", format=STORE_FORMAT + 1, written_by="9.1.0")
    before = _files(str(store))
    line = (
        f"{store} was written by segflow 9.1.0 (store format {STORE_FORMAT + 1}); this is "
        f"segflow {segflow.__version__} (format {STORE_FORMAT}): upgrade segflow"
    )

    with pytest.raises(StoreFormatError) as refused:
        segflow.open_store(str(store))
    assert str(refused.value) == line
    cog = str(tmp_path / "x.tif")
    for command in (
        ["history", str(store)],
        ["history", str(store), "tile"],
        ["tag", str(store), "night"],
        ["prune", str(store)],
        ["export", str(store), "--format", "cog", "--array", "labels", "--out", cog],
    ):
        result = runner.invoke(app, command)
        assert (result.exit_code, result.output.strip()) == (2, line), command
    run = runner.invoke(
        app, ["run", str(CONFIGS / "nuclei.yaml"), "--set", f"output.store={store}"]
    )
    assert run.exit_code == 2 and line in run.output, run.output
    assert _files(str(store)) == before
    assert not (tmp_path / "x.tif").exists()


def test_an_item_a_newer_segflow_committed_is_refused_and_never_replaced(
    tmp_path: Path,
) -> None:
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader
    from segflow.store.commit import COMMIT_ATTR, STORE_FORMAT, StoreFormatError

    store = _committed_store(tmp_path)
    version = Path(os.path.realpath(store / "tile"))
    _set_format(version / "zarr.json", COMMIT_ATTR, format=STORE_FORMAT + 1, written_by="9.1.0")
    before = _files(str(store))

    newer = r"^item '.*' of .*/tile was written by segflow 9\.1\.0 \(store format"
    with pytest.raises(StoreFormatError, match=newer):
        segflow.open_store(str(store))["tile"]
    with LocalExecutor(1) as executor:
        result = segment_item(ArrayReader(np.ones((8, 8)), "tile"), [{"op": "otsu"}],
                              store=str(store), block_shape=8, executor=executor)  # fmt: skip
    assert result.status == "failed" and "upgrade segflow" in str(result.error)
    assert _files(str(store)) == before


def test_an_older_store_format_is_moved_up_by_the_next_run(tmp_path: Path) -> None:
    import json

    from segflow.store.commit import STORE_FORMAT, prepare_store
    from segflow.store.metadata import LAYOUT, LAYOUT_KEY

    store = _committed_store(tmp_path)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["segflow"] = {"format": 1, LAYOUT_KEY: LAYOUT}  # before versions
    (store / "zarr.json").write_text(json.dumps(root))

    prepare_store(str(store))

    marker = json.loads((store / "zarr.json").read_text())["attributes"]["segflow"]
    assert marker == {"format": STORE_FORMAT, LAYOUT_KEY: LAYOUT,
                      "written_by": segflow.__version__}  # fmt: skip
    assert segflow.open_store(str(store))["tile"]["labels"].shape == (32, 32)

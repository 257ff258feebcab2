"""A store's versions through the command: history, tag, prune, export --as-of."""

from __future__ import annotations

import os
from pathlib import Path

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

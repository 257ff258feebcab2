"""The bad-input catalogue: every input a user can get wrong gets one clear line.

Item-level faults (damaged, empty or unfit files) fail alone: the run exits 1, names the
item and what is wrong, and every other item completes. Collection-level faults (missing
input, a store path that is a file or someone else's folder, shape settings that do not
fit) exit 2 before anything runs. An occupied store exits 1 naming the run that holds it.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from _geodata import N_BLOBS, blob_image, lock_held_elsewhere, write_geotiff
from affine import Affine
from PIL import Image
from typer.testing import CliRunner

from segflow.flows.cli import app
from segflow.store import read_index

runner = CliRunner()

# Item-level faults: file name -> what its line must say.
ITEM_FAULTS = {
    "zero_byte.tif": "the file is empty (0 bytes)",
    "zero_byte.png": "the file is empty (0 bytes)",
    "zero_byte.nii.gz": "the file is empty (0 bytes)",
    "text_named.tif": "not a readable GeoTIFF/TIFF (TiffFileError: not a TIFF file",
    "truncated.tif": "the file is damaged or cut short",
    "truncated.png": "cannot decode PNG data (OSError: image file is truncated)",
    "truncated.nii.gz": "the compressed data is cut short (a truncated file)",
    "header_zeroed.nii": "its header is not NIfTI (sizeof_hdr is 0, expected 348 or 540)",
    "no_metadata.zarr": "not a readable Zarr array",
    "no_pixels.tif": "the image has no pixels (shape (0, 5))",
    "all_nan.tif": "pipeline[0].otsu: the item has no values (every pixel is NaN",
    "all_inf.tif": "pipeline[0].otsu: the item has infinite values",
    "three_bands.tif": "'otsu' needs a single-channel image, got 3 channels",
    # Two planes read as a 2-slice z-stack: the 2-D blocks do not fit it, the others run.
    "two_planes.tif": "PlanError: `blocks.shape` (32, 32) has 2 axes, the item has 3",
    # Headers that declare more than the file holds or than a run can take: refused from
    # their metadata, before anything is planned or read (each took the machine down).
    "liar.nii": "its NIfTI header declares 30000 x 30000 x 30000 int16 voxels (49.1 TiB), but "
    "the file of 476 B holds 124 B of voxel data",
    "liar_gz.nii.gz": "voxels (49.1 TiB), but the file of 54 B can hold at most 54.4 KiB of",
    "huge_sparse.tif": "its metadata declares 3 x 200000 x 200000 uint8, 111.8 GiB of input, "
    "more than run.max_item_bytes (64.0 GiB)",
    "many_blocks.tif": "60000 x 60000 uint8 in 3,515,625 blocks of 32x32 would take "
    "about 536.4 GiB of this command's memory (160.0 KiB a block)",
}
# Odd but valid inputs: segmented like any other.
ACCEPTED = ("good", "constant", "one_pixel", "one_row", "no_crs", "lonlat", "mostly_nan")


def _write_collection(folder: Path) -> None:
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    good = (folder / "good.tif").read_bytes()
    (folder / "zero_byte.tif").write_bytes(b"")
    (folder / "zero_byte.png").write_bytes(b"")
    (folder / "zero_byte.nii.gz").write_bytes(b"")
    (folder / "text_named.tif").write_text("this is not a TIFF")
    (folder / "truncated.tif").write_bytes(good[: len(good) // 2])
    Image.fromarray(blob_image()[0]).save(folder / "whole.png")
    png = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    volume = nib.Nifti1Image(np.arange(512, dtype=np.int16).reshape(8, 8, 8), np.eye(4))
    nib.save(volume, folder / "whole.nii.gz")
    packed = (folder / "whole.nii.gz").read_bytes()
    (folder / "whole.nii.gz").unlink()
    (folder / "truncated.nii.gz").write_bytes(packed[: len(packed) // 2])
    nib.save(volume, folder / "whole.nii")
    header = bytearray((folder / "whole.nii").read_bytes())
    (folder / "whole.nii").unlink()
    header[:348] = bytes(348)
    (folder / "header_zeroed.nii").write_bytes(bytes(header))
    zarr.create_array(str(folder / "no_metadata.zarr"), shape=(4, 4), dtype="uint8")
    (folder / "no_metadata.zarr" / "zarr.json").unlink()
    with pytest.warns(UserWarning, match="zero-size array"):
        tifffile.imwrite(folder / "no_pixels.tif", np.zeros((0, 5), np.uint8))
    tifffile.imwrite(folder / "all_nan.tif", np.full((16, 16), np.nan, np.float32))
    tifffile.imwrite(folder / "all_inf.tif", np.full((16, 16), np.inf, np.float32))
    write_geotiff(folder / "three_bands.tif", blob_image(bands=3))
    _write_liars(folder)
    tifffile.imwrite(folder / "two_planes.tif", np.stack([blob_image()[0]] * 2))
    tifffile.imwrite(folder / "constant.tif", np.full((16, 16), 7, np.uint8))
    mostly_nan = np.full((16, 16), np.nan, np.float32)
    mostly_nan[::4] = np.linspace(0, 1, 16, dtype=np.float32)  # 4 rows of 16 have values
    tifffile.imwrite(folder / "mostly_nan.tif", mostly_nan)
    tifffile.imwrite(folder / "one_pixel.tif", np.ones((1, 1), np.uint8))
    tifffile.imwrite(folder / "one_row.tif", np.arange(20, dtype=np.uint8)[np.newaxis])
    profile = {"driver": "GTiff", "height": 64, "width": 72, "count": 1, "dtype": "uint8"}
    with (
        pytest.warns(rasterio.errors.NotGeoreferencedWarning),
        rasterio.open(folder / "no_crs.tif", "w", **profile) as dst,
    ):
        dst.write(blob_image())
    with rasterio.open(  # a collection may mix CRSs: each item keeps its own
        folder / "lonlat.tif",
        "w",
        **profile,
        crs="EPSG:4326",
        transform=Affine(0.001, 0, 10.0, 0, -0.001, 50.0),
    ) as dst:
        dst.write(blob_image())


def _write_liars(folder: Path) -> None:
    """Files whose headers declare far more than they hold (NIfTI), or than a run takes
    (sparse GeoTIFFs of a few hundred kB: every tile left out reads as zero)."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    data = header.binaryblock + bytes(4 + 124)  # extension flag, then 124 bytes of voxels
    (folder / "liar.nii").write_bytes(data)
    (folder / "liar_gz.nii.gz").write_bytes(gzip.compress(data, mtime=0))
    for name, side, bands in (("huge_sparse.tif", 200_000, 3), ("many_blocks.tif", 60_000, 1)):
        profile = {"driver": "GTiff", "width": side, "height": side, "count": bands}
        with (
            pytest.warns(rasterio.errors.NotGeoreferencedWarning),
            rasterio.open(
                folder / name, "w", **profile, dtype="uint8", tiled=True, blockxsize=1024,
                blockysize=1024, compress="deflate", sparse_ok=True, BIGTIFF="YES",
            ),
        ):  # fmt: skip
            pass


def _config(tmp_path: Path, folder: Path, dask_address: str, **output: object) -> Path:
    path = tmp_path / "bad.yaml"
    extra = "".join(f", {k}: {v}" for k, v in output.items())
    path.write_text(
        "name: bad\n"
        f"input: {{path: {folder}}}\n"
        f"output: {{store: {tmp_path / 'out.zarr'}{extra}}}\n"
        "blocks: {shape: [32, 32]}\n"
        "pipeline: [{op: otsu}, {op: label}]\n"
        f"cluster: {{address: '{dask_address}'}}\n"
    )
    return path


@pytest.mark.usefixtures("prefect_harness")
def test_every_bad_item_fails_alone_with_one_line(tmp_path: Path, dask_address: str) -> None:
    folder = tmp_path / "items"
    _write_collection(folder)

    result = runner.invoke(app, ["run", str(_config(tmp_path, folder, dask_address))])

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    failed_lines = [line for line in result.stdout.splitlines() if "failed item" in line]
    for name, message in ITEM_FAULTS.items():
        lines = [line for line in failed_lines if name in line]
        assert len(lines) == 1 and message in lines[0], (name, failed_lines)
    frame = read_index(str(tmp_path / "out.zarr")).set_index("id")
    assert sorted(frame.index[frame["status"] == "done"]) == sorted(ACCEPTED)
    assert int(frame.loc["good", "object_count"]) == N_BLOBS
    # Done, and the terminal says how little of it the threshold saw.
    assert (
        "item mostly_nan: done, pipeline[0].otsu: 75.0% of the item is NaN where this step "
        "takes its statistic"
    ) in result.output
    assert frame.loc["mostly_nan", "warning"].startswith("pipeline[0].otsu: 75.0% of the item")
    assert (frame["status"] == "failed").sum() == len(ITEM_FAULTS)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["input.path=/no/such/folder"], "input.path: collection '/no/such/folder': no such"),
        (["output.chunks=[16,16,16]"], "output.chunks [16, 16, 16]: item 'good' ("),
        (["blocks.shape=[32,32,32]"], "blocks.shape [32, 32, 32]: item 'good' ("),
        (["output.chunks=[0,16]"], "output.chunks: every axis must be >= 1 (got [0, 16])"),
        (["blocks.shape=[-4,32]"], "blocks.shape: every axis must be >= 1"),
        (
            ["output.chunks=[16,16]", "output.shards=[24,32]"],
            "`shards` [24, 32] must be a multiple of `chunks` [16, 16] on every axis",
        ),
    ],
)
def test_config_level_faults_exit_2_before_running(
    tmp_path: Path, dask_address: str, setting: list[str], message: str
) -> None:
    folder = tmp_path / "items"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    config = _config(tmp_path, folder, dask_address)

    result = runner.invoke(app, ["run", str(config), *[f"--set={s}" for s in setting]])

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out.zarr").exists()


def test_store_paths_segflow_must_not_touch_exit_2(tmp_path: Path, dask_address: str) -> None:
    folder = tmp_path / "items"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    config = _config(tmp_path, folder, dask_address)
    (tmp_path / "a_file.zarr").write_text("x")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "good").mkdir()
    (foreign / "good" / "holiday.jpg").write_bytes(b"mine")

    as_file = runner.invoke(app, ["run", str(config), f"--set=output.store={tmp_path}/a_file.zarr"])
    adopted = runner.invoke(app, ["run", str(config), f"--set=output.store={foreign}"])

    assert as_file.exit_code == 2 and "is a file, not a folder" in as_file.stderr
    assert adopted.exit_code == 2
    assert "exists and is not a segflow store" in adopted.stderr
    assert (foreign / "good" / "holiday.jpg").read_bytes() == b"mine"
    assert sorted(p.name for p in foreign.rglob("*")) == ["good", "holiday.jpg"]


@pytest.mark.usefixtures("prefect_harness")
def test_occupied_and_unwritable_stores_fail_with_one_line(
    tmp_path: Path, dask_address: str
) -> None:
    folder = tmp_path / "items"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    config = _config(tmp_path, folder, dask_address)
    store = tmp_path / "out.zarr"
    with lock_held_elsewhere(store, "backfill-7"):
        occupied = runner.invoke(app, ["run", str(config), "--set=run.queue_timeout=1"])
    unwritable = runner.invoke(app, ["run", str(config), "--set=output.store=/proc/out.zarr"])

    assert occupied.exit_code == 1
    assert "waiting (at most 1 s, run.queue_timeout): store" in occupied.stderr
    assert "gave up after 1 s: store" in occupied.stderr
    assert "is in use by another segflow run (run backfill-7 of" in occupied.stderr
    assert unwritable.exit_code == 1, unwritable.output
    assert "Traceback" not in unwritable.output
    assert "/proc/out.zarr" in unwritable.output


def test_relative_set_paths_are_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segflow.config import load_config

    config = tmp_path / "conf" / "c.yaml"
    config.parent.mkdir()
    config.write_text("input: {path: in}\noutput: {store: out.zarr}\npipeline: [{op: otsu}]\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    from_file = load_config(config)
    typed = load_config(config, ["output.store=mine.zarr", "input.path=data/*.tif"])

    assert from_file.output.store == str(tmp_path / "conf" / "out.zarr")
    assert typed.output.store == os.path.join(work, "mine.zarr")
    assert typed.input.path == os.path.join(work, "data/*.tif")


def test_headers_that_lie_fail_alone_in_seconds_within_1_gb(
    tmp_path: Path, dask_address: str, prefect_harness: None
) -> None:
    """The command's own process, sampled while it runs: the lying files fail from their
    metadata and the good item completes, far below the memory they declare."""
    import subprocess
    import sys
    import time

    import psutil
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path / "items"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    _write_liars(folder)
    config = _config(tmp_path, folder, dask_address)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "200"}
    command = [sys.executable, "-m", "segflow.flows", "run", str(config)]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    output = process.communicate(timeout=120)[0].decode()

    assert process.returncode == 1, output
    assert time.monotonic() - started < 90  # seconds, not the minutes the machine took
    assert peak < 2**30, f"{peak / 2**20:.0f} MiB"
    assert not (tmp_path / "out.zarr" / ".segflow" / "lock.json").exists()  # released
    frame = read_index(str(tmp_path / "out.zarr")).set_index("id")["status"].to_dict()
    assert frame == {
        "good": "done",
        "liar": "failed",
        "liar_gz": "failed",
        "huge_sparse": "failed",
        "many_blocks": "failed",
    }


@pytest.mark.usefixtures("prefect_harness")
def test_a_damaged_tiff_reads_once_and_plainly(tmp_path: Path, dask_address: str) -> None:
    """The reader's error crosses the Dask worker as itself (not wrapped in ``Exception``
    by a cause that does not pickle) and each failed item prints one line."""
    folder = tmp_path / "items"
    folder.mkdir()
    write_geotiff(folder / "good.tif", blob_image())
    good = (folder / "good.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(good[: len(good) // 2])
    (folder / "zero.tif").write_bytes(b"")

    result = runner.invoke(app, ["run", str(_config(tmp_path, folder, dask_address))])

    assert result.exit_code == 1, result.output
    truncated = folder / "truncated.tif"
    frame = read_index(str(tmp_path / "out.zarr")).set_index("id")
    assert re.fullmatch(
        rf"item 'truncated' \({re.escape(str(truncated))}\): cannot read window Window\(.*\); "
        r"the file is damaged or cut short \(RasterioIOError: .*\)",
        frame.loc["truncated", "error"],
    )
    # While it runs, one line per failed item (its error); then the summary's line.
    for name in ("truncated", "zero"):
        named = re.compile(rf"item '({name}|{re.escape(str(folder / name))}\.tif)'")
        lines = [line for line in result.output.splitlines() if named.search(line)]
        assert len(lines) == 2, (name, result.output)
        assert "failed item" in lines[1]
        assert lines[0].split(" - ", 1)[1] == lines[1].split("failed ", 1)[1]
    assert "Exception: " not in result.output and "Task run failed" not in result.output
    assert not [line for line in result.output.splitlines() if line.endswith(": failed")]

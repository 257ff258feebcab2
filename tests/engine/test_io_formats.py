"""NRRD and OME-TIFF inputs, pictures told apart by content, and the reader registry."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import nrrd
import numpy as np
import pytest
import tifffile

from segflow.errors import ItemReadError
from segflow.io import (
    ArrayReader,
    ReaderBackend,
    backend_for,
    describe_formats,
    discover_items,
    open_item,
    register_reader,
    registry,
)

ROOT = Path(__file__).resolve().parents[2]
CT = ROOT / "tests" / "data" / "ct" / "STS_002" / "CT_image.nii.gz"


def test_nrrd_in_lps_reads_as_its_nifti_volume(tmp_path: Path) -> None:
    nifti = open_item(str(CT))
    volume = nifti.read(tuple(slice(0, n) for n in nifti.info.spatial_shape))[0]
    ras = np.asarray(nifti.info.affine)
    lps = np.diag([-1.0, -1.0, 1.0]) @ ras[:3]  # the same voxels in NRRD's usual LPS space
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:, :3].T,  # one row per file axis (x, y, z)
        "space origin": lps[:, 3],
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(tmp_path / "ct.nrrd"), volume.astype(np.int16), header, index_order="C")

    reader = open_item(str(tmp_path / "ct.nrrd"))

    assert reader.info.format == "nrrd" and reader.info.shape == nifti.info.shape
    np.testing.assert_allclose(reader.info.affine, nifti.info.affine, atol=1e-5)
    np.testing.assert_allclose(reader.info.spacing, nifti.info.spacing, atol=1e-6)
    np.testing.assert_allclose(reader.info.origin, nifti.info.origin, atol=1e-5)
    assert reader.info.units == "mm" and reader.info.attrs["orientation"] == "LPS"
    window = reader.read((slice(3, 5), slice(10, 20), slice(0, 7)))
    np.testing.assert_array_equal(window[0], volume[3:5, 10:20, 0:7].astype(np.int16))


def test_nrrd_vector_axis_is_the_channel_axis(tmp_path: Path) -> None:
    data = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3)  # z y x rgb (C order)
    header = {
        "kinds": ["vector", "domain", "domain", "domain"],
        "spacings": [np.nan, 0.5, 0.5, 2.0],
    }
    nrrd.write(str(tmp_path / "rgb.nrrd"), data, header, index_order="C")

    reader = open_item(str(tmp_path / "rgb.nrrd"))

    assert reader.info.axes == ("c", "z", "y", "x") and reader.info.shape == (3, 2, 5, 6)
    assert reader.info.spacing == (2.0, 0.5, 0.5)
    np.testing.assert_array_equal(
        reader.read((slice(0, 2), slice(0, 5), slice(0, 6))), np.moveaxis(data, -1, 0)
    )


def _write_ome(path: Path, data: np.ndarray) -> None:
    metadata = {
        "axes": "CZYX",
        "PhysicalSizeX": 0.325,
        "PhysicalSizeY": 0.325,
        "PhysicalSizeZ": 1.5,
        "Channel": {"Name": ["DAPI", "GFP"]},
    }
    with tifffile.TiffWriter(path, ome=True) as tiff:
        tiff.write(data, subifds=1, metadata=metadata, tile=(32, 32))
        tiff.write(data[:, :, ::2, ::2], subfiletype=1, tile=(32, 32))


def test_ome_tiff_physical_sizes_channel_names_and_levels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, size=(2, 4, 96, 128), dtype=np.uint16)
    _write_ome(tmp_path / "cells.ome.tif", data)

    readers, failures = discover_items(str(tmp_path))
    (reader,) = readers

    assert failures == [] and reader.info.format == "ome-tiff" and reader.info.id == "cells"
    assert reader.info.axes == ("c", "z", "y", "x") and reader.info.shape == (2, 4, 96, 128)
    assert reader.info.spacing == (1.5, 0.325, 0.325) and reader.info.units == "um"
    assert reader.info.attrs["channel_names"] == ["DAPI", "GFP"]
    region = (slice(1, 3), slice(40, 72), slice(5, 70))
    np.testing.assert_array_equal(reader.read(region), data[:, 1:3, 40:72, 5:70])
    again = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(again.read(region), data[:, 1:3, 40:72, 5:70])

    half = open_item(str(tmp_path / "cells.ome.tif"), level=1)
    assert half.info.shape == (2, 4, 48, 64)
    assert half.info.spacing == (1.5, 0.65, 0.65) and half.info.origin == (0.0, 0.1625, 0.1625)
    np.testing.assert_array_equal(
        half.read((slice(0, 4), slice(0, 48), slice(0, 64))), data[:, :, ::2, ::2]
    )
    with pytest.raises(
        ItemReadError, match=r"`level` 2 does not exist; the file has levels 0\.\.1"
    ):
        open_item(str(tmp_path / "cells.ome.tif"), level=2)


def test_a_plain_tiff_is_no_ome_tiff(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8))
    assert open_item(str(tmp_path / "plain.tif")).info.format == "tiff"
    with pytest.raises(ItemReadError, match="the tiff reader takes no option"):
        open_item(str(tmp_path / "plain.tif"), level=1)


def test_a_picture_is_read_by_its_content_not_its_name(tmp_path: Path) -> None:
    image = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
    (tmp_path / "photo.png").write_bytes(iio.imwrite("<bytes>", image, extension=".jpg"))

    reader = open_item(str(tmp_path / "photo.png"))

    assert reader.info.format == "jpeg" and reader.info.shape == (48, 64)
    assert np.abs(reader.read((slice(0, 48), slice(0, 64)))[0].astype(int) - image).max() < 8


def test_every_format_is_listed_once_with_what_it_keeps() -> None:
    rows = describe_formats()
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names))
    assert {"zarr", "nifti", "nrrd", "dicom", "geotiff", "ome-tiff", "tiff", "picture"} <= set(
        names
    )
    assert all(row["description"] and row["metadata"] for row in rows)


class _NpyBackend(ReaderBackend):
    name = "npy-test"
    description = "a .npy array (test reader)"
    suffixes = (".npy",)
    metadata = "none"

    def open(self, path: str, item_id: str | None = None, **options: Any) -> ArrayReader:
        stem = Path(path).name[: -len(".npy")]
        return ArrayReader(np.load(path), item_id or stem)


def test_a_registered_reader_joins_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_BACKENDS", list(registry.backends()))  # undone after
    np.save(tmp_path / "a.npy", np.ones((5, 6), np.float32))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((5, 6), np.uint8))
    with pytest.raises(ItemReadError, match="no items found"):
        discover_items(str(tmp_path / "*.npy"))

    register_reader(_NpyBackend)
    readers, failures = discover_items(str(tmp_path))

    assert failures == [] and sorted(r.info.id for r in readers) == ["a", "b"]
    assert backend_for(str(tmp_path / "a.npy")).name == "npy-test"  # type: ignore[union-attr]


def test_readers_from_entry_points_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    class _Entry:
        def load(self) -> type[ReaderBackend]:
            return _NpyBackend

    monkeypatch.setattr(registry, "_BACKENDS", list(registry.backends()))
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group: [_Entry()] if group == "segflow.readers" else [],
    )
    registry._load_entry_points.cache_clear()
    try:
        assert registry.backends()[0].name == "npy-test"
    finally:
        registry._load_entry_points.cache_clear()


def test_a_geotiff_over_http_is_read_in_ranges_never_whole(tmp_path: Path) -> None:
    """A tiled GeoTIFF on a web server that answers range requests (as object stores and
    COG hosts do): discovery by URL, a window equal to the local file's, and no request
    for the whole file (every GET of it is a 206 partial response)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import rasterio
    from affine import Affine

    pytest.importorskip("RangeHTTPServer", reason="rangehttpserver (a dev dependency)")
    rng = np.random.default_rng(4)
    data = rng.integers(0, 4000, size=(2, 1024, 1024), dtype=np.uint16)
    profile = {
        "driver": "GTiff", "width": 1024, "height": 1024, "count": 2, "dtype": "uint16",
        "crs": "EPSG:32633", "transform": Affine(10, 0, 500_000, 0, -10, 6_000_000),
        "tiled": True, "blockxsize": 256, "blockysize": 256,
    }  # fmt: skip
    with rasterio.open(tmp_path / "cog.tif", "w", **profile) as out:
        out.write(data)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "server.log"
    with open(log, "w") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "RangeHTTPServer", str(port), "--bind", "127.0.0.1"],
            cwd=tmp_path,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/cog.tif"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        (reader,), failures = discover_items(url)
        assert failures == [] and reader.info.format == "geotiff"
        assert reader.info.shape == (2, 1024, 1024) and reader.info.units == "m"
        window = reader.read((slice(300, 400), slice(600, 700)))
        np.testing.assert_array_equal(window, data[:, 300:400, 600:700])
    finally:
        server.terminate()
        server.wait(timeout=30)
    requests = [line for line in log.read_text().splitlines() if "/cog.tif" in line]
    assert any('"GET /cog.tif HTTP/1.1" 206' in line for line in requests), requests
    assert not any('"GET /cog.tif HTTP/1.1" 200' in line for line in requests), requests


def test_a_tiff_without_axis_metadata_takes_its_axes_from_input_options(tmp_path: Path) -> None:
    """Two stains saved as a bare (2, y, x) TIFF read as two z slices unless the config
    says what the first dimension is."""
    stains = np.stack([np.full((20, 30), 7, np.uint16), np.full((20, 30), 9, np.uint16)])
    tifffile.imwrite(tmp_path / "stains.tif", stains, metadata=None)

    assert open_item(str(tmp_path / "stains.tif")).info.axes == ("z", "y", "x")
    readers, failures = discover_items(str(tmp_path), axes="cyx")

    (reader,) = readers
    assert failures == [] and reader.info.axes == ("c", "y", "x")
    assert reader.info.shape == (2, 20, 30)
    np.testing.assert_array_equal(reader.read((slice(0, 20), slice(0, 30))), stains)
    with pytest.raises(ItemReadError, match=r"`input.options.axes` 'cxy' does not fit"):
        open_item(str(tmp_path / "stains.tif"), axes="cxy")
    with pytest.raises(ItemReadError, match=r"does not fit the image's 3 dimensions"):
        open_item(str(tmp_path / "stains.tif"), axes="yx")

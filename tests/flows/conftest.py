"""Fixtures of the flow tests: one real Dask cluster and a small GeoTIFF collection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _geodata import blob_image, write_geotiff


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """Two good single-band tiles, a 3-band tile the pipeline rejects, and a corrupt file."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "tile_a.tif", blob_image())
    write_geotiff(folder / "tile_b.tif", blob_image(), x0=500_720.0)
    write_geotiff(folder / "rgb.tif", blob_image(bands=3))
    (folder / "broken.tif").write_bytes(b"this is not a TIFF file")
    return folder


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    """One small process-based Dask cluster for every flow test of the session."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address

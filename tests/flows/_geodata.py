"""Small real GeoTIFF collections for the flow tests (written with rasterio)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

# Three separate blobs (value 200 on 10): threshold 100 + label gives exactly 3 objects.
BLOBS = (
    (slice(4, 14), slice(5, 20)),
    (slice(30, 50), slice(40, 47)),
    (slice(52, 60), slice(2, 70)),
)
N_BLOBS = len(BLOBS)


def write_geotiff(path: Path, image: np.ndarray, *, x0: float = 500_000.0) -> Path:
    """A GeoTIFF (UTM 33N, 10 m pixels) of ``image`` shaped ``(bands, y, x)``."""
    bands, height, width = image.shape
    transform = Affine(10.0, 0.0, x0, 0.0, -10.0, 4_000_000.0)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": bands}
    with rasterio.open(
        path, "w", **profile, dtype=image.dtype, crs="EPSG:32633", transform=transform
    ) as dst:
        dst.write(image)
    return path


def blob_image(bands: int = 1, shape: tuple[int, int] = (64, 72)) -> np.ndarray:
    image = np.full((bands, *shape), 10, dtype=np.uint8)
    for region in BLOBS:
        image[(slice(None), *region)] = 200
    return image


def collection_config(folder: Path, store: Path, address: str) -> dict[str, object]:
    return {
        "name": "tiles",
        "input": {"path": str(folder)},
        "output": {"store": str(store), "chunks": [32, 32]},
        "blocks": {"shape": [32, 32]},
        "pipeline": [{"op": "threshold", "value": 100}, {"op": "label"}],
        "cluster": {"address": address},
    }


@contextmanager
def lock_held_elsewhere(store: Path, run_id: str) -> Iterator[None]:
    """The store's lock held by another live process (as a run holds it while writing)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\n"
         "from segflow.store.lock import hold_store_lock\n"
         f"with hold_store_lock({str(store)!r}, run_id={run_id!r}):\n"
         "    print('held', flush=True); time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.communicate()

"""The benchmarks' synthetic input: smooth blobs plus noise, written as a Zarr array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage as ndi


def write_blobs(path: Path, size: int, chunk: int, *, blob: int = 64) -> None:
    """A ``size``^2 float32 array of blobs about ``blob`` pixels across plus noise, values in
    [0, ~1.8], written a band of rows at a time (never whole in memory twice)."""
    array = zarr.create_array(str(path), shape=(size, size), chunks=(chunk, chunk), dtype="float32")
    rng = np.random.default_rng(0)
    coarse = ndi.zoom(rng.random((size // blob + 2, size // blob + 2)), blob, order=1)
    for i in range(0, size, chunk):
        rows = slice(i, min(i + chunk, size))
        noise = rng.random((rows.stop - rows.start, size), dtype=np.float32)
        array[rows, :] = (coarse[rows, :size] + 0.8 * noise).astype(np.float32)

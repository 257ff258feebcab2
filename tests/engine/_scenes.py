"""Scenes cut from one raster: the raster, and a run of one item through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from _layouts import smooth_noise

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item

# Otsu over the scene (a global statistic), morphology whose halo crosses tile borders,
# and labels stitched across blocks: every kind of phase a scene must keep exact.
PIPELINE: list[dict[str, Any]] = [
    {"op": "mask_nodata"},
    {"op": "combine_bands", "weights": [0.5, 0.3, 0.2]},
    {"op": "otsu"},
    {"op": "binary_closing", "radius": 1},
    {"op": "label"},
]


def make_raster(shape: tuple[int, int], dtype: str, seed: int) -> np.ndarray:
    """Three bands of blobs, never 0 (0 is the nodata value of these tests)."""
    top = 250 if dtype == "uint8" else 60_000
    bands = [smooth_noise(shape, seed + b, sigma=2.0) for b in range(3)]
    scaled = [(b - b.min()) / max(float(np.ptp(b)), 1e-6) * (top - 1) + 1 for b in bands]
    return np.stack(scaled).astype(dtype)


def run(reader: Any, store: Path, block: Any, pipeline: Any = None) -> np.ndarray:
    """The item's output array (labels, classes) after a run of ``pipeline``."""
    with LocalExecutor(1) as executor:
        result = segment_item(reader, pipeline or PIPELINE, store=str(store),
                              block_shape=block, executor=executor, ome=False)  # fmt: skip
    assert result.status == "done", result.error
    group = zarr.open_group(store, mode="r")[reader.info.id]
    (name,) = [n for n in ("labels", "classes") if n in group]
    return np.asarray(group[name][...])

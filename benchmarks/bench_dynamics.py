"""Cellpose flow dynamics on a synthetic flow field: segflow against cellpose's compute_masks.

The input is a ``(3, size, size)`` float32 Zarr array ``(dY, dX, cellprob)`` (256^2 chunks):
many touching objects (a jittered grid of centres every 16 pixels, each pixel taken by its
nearest centre within 10 pixels), flows 5 x the unit vector to the object's centre, cellprob
+3 inside and -3 outside. Both sides start from the same Zarr array:

* segflow: ``segment_item`` with ``flow_dynamics`` (``flow_threshold`` 0, ``min_size`` 0,
  ``max_travel`` 48) on a 2-worker ``distributed.LocalCluster`` (started beforehand), Zarr to
  Zarr, blocks of ``--block`` pixels;
* cellpose: read the whole array, ``cellpose.dynamics.compute_masks(dP, cellprob,
  flow_threshold=0, min_size=-1)`` in memory on the CPU (torch's own threads: both cores).

The two results must be the same partition (checked). Importing cellpose needs torchvision at
module level; where torchvision does not import (its PyPI wheels fail against the CPU torch),
a stand-in whose every function raises is put in ``sys.modules`` (the mask computation never
calls torchvision), as in tests/engine/test_flow_dynamics.py.

The last line printed is one JSON object. Run: ``nice python benchmarks/bench_dynamics.py``
(``--size 1024`` for a quicker run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage as ndi

PIPELINE = [{"op": "flow_dynamics", "min_size": 0, "max_travel": 48}]
SPACING, RADIUS = 16, 10


def write_flows(path: Path, size: int, chunk: int) -> None:
    """The synthetic flow field, written a band of rows at a time."""
    rng = np.random.default_rng(0)
    grid = np.arange(SPACING // 2, size, SPACING)
    cy, cx = np.meshgrid(grid, grid, indexing="ij")
    cy = np.clip(cy + rng.integers(-4, 5, cy.shape), 0, size - 1).ravel()
    cx = np.clip(cx + rng.integers(-4, 5, cx.shape), 0, size - 1).ravel()
    seeds = np.ones((size, size), dtype=bool)
    seeds[cy, cx] = False
    distance, (ny, nx) = ndi.distance_transform_edt(seeds, return_indices=True)
    array = zarr.create_array(
        str(path),
        shape=(3, size, size),
        chunks=(3, chunk, chunk),
        dtype="float32",
        dimension_names=("c", "y", "x"),
    )
    for i in range(0, size, chunk):
        rows = slice(i, min(i + chunk, size))
        yy, xx = np.mgrid[rows, :size].astype(np.float64)
        dy, dx = ny[rows] - yy, nx[rows] - xx
        inside = distance[rows] <= RADIUS
        norm = np.hypot(dy, dx) + 1e-3
        prob = np.where(inside, 3.0, -3.0)
        block = np.stack([5 * dy / norm * inside, 5 * dx / norm * inside, prob])
        array[:, rows, :] = block.astype(np.float32)


def import_cellpose() -> Any:
    """``cellpose.dynamics``, with the tests' torchvision stand-in while it imports
    (tests/engine/_cellpose.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
    from _cellpose import import_cellpose as _import

    return _import()


def run_cellpose(source: Path) -> tuple[float, np.ndarray]:
    import torch

    dynamics = import_cellpose()
    started = time.perf_counter()
    image = zarr.open_array(str(source), mode="r")[...]
    masks = dynamics.compute_masks(
        image[:2], image[2], flow_threshold=0, min_size=-1, device=torch.device("cpu")
    )
    return time.perf_counter() - started, masks


def run_segflow(client: Any, source: Path, store: Path, block: int) -> tuple[float, int]:
    from segflow.engine.executor import DaskExecutor
    from segflow.engine.item import segment_item
    from segflow.io.zarr import ZarrReader

    started = time.perf_counter()
    result = segment_item(
        ZarrReader(str(source), item_id="bench"),
        PIPELINE,
        store=str(store),
        block_shape=block,
        executor=DaskExecutor(client),
    )
    if result.status != "done":
        raise RuntimeError(result.error)
    return time.perf_counter() - started, int(result.object_count or 0)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=256, help="input Zarr chunk side")
    parser.add_argument("--block", type=int, default=2048, help="segflow block side")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-"))
    results: dict[str, Any] = {
        "benchmark": "flow_dynamics (cellpose compute_masks, flow_threshold 0)",
        "size": args.size,
        "block": args.block,
        "workers": args.workers,
        "cellpose_torch_threads": torch.get_num_threads(),
    }
    try:
        source = workdir / "flows.zarr"
        write_flows(source, args.size, args.chunk)
        started = time.perf_counter()
        cluster = start_local_cluster(args.workers)
        client = Client(cluster)
        results["cluster_start_s"] = round(time.perf_counter() - started, 2)
        seg_s, seg_n = run_segflow(client, source, workdir / "segflow.zarr", args.block)
        print(f"segflow {seg_s:.2f} s, {seg_n} objects", file=sys.stderr, flush=True)
        client.close()
        cluster.close()
        cp_s, masks = run_cellpose(source)
        print(f"cellpose {cp_s:.2f} s, {masks.max()} masks", file=sys.stderr, flush=True)
        ours = zarr.open_group(str(workdir / "segflow.zarr" / "bench"), mode="r")["labels"][...]
        results.update(
            {
                "segflow_s": round(seg_s, 3),
                "cellpose_s": round(cp_s, 3),
                "ratio": round(cp_s / seg_s, 3),
                "objects": seg_n,
                "cellpose_masks": int(masks.max()),
                "same_partition": same_partition(np.asarray(ours), masks),
            }
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Stitched labels + region properties: segflow against in-memory scipy/scikit-image and dask-image.

The input is ``skimage.data.binary_blobs`` (8192^2, 41-pixel blobs, 35 % foreground) stored
as a uint8 Zarr array with 1024^2 chunks; every side writes uint32/smallest labels to Zarr:

* segflow: ``segment_item`` (threshold -> label, ``regions=True``: area, box, centroid and
  equivalent diameter of every object into ``regions.parquet``) on a 2-worker
  ``distributed.LocalCluster`` started beforehand;
* in memory: read the whole array, ``scipy.ndimage.label``, ``regionprops_table`` with the
  same properties, write the labels and the table;
* dask-image: ``ndmeasure.label`` and ``to_zarr`` with the same chunks as segflow's blocks,
  labels only (its per-label measurements take one pass per object), in a child process
  with a time limit. A failure or time-out is recorded, not hidden.

Memory: the same pipeline on a 4096^2 item and on a 16384^2 one (the 4096^2 blobs mirrored
4 x 4, so objects continue across the seams), each on a fresh cluster; the peak resident
memory of the busiest worker is read from ``/proc/PID/status`` (``VmHWM``) afterwards.

The last line printed is one JSON object. Run: ``python benchmarks/bench_labels.py``
(``--size 4096`` for a smaller run, ``--no-memory`` to skip the memory comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from _child import run_daskimage

PIPELINE = [{"op": "threshold", "value": 0}, {"op": "label", "connectivity": 1}]
PROPERTIES = ("label", "area", "bbox", "centroid", "equivalent_diameter_area")
BLOB_FRACTION = 0.005  # of 8192: blobs about 41 pixels across


def blobs(size: int) -> np.ndarray:
    from skimage.data import binary_blobs

    return binary_blobs(size, blob_size_fraction=BLOB_FRACTION * 8192 / size, rng=0,
                        volume_fraction=0.35)  # fmt: skip


def store_mask(path: Path, mask: np.ndarray, chunk: int) -> None:
    array = zarr.create_array(str(path), shape=mask.shape, chunks=(chunk, chunk), dtype="uint8")
    for i in range(0, mask.shape[0], chunk):
        array[i : i + chunk] = mask[i : i + chunk]


def store_mirrored(path: Path, tile: np.ndarray, times: int, chunk: int) -> None:
    """``tile`` mirrored ``times`` x ``times``: seams match, so objects cross them."""
    n = tile.shape[0]
    array = zarr.create_array(
        str(path), shape=(n * times, n * times), chunks=(chunk, chunk), dtype="uint8"
    )
    flips = [tile, tile[::-1]]
    for i in range(times):
        rows = flips[i % 2]
        band = np.concatenate([rows if j % 2 == 0 else rows[:, ::-1] for j in range(times)], 1)
        array[i * n : (i + 1) * n] = band


def run_inmemory(source: Path, workdir: Path, block: int) -> tuple[float, int]:
    import pandas as pd
    from scipy import ndimage as ndi
    from skimage.measure import regionprops_table

    started = time.perf_counter()
    mask = zarr.open_array(str(source), mode="r")[...]
    labels, n = ndi.label(mask)
    table = pd.DataFrame(regionprops_table(labels, properties=PROPERTIES))
    dtype = np.uint16 if n < 2**16 else np.uint32
    out = zarr.create_array(
        str(workdir / "inmem.zarr"), shape=labels.shape, chunks=(block, block), dtype=dtype,
        overwrite=True,
    )  # fmt: skip
    out[...] = labels.astype(dtype)
    table.to_parquet(workdir / "inmem-regions.parquet")
    return time.perf_counter() - started, int(n)


def run_segflow(client: Any, source: Path, store: Path, block: int) -> tuple[float, int]:
    from segflow.engine.executor import DaskExecutor
    from segflow.engine.item import segment_item
    from segflow.io.zarr import ZarrReader

    started = time.perf_counter()
    result = segment_item(
        ZarrReader(str(source), item_id="blobs"),
        PIPELINE,
        store=str(store),
        block_shape=block,
        executor=DaskExecutor(client),
        regions=True,
        regions_intensity=None,
    )
    if result.status != "done":
        raise RuntimeError(result.error)
    return time.perf_counter() - started, int(result.object_count or 0)


def warm_up(client: Any) -> None:
    def _import() -> None:
        import pyarrow.parquet  # noqa: F401

        import segflow.engine.item
        import segflow.io.zarr
        import segflow.store.regions  # noqa: F401

    client.run(_import)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def measure_memory(source: Path, store: Path, workers: int, block: int) -> dict[str, float]:
    """Run once on a fresh cluster; the peak resident memory of each worker process."""
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    with start_local_cluster(workers) as cluster, Client(cluster) as c:
        warm_up(c)
        seconds, objects = run_segflow(c, source, store, block)
        peaks = c.run(lambda: _peak_rss_mb(os.getpid()))
    return {"seconds": round(seconds, 2), "objects": objects, "peak_mb": max(peaks.values())}


def _daskimage_pipeline(source: str, target: str, workers: int, block: int) -> None:
    import dask.array as da
    from dask_image import ndmeasure
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    with start_local_cluster(workers) as cluster, Client(cluster):
        started = time.perf_counter()
        mask = da.from_zarr(source, chunks=(block, block)) > 0
        labels, n = ndmeasure.label(mask)
        stored = labels.astype(np.uint32).to_zarr(target, compute=False)
        _, n_value = da.compute(stored, n)
        print(json.dumps({"seconds": time.perf_counter() - started, "objects": int(n_value)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024, help="input Zarr chunk side")
    parser.add_argument("--block", type=int, default=2048, help="segflow block = output chunk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs per side; the best counts")
    parser.add_argument("--daskimage-timeout", type=float, default=600.0)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()

    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-labels-"))
    results: dict[str, Any] = {
        "benchmark": "label+regionprops",
        "size": args.size,
        "input_chunk": args.chunk,
        "block": args.block,
        "workers": args.workers,
    }
    try:
        source = workdir / "blobs.zarr"
        store_mask(source, blobs(args.size), args.chunk)
        with (
            start_local_cluster(args.workers) as cluster,
            Client(cluster) as client,
        ):
            warm_up(client)
            inmem = [run_inmemory(source, workdir, args.block) for _ in range(args.repeat)]
            seg = [
                run_segflow(client, source, workdir / "segflow.zarr", args.block)
                for _ in range(args.repeat)
            ]
        (inmem_s, inmem_n), (seg_s, seg_n) = min(inmem), min(seg)
        if seg_n != inmem_n:
            raise SystemExit(f"object counts differ: segflow {seg_n}, in-memory {inmem_n}")
        print(f"segflow {seg_s:.2f} s, in-memory {inmem_s:.2f} s", file=sys.stderr, flush=True)
        dask_s, dask_n, dask_error = run_daskimage(
            "bench_labels",
            source,
            workdir / "daskimage.zarr",
            args.workers,
            args.block,
            args.daskimage_timeout,
        )
        if dask_n is not None and dask_n != seg_n:
            dask_error = f"dask-image found {dask_n} objects, segflow {seg_n}"
        results.update(
            segflow_s=round(seg_s, 3),
            inmemory_s=round(inmem_s, 3),
            daskimage_s=None if dask_s is None else round(dask_s, 3),
            daskimage_error=dask_error,
            daskimage_scope="labels only (no region properties)",
            objects=seg_n,
            ratio_vs_inmemory=round(inmem_s / seg_s, 3),
            ratio_vs_daskimage=None if dask_s is None else round(dask_s / seg_s, 3),
        )
        print(f"dask-image: {dask_s} s {dask_error or ''}", file=sys.stderr, flush=True)
        if not args.no_memory:
            base = blobs(4096)
            small, large = workdir / "mem-4096.zarr", workdir / "mem-16384.zarr"
            store_mask(small, base, args.chunk)
            store_mirrored(large, base, 4, args.chunk)
            del base
            memory = {
                "4096": measure_memory(small, workdir / "m1.zarr", args.workers, args.block),
                "16384": measure_memory(large, workdir / "m2.zarr", args.workers, args.block),
            }
            memory["peak_ratio"] = round(memory["16384"]["peak_mb"] / memory["4096"]["peak_mb"], 3)
            results["memory"] = memory
            print(f"memory: {memory}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Gaussian (sigma 2) -> Otsu -> stitched labels -> Zarr write: segflow against references.

All three sides start from the same Zarr input (float32, 256^2 chunks, so that a block's halo
decompresses thin rings of small chunks rather than eight whole neighbour chunks) and write
labels to Zarr with 2048^2 chunks (one per segflow block, the engine's default for 2D):

* segflow: ``segment_item`` on a 2-worker ``distributed.LocalCluster`` (started beforehand;
  its start-up time is printed separately);
* in memory: read the whole array, ``scipy.ndimage.gaussian_filter``,
  ``skimage.filters.threshold_otsu``, ``scipy.ndimage.label``, write;
* dask-image: ``ndfilters.gaussian_filter``, Otsu from a dask histogram, ``ndmeasure.label``,
  ``to_zarr``, on the same cluster. A failure or time-out is recorded, not hidden.

The last line printed is one JSON object. Run: ``python benchmarks/bench_classical.py``
(``--size 4096`` for a smaller run; ``--daskimage-timeout`` bounds the dask-image run,
``--no-daskimage`` skips it; ``--ome-ab`` also times segflow with the OME-Zarr view off,
interleaved with the default runs, and prints the pyramid's share; ``--versions-ab`` also
times segflow committing the way it did before item versions (the staged group exchanged
with ``STORE/ITEM`` and the previous result deleted, no run journal), interleaved with the
default runs that keep each commit as a version).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from _child import run_daskimage
from _cpu import with_cpu
from _inputs import write_blobs
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

SIGMA = 2.0
PIPELINE = [{"op": "gaussian", "sigma": SIGMA}, {"op": "otsu"}, {"op": "label", "connectivity": 1}]


def make_input(path: Path, size: int, chunk: int) -> None:
    write_blobs(path, size, chunk, blob=64)


def warm_up(client: Any) -> None:
    """Import the engine on every worker once: the in-memory side has its imports done too."""

    def _import() -> None:
        import segflow.engine.item
        import segflow.io.zarr
        import segflow.store  # noqa: F401

    client.run(_import)


def run_inmemory(source: Path, target: Path, chunk: int) -> tuple[float, int]:
    started = time.perf_counter()
    image = zarr.open_array(str(source), mode="r")[...]
    smoothed = ndi.gaussian_filter(image, SIGMA)
    labels, n = ndi.label(smoothed > threshold_otsu(smoothed))
    dtype = np.uint8 if n < 2**8 else np.uint16 if n < 2**16 else np.uint32
    out = zarr.create_array(
        str(target), shape=labels.shape, chunks=(chunk, chunk), dtype=dtype, overwrite=True
    )
    out[...] = labels.astype(dtype)
    return time.perf_counter() - started, int(n)


def run_segflow(
    client: Any, source: Path, store: Path, chunk: int, *, ome: bool = True
) -> tuple[float, int]:
    from segflow.engine.executor import DaskExecutor
    from segflow.engine.item import segment_item
    from segflow.io.zarr import ZarrReader

    started = time.perf_counter()
    result = segment_item(
        ZarrReader(str(source), item_id="bench"),
        PIPELINE,
        store=str(store),
        block_shape=chunk,
        executor=DaskExecutor(client),
        ome=ome,
    )
    if result.status != "done":
        raise RuntimeError(result.error)
    return time.perf_counter() - started, int(result.object_count or 0)


@contextmanager
def plain_commits() -> Iterator[None]:
    """Commit as segflow did before item versions: the staged group exchanged with
    ``STORE/ITEM`` (renamed in when there is none), the previous result deleted, no run
    journal. The reference of ``--versions-ab``."""
    import os

    from segflow.store import commit, versions

    def swap(store: str, staged: str, item_id: str, version: str) -> None:
        final = os.path.join(store, item_id)
        if os.path.lexists(final) and commit._exchange(staged, final):
            shutil.rmtree(staged)
        else:
            os.rename(staged, final)

    saved = versions.publish_version, versions.record_commit
    versions.publish_version, versions.record_commit = swap, lambda *a: None  # type: ignore[assignment]
    try:
        yield
    finally:
        versions.publish_version, versions.record_commit = saved


def _daskimage_pipeline(source: str, target: str, workers: int, block: int) -> None:
    """The dask-image pipeline; runs in a child process so a hard time limit can stop it."""
    import dask.array as da
    from dask_image import ndfilters, ndmeasure
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    # The same tuned worker environment as segflow's, so neither side pays the malloc penalty.
    with start_local_cluster(workers) as cluster, Client(cluster):
        started = time.perf_counter()
        # Dask chunks = segflow's blocks: dask-image's label slows down sharply with more chunks.
        image = da.from_zarr(source, chunks=(block, block))
        smoothed = ndfilters.gaussian_filter(image, SIGMA)
        low, high = da.compute(smoothed.min(), smoothed.max())
        counts, edges = da.histogram(smoothed, bins=256, range=(low, high))
        centers = (edges[:-1] + edges[1:]) / 2
        threshold = threshold_otsu(hist=(counts.compute(), centers))
        labels, n = ndmeasure.label(smoothed > threshold)
        stored = labels.astype(np.uint32).to_zarr(target, compute=False)
        _, n_value = da.compute(stored, n)
        print(json.dumps({"seconds": time.perf_counter() - started, "objects": int(n_value)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=256, help="input Zarr chunk side")
    parser.add_argument(
        "--block", type=int, default=2048, help="segflow block = output chunk side (the default)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs per side; the best counts")
    parser.add_argument("--daskimage-timeout", type=float, default=300.0)
    parser.add_argument(
        "--compare-size",
        type=int,
        default=4096,
        help="also run all three at this size, where dask-image completes",
    )
    parser.add_argument(
        "--ome-ab",
        action="store_true",
        help="also run segflow with the OME-Zarr view off (output.ome: false), interleaved "
        "with the default runs: the pyramid's share of a run, measured under the same load",
    )
    parser.add_argument(
        "--versions-ab",
        action="store_true",
        help="also run segflow committing without versions (the previous result deleted), "
        "interleaved with the default runs: the cost of keeping versions",
    )
    parser.add_argument("--no-daskimage", action="store_true", help="skip the dask-image side")
    args = parser.parse_args()

    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-"))
    results: dict[str, Any] = {
        "benchmark": "gaussian->otsu->label->zarr",
        "size": args.size,
        "input_chunk": args.chunk,
        "block": args.block,
        "workers": args.workers,
    }
    try:
        started = time.perf_counter()
        cluster = start_local_cluster(args.workers)
        client = Client(cluster)
        results["cluster_start_s"] = round(time.perf_counter() - started, 2)
        sizes = [args.size] + (
            [args.compare_size] if args.compare_size and args.compare_size != args.size else []
        )
        for size in sizes:
            source = workdir / f"input-{size}.zarr"
            make_input(source, size, args.chunk)
            warm_up(client)
            # Best of --repeat runs on each side: the machine is shared and noisy.
            inmem = [
                run_inmemory(source, workdir / f"inmem-{size}.zarr", args.block)
                for _ in range(args.repeat)
            ]
            seg, plain, cpu_on, cpu_off, unversioned = [], [], [], [], []
            for _ in range(args.repeat):
                target = workdir / f"segflow-{size}.zarr"
                result, cpu = with_cpu(client, run_segflow, client, source, target, args.block)
                seg.append(result)
                cpu_on.append(cpu)
                if args.versions_ab:
                    with plain_commits():
                        reference = workdir / f"segflow-plain-{size}.zarr"
                        unversioned.append(run_segflow(client, source, reference, args.block))
                if args.ome_ab:
                    result, cpu = with_cpu(
                        client, run_segflow, client, source, target, args.block, ome=False
                    )
                    plain.append(result)
                    cpu_off.append(cpu)
            (inmem_s, inmem_n), (seg_s, seg_n) = min(inmem), min(seg)
            if seg_n != inmem_n:
                raise SystemExit(
                    f"object counts differ at {size}: segflow {seg_n}, in-memory {inmem_n}"
                )
            ab = ""
            if plain:  # the pyramid's share: default (ome on) over ome off, same load
                plain_s = min(plain)[0]
                ab = (
                    f", ome off {plain_s:.2f} s (pyramid {seg_s / plain_s - 1:+.1%}); CPU "
                    f"{min(cpu_on):.2f} s on, {min(cpu_off):.2f} s off "
                    f"(pyramid {min(cpu_on) / min(cpu_off) - 1:+.1%})"
                )
            if unversioned:  # keeping versions against deleting the previous result
                plain_commit_s = min(unversioned)[0]
                ab += (
                    f", without versions {plain_commit_s:.2f} s "
                    f"(versions {seg_s / plain_commit_s - 1:+.1%})"
                )
            print(
                f"size {size}^2: segflow {seg_s:.2f} s, in-memory {inmem_s:.2f} s{ab}",
                file=sys.stderr,
                flush=True,
            )
            dask_s, dask_error = None, "skipped (--no-daskimage)"
            if not args.no_daskimage:
                dask_s, _, dask_error = run_daskimage(
                    "bench_classical",
                    source,
                    workdir / f"daskimage-{size}.zarr",
                    args.workers,
                    args.block,
                    args.daskimage_timeout,
                )
            print(
                f"size {size}^2: segflow {seg_s:.2f} s, in-memory {inmem_s:.2f} s, "
                f"dask-image {f'{dask_s:.2f} s' if dask_s else dask_error}; objects {seg_n}",
                file=sys.stderr,
                flush=True,
            )
            row = {
                "segflow_s": round(seg_s, 3),
                "inmemory_s": round(inmem_s, 3),
                "daskimage_s": None if dask_s is None else round(dask_s, 3),
                "daskimage_error": dask_error,
                "objects": seg_n,
                "ratio_vs_inmemory": round(inmem_s / seg_s, 3),
                "ratio_vs_daskimage": None if dask_s is None else round(dask_s / seg_s, 3),
            }
            if plain:
                row["ome_off_s"] = round(min(plain)[0], 3)
                row["pyramid_cost"] = round(seg_s / min(plain)[0] - 1, 3)
                row["cpu_s"] = round(min(cpu_on), 3)
                row["ome_off_cpu_s"] = round(min(cpu_off), 3)
                row["pyramid_cpu_cost"] = round(min(cpu_on) / min(cpu_off) - 1, 3)
            if unversioned:
                row["unversioned_s"] = round(min(unversioned)[0], 3)
                row["versions_cost"] = round(seg_s / min(unversioned)[0] - 1, 3)
            if size == args.size:
                results.update(row)
            else:
                results[f"at_{size}"] = row
        client.close()
        cluster.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

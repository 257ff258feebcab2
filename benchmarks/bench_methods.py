"""Every classical method, blockwise on 2 workers, against its in-memory reference.

Both sides start from the same Zarr input and write their result to Zarr (chunks = segflow's
blocks):

* segflow: ``segment_item`` with a one-step (or short) pipeline on a 2-worker
  ``distributed.LocalCluster`` started once beforehand;
* in memory: read the whole array, run the scikit-image / scipy / numpy reference the method's
  equivalence tests use, write the result.

Inputs (made once, chunk by chunk): a float32 image of smooth blobs plus noise, a 3-band
uint16 raster for band math and k-means, and a mask of touching discs for the watershed.
The best of ``--repeat`` runs counts on each side. Prints a table, then, last, one JSON
object mapping each method to its ratio ``inmemory_s / segflow_s`` (target >= 1.2).

Run: ``python benchmarks/bench_methods.py`` (``--size 4096`` for a quicker run,
``--only otsu,canny`` for some methods; ``--ome-ab`` also times each method with the
OME-Zarr view off, interleaved with the default runs, and prints the pyramid's share).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from _cpu import with_cpu
from scipy import ndimage as ndi
from scipy.cluster.vq import kmeans2, vq
from skimage import filters
from skimage.feature import canny, peak_local_max
from skimage.segmentation import flood, watershed

from segflow.ops.watershed import flooding_order

Array = np.ndarray


@dataclass(frozen=True)
class Method:
    name: str
    input: str  # "blobs", "bands" or "discs"
    pipeline: list[dict[str, Any]]
    reference: Callable[[Array], Array]


def _seeds(size: int) -> list[list[int]]:
    return [[size // 4, size // 4], [size // 2, size // 3], [3 * size // 4, 3 * size // 4]]


def _grow_range(image: Array, seeds: list[list[int]]) -> Array:
    accepted = (image >= 0.45) & (image <= 1.0)
    grown = np.zeros(image.shape, dtype=bool)
    for seed in seeds:
        if accepted[tuple(seed)]:
            grown |= flood(accepted, tuple(seed), connectivity=1)
    return grown


def _grow_tolerance(image: Array, seeds: list[list[int]]) -> Array:
    grown = np.zeros(image.shape, dtype=bool)
    for seed in seeds:
        grown |= flood(image, tuple(seed), tolerance=0.25, connectivity=1)
    return grown


def _watershed(mask: Array) -> Array:
    mask = mask != 0
    regions, _ = ndi.label(mask)
    distance = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=5, labels=regions, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(flooding_order(distance), markers, mask=mask)


def _marker_watershed(image: Array) -> Array:
    markers = np.zeros(image.shape, dtype=np.int8)
    markers[image < 0.6] = 1
    markers[image > 0.7] = 2
    return watershed(filters.sobel(image), markers) == 2


def _kmeans(bands: Array) -> Array:
    """What one would write in memory: fit on a random sample, assign with scipy's vq."""
    data = bands.reshape(len(bands), -1).T.astype(np.float64)
    rng = np.random.default_rng(0)
    sample = data[rng.choice(len(data), 100_000, replace=False)]
    centres, _ = kmeans2(sample, 3, iter=50, minit="++", rng=rng)
    nearest, _ = vq(data, centres, check_finite=False)
    return (nearest + 1).astype(np.uint8).reshape(bands.shape[1:])


def _normalized_difference(bands: Array) -> Array:
    a, b = bands[2].astype(np.float32), bands[1].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a - b) / (a + b)
    return np.where(a + b == 0, 0, out).astype(np.float32)


def methods(size: int) -> list[Method]:
    seeds = _seeds(size)
    multi = filters.threshold_multiotsu
    return [
        Method("threshold", "blobs", [{"op": "threshold", "value": 0.9}], lambda x: x > 0.9),
        Method("otsu", "blobs", [{"op": "otsu"}], lambda x: x > filters.threshold_otsu(x)),
        Method(
            "multi_otsu",
            "blobs",
            [{"op": "multi_otsu", "classes": 3}],
            lambda x: (np.digitize(x, multi(x, 3)) + 1).astype(np.uint8),
        ),
        Method(
            "li",
            "blobs",
            [{"op": "li", "tolerance": 1e-4}],
            lambda x: x > filters.threshold_li(x, tolerance=1e-4),
        ),
        Method("yen", "blobs", [{"op": "yen"}], lambda x: x > filters.threshold_yen(x)),
        Method(
            "triangle", "blobs", [{"op": "triangle"}], lambda x: x > filters.threshold_triangle(x)
        ),
        Method(
            "threshold_percentile",
            "blobs",
            [{"op": "threshold_percentile", "q": 90}],
            lambda x: x > np.percentile(x, 90),
        ),
        *[
            Method(
                f"threshold_local_{how}",
                "blobs",
                [{"op": "threshold_local", "block_size": block, "method": how}],
                lambda x, block=block, how=how: x > filters.threshold_local(x, block, how),
            )
            for how, block in [("gaussian", 35), ("mean", 35), ("median", 7)]
        ],
        Method("sobel", "blobs", [{"op": "sobel"}], filters.sobel),
        Method("scharr", "blobs", [{"op": "scharr"}], filters.scharr),
        Method(
            "canny",
            "blobs",
            [{"op": "canny", "sigma": 2, "low": 0.02, "high": 0.05}],
            lambda x: canny(x, sigma=2, low_threshold=0.02, high_threshold=0.05),
        ),
        Method(
            "region_grow",
            "blobs",
            [{"op": "region_grow", "low": 0.45, "high": 1.0, "seeds": seeds}],
            lambda x: _grow_range(x, seeds),
        ),
        Method(
            "region_grow_tolerance",
            "blobs",
            [{"op": "region_grow", "tolerance": 0.25, "seeds": seeds}],
            lambda x: _grow_tolerance(x, seeds),
        ),
        Method(
            "watershed",
            "discs",
            [{"op": "watershed", "min_distance": 5, "max_object_size": 48}],
            _watershed,
        ),
        Method(
            "marker_watershed",
            "blobs",
            [{"op": "marker_watershed", "low": 0.6, "high": 0.7, "max_region_size": 64}],
            _marker_watershed,
        ),
        Method("kmeans", "bands", [{"op": "kmeans", "k": 3}], _kmeans),
        Method(
            "normalized_difference",
            "bands",
            [{"op": "normalized_difference", "band_a": 2, "band_b": 1}],
            _normalized_difference,
        ),
    ]


def make_inputs(folder: Path, size: int, chunk: int) -> dict[str, Path]:
    """The three inputs, written a strip of rows at a time."""
    rng = np.random.default_rng(0)
    coarse = ndi.zoom(rng.random((size // 64 + 2, size // 64 + 2)), 64, order=1)[:size, :size]
    paths = {name: folder / f"{name}.zarr" for name in ("blobs", "bands", "discs")}
    blobs = zarr.create_array(paths["blobs"], shape=(size, size), chunks=(chunk,) * 2, dtype="f4")
    bands = zarr.create_array(
        paths["bands"],
        shape=(3, size, size),
        chunks=(1, chunk, chunk),
        dtype="u2",
        dimension_names=("band", "y", "x"),
    )
    discs = zarr.create_array(paths["discs"], shape=(size, size), chunks=(chunk,) * 2, dtype="u1")
    for i in range(0, size, chunk):
        rows = slice(i, min(i + chunk, size))
        noise = rng.random((rows.stop - rows.start, size), dtype=np.float32)
        part = coarse[rows].astype(np.float32)
        blobs[rows, :] = part + 0.3 * noise
        for band in range(3):
            scale = (band + 1) * 600
            bands[band, rows, :] = (scale * part + 200 * noise * band + 50).astype(np.uint16)
    # Clusters of two or three touching discs (radius 9), one per 48-pixel cell, so that no
    # foreground region is wider than the watershed's max_object_size (48).
    yy, xx = np.mgrid[-9:10, -9:10]
    disc = yy**2 + xx**2 <= 81
    cell = 48
    for i in range(0, size, cell):
        strip = np.zeros((cell, size), dtype=bool)
        for x in range(0, size - cell + 1, cell):
            for dy, dx in [(14, 14), (14, 28), (28, 21)][: int(rng.integers(2, 4))]:
                cy, cx = dy + int(rng.integers(-2, 3)), x + dx + int(rng.integers(-2, 3))
                strip[cy - 9 : cy + 10, cx - 9 : cx + 10] |= disc
        rows = slice(i, min(i + cell, size))
        discs[rows, :] = strip[: rows.stop - rows.start]
    return paths


def run_inmemory(method: Method, source: Path, target: Path, chunk: int) -> float:
    started = time.perf_counter()
    image = zarr.open_array(source, mode="r")[...]
    result = np.asarray(method.reference(image))
    if result.dtype == np.bool_:
        result = result.view(np.uint8)
    out = zarr.create_array(
        target, shape=result.shape, chunks=(chunk,) * result.ndim, dtype=result.dtype
    )
    out[...] = result
    return time.perf_counter() - started


def run_segflow(
    client: Any, method: Method, source: Path, store: Path, block: int, *, ome: bool = True
) -> float:
    from segflow.engine.executor import DaskExecutor
    from segflow.engine.item import segment_item
    from segflow.io.zarr import ZarrReader

    started = time.perf_counter()
    result = segment_item(
        ZarrReader(str(source), item_id="bench"),
        method.pipeline,
        store=str(store),
        block_shape=block,
        executor=DaskExecutor(client),
        ome=ome,
    )
    if result.status != "done":
        raise RuntimeError(f"{method.name}: {result.error}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=256, help="input Zarr chunk side")
    parser.add_argument("--block", type=int, default=2048, help="segflow block = output chunk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs per side; the best counts")
    parser.add_argument("--only", default="", help="comma-separated method names")
    parser.add_argument(
        "--ome-ab",
        action="store_true",
        help="also run segflow with the OME-Zarr view off (output.ome: false), interleaved "
        "with the default runs: the pyramid's share of a run, measured under the same load",
    )
    args = parser.parse_args()

    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    chosen = [m for m in methods(args.size) if not args.only or m.name in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-methods-"))
    rows: dict[str, dict[str, float]] = {}
    try:
        started = time.perf_counter()
        inputs = make_inputs(workdir, args.size, args.chunk)
        print(f"inputs {args.size}^2 written in {time.perf_counter() - started:.1f} s", flush=True)
        with start_local_cluster(args.workers) as cluster:
            with Client(cluster) as client:
                extra = (
                    f"{'ome off s':>11}{'pyramid':>9}{'cpu on':>9}{'cpu off':>9}{'pyr cpu':>9}"
                    if args.ome_ab
                    else ""
                )
                print(f"{'method':<26}{'segflow s':>11}{'in-memory s':>13}{'ratio':>8}{extra}")
                for n, method in enumerate(chosen):
                    source = inputs[method.input]
                    ours, theirs, plain, cpu_on, cpu_off = [], [], [], [], []
                    for attempt in range(args.repeat):
                        store = workdir / f"out-{n}-{attempt}.zarr"
                        for ome, times, cpus in ((True, ours, cpu_on), (False, plain, cpu_off)):
                            if not ome and not args.ome_ab:
                                continue
                            seconds, cpu = with_cpu(
                                client,
                                run_segflow,
                                client,
                                method,
                                source,
                                store,
                                args.block,
                                ome=ome,
                            )
                            times.append(seconds)
                            cpus.append(cpu)
                            shutil.rmtree(store)
                        target = workdir / f"ref-{n}-{attempt}.zarr"
                        theirs.append(run_inmemory(method, source, target, args.block))
                        shutil.rmtree(target)
                    segflow_s, inmemory_s = min(ours), min(theirs)
                    rows[method.name] = {
                        "segflow_s": round(segflow_s, 3),
                        "inmemory_s": round(inmemory_s, 3),
                        "ratio": round(inmemory_s / segflow_s, 2),
                    }
                    extra = ""
                    if plain:  # the pyramid's share: default (ome on) over ome off
                        rows[method.name]["ome_off_s"] = round(min(plain), 3)
                        rows[method.name]["pyramid_cost"] = round(segflow_s / min(plain) - 1, 3)
                        cpu_share = min(cpu_on) / min(cpu_off) - 1
                        rows[method.name]["pyramid_cpu_cost"] = round(cpu_share, 3)
                        extra = (
                            f"{min(plain):>11.2f}{segflow_s / min(plain) - 1:>+9.1%}"
                            f"{min(cpu_on):>9.2f}{min(cpu_off):>9.2f}{cpu_share:>+9.1%}"
                        )
                    print(
                        f"{method.name:<26}{segflow_s:>11.2f}{inmemory_s:>13.2f}"
                        f"{inmemory_s / segflow_s:>8.2f}{extra}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    short = [name for name, row in rows.items() if row["ratio"] < 1.2]
    print(f"size {args.size}^2, {args.workers} workers; below 1.2: {', '.join(short) or 'none'}")
    print(json.dumps({name: row["ratio"] for name, row in rows.items()}))


if __name__ == "__main__":
    main()

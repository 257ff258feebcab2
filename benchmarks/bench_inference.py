"""Tiled 2-D U-Net inference, Zarr to Zarr: segflow's engine against MONAI and the bare network.

One network and one image for all three sides: MONAI ``BasicUNet`` with features
(16, 32, 64, 128, 256, 16) (1.95 M parameters, random weights seeded 0, instance norm, one input
channel, two classes), over a float32 image of ``--size``^2 pixels stored as Zarr (256^2
chunks). Tiles are 256^2 with 25 % overlap, blended with a Gaussian of sigma = tile / 8, and
every side writes the foreground probability (softmax, 1 - P(background)) as float32 Zarr
with ``--block``^2 chunks:

* segflow: ``segment_item`` with ``{op: model, output: foreground}`` on a 2-worker
  ``distributed.LocalCluster`` (started beforehand, engine and torch imported on the workers,
  and the model loaded once by a warm-up run on a small item, as a long run would have it);
* MONAI: read the whole array, ``monai.inferers.sliding_window_inference`` (``mode="gaussian"``,
  ``sigma_scale=0.125``, ``overlap=0.25``, ``sw_batch_size`` = segflow's batch size) on the
  softmax of the same network, write;
* raw forward: the network alone, in batches, over as many 256^2 tiles as MONAI runs (no
  reading, blending or writing): the floor any tiled inference pays;
* ONNX Runtime (unless ``--no-onnx``): the same network exported to ONNX (fixed 256^2 tiles,
  dynamic batch), run by segflow's ONNX source (the same ``segment_item`` on the same
  cluster, one intra-op thread per worker) against ONNX Runtime alone in this process (2
  intra-op threads): read the whole array, every tile of the same global grid in batches,
  softmax and Gaussian blend in NumPy, write. ``ratio_onnx`` is the second's seconds over
  the first's (target >= 1.0 on CPU); ``onnx_max_abs_diff`` compares their outputs.

Same total threads on every side: Dask workers run with ``OMP_NUM_THREADS=1``
(``segflow.engine.cluster.WORKER_ENV``), so 2 workers are 2 threads; MONAI and the raw forward
run in this process with ``torch.set_num_threads(2)``. Both grids are the same (with 25 %
overlap on 4096 pixels MONAI and segflow both start tiles every 192 pixels) and the outputs are
compared (``max_abs_diff``, ``mean_abs_diff``). They agree to float rounding where one tile
covers a pixel; in overlaps they differ a little because MONAI clamps its Gaussian at 1e-3 of
the peak and segflow at 1e-4 (``segflow.models.tiling.MIN_WEIGHT``): at a tile's edge, where
both weights are near the floor, a random network's two tiles can disagree strongly.

The last line printed is one JSON object. Run: ``python benchmarks/bench_inference.py``
(``--size 1024`` for a quick run).
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
import torch
import zarr
from _inputs import write_blobs

TILE = 256
OVERLAP = 0.25
FEATURES = (16, 32, 64, 128, 256, 16)
THREADS_PER_WORKER = 1  # what WORKER_ENV's OMP_NUM_THREADS=1 gives each worker's torch


def make_card() -> Any:
    from segflow.models.card import ModelCard

    return ModelCard.model_validate(
        {
            "name": "bench-unet",
            "architecture": {"name": "basic_unet", "params": {"features": list(FEATURES)}},
            "spatial_dims": 2,
            # Fixed [0, 1] scaling (the identity): no statistics pass, as MONAI has none.
            "channels": [{"name": "x", "normalization": {"method": "fixed", "low": 0, "high": 1}}],
            "classes": ["background", "foreground"],
            "tile": [TILE, TILE],
            "overlap": OVERLAP,
            "window": "gaussian",
        }
    )


def make_model(folder: Path) -> torch.nn.Module:
    """The benchmark network (seeded), saved as a segflow checkpoint in ``folder``."""
    from segflow.models.checkpoint import save_checkpoint
    from segflow.models.networks import build_network

    card = make_card()
    torch.manual_seed(0)
    net = build_network(card.network_spec()).eval()
    save_checkpoint(folder, net, card)
    return net


def make_input(path: Path, size: int, chunk: int) -> None:
    write_blobs(path, size, chunk, blob=32)


def export_onnx(net: torch.nn.Module, path: Path) -> Path:
    """The benchmark network as an ONNX graph: fixed 256^2 tiles (which the ONNX source takes
    as its tile), dynamic batch, the overlap and classes in the graph's metadata."""
    import warnings

    import onnx

    with warnings.catch_warnings():  # torch 2.13 calls the TorchScript-based exporter legacy
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(1, 1, TILE, TILE),), str(path), dynamo=False,
            input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}},
        )  # fmt: skip
    graph = onnx.load(str(path))
    card = {"classes": ["background", "foreground"], "overlap": OVERLAP}
    graph.metadata_props.add(key="segflow.card", value=json.dumps(card))
    onnx.save(graph, str(path))
    return path


def run_onnxruntime(
    graph: Path, source: Path, target: Path, batch_size: int, block: int, threads: int
) -> tuple[float, int]:
    """Read, ONNX Runtime over every tile of the global grid (softmax, Gaussian blend in
    NumPy), write; seconds and the number of tiles run."""
    import onnxruntime as ort

    from segflow.models.tiling import plan_tiles, tile_weights

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    image = zarr.open_array(str(source), mode="r")[...]
    grid = plan_tiles(image.shape, tile=(TILE, TILE), overlap=OVERLAP)
    weights = tile_weights((TILE, TILE))
    num = np.zeros(image.shape, np.float32)
    den = np.zeros(image.shape, np.float32)
    starts = list(grid.all_tiles())
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        boxes = [(slice(y, y + TILE), slice(x, x + TILE)) for y, x in chunk]
        batch = np.stack([image[box][None] for box in boxes])
        logits = session.run(None, {"image": batch})[0]
        background = 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))  # softmax's class 0
        for box, p in zip(boxes, background, strict=True):
            num[box] += (1.0 - p) * weights
            den[box] += weights
    out = zarr.create_array(
        str(target), shape=image.shape, chunks=(block, block), dtype="float32", overwrite=True
    )
    out[...] = num / den
    return time.perf_counter() - started, len(starts)


def warm_up(client: Any, model: Path, workdir: Path, batch_size: int, block: int) -> None:
    """Import the engine and torch on every worker and load the model there (one small item
    per worker's share), so the timed run measures inference, not start-up."""

    def _import() -> None:
        import segflow.engine.item
        import segflow.io.zarr
        import segflow.models
        import segflow.ops.model
        import segflow.store  # noqa: F401

    client.run(_import)
    small = workdir / f"warm-{model.name}.zarr"
    make_input(small, 2 * TILE, TILE)
    for k in range(2):  # two blocks: each worker gets one and loads the model
        out = workdir / f"warm-out-{model.name}-{k}.zarr"
        run_segflow(client, small, out, model, batch_size, TILE)


def pipeline(model: Path, batch_size: int) -> list[dict[str, Any]]:
    return [
        {"op": "model", "path": str(model), "device": "cpu", "batch_size": batch_size,
         "output": "foreground"},
    ]  # fmt: skip


def run_segflow(
    client: Any, source: Path, store: Path, model: Path, batch_size: int, block: int
) -> float:
    from segflow.engine.executor import DaskExecutor
    from segflow.engine.item import segment_item
    from segflow.io.zarr import ZarrReader

    started = time.perf_counter()
    result = segment_item(
        ZarrReader(str(source), item_id="bench"),
        pipeline(model, batch_size),
        store=str(store),
        block_shape=block,
        chunks=(block, block),
        executor=DaskExecutor(client),
    )
    if result.status != "done":
        raise RuntimeError(result.error)
    return time.perf_counter() - started


def run_monai(
    net: torch.nn.Module, source: Path, target: Path, batch_size: int, block: int
) -> tuple[float, int]:
    """Read, MONAI sliding window (softmax per tile, Gaussian blend), write; seconds and the
    number of tiles run."""
    from monai.inferers import sliding_window_inference

    tiles = 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal tiles
        tiles += len(batch)
        return torch.softmax(net(batch), dim=1)

    started = time.perf_counter()
    image = zarr.open_array(str(source), mode="r")[...]
    with torch.inference_mode():
        probs = sliding_window_inference(
            torch.from_numpy(image)[None, None],
            roi_size=(TILE, TILE),
            sw_batch_size=batch_size,
            predictor=predictor,
            overlap=OVERLAP,
            mode="gaussian",
            sigma_scale=0.125,
        )
    foreground = (1.0 - probs[0, 0]).numpy().astype(np.float32)
    out = zarr.create_array(
        str(target), shape=foreground.shape, chunks=(block, block), dtype="float32", overwrite=True
    )
    out[...] = foreground
    return time.perf_counter() - started, tiles


def run_raw(net: torch.nn.Module, tiles: int, batch_size: int) -> float:
    """The network alone over ``tiles`` tiles of random data, ``batch_size`` at a time."""
    batch = torch.rand(batch_size, 1, TILE, TILE, generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, tiles, batch_size):
            n = min(batch_size, tiles - first)
            torch.softmax(net(batch[:n]), dim=1)
    return time.perf_counter() - started


def run_onnx_sides(
    client: Any, graph: Path, source: Path, workdir: Path, batch_size: int, block: int,
    repeat: int, threads: int,
) -> dict[str, Any]:  # fmt: skip
    """segflow's ONNX source on the cluster against ONNX Runtime alone in this process.
    The cluster's workers idle meanwhile (no task), so they do not compete for the cores."""
    store = workdir / "segflow-onnx.zarr"
    ours_s = min(
        run_segflow(client, source, store, graph, batch_size, block) for _ in range(repeat)
    )
    print(f"segflow (ONNX source) {ours_s:.2f} s", file=sys.stderr, flush=True)
    target = workdir / "onnxruntime.zarr"
    runs = [run_onnxruntime(graph, source, target, batch_size, block, threads)
            for _ in range(repeat)]  # fmt: skip
    theirs_s, tiles = min(runs)
    print(f"onnxruntime {theirs_s:.2f} s ({tiles} tiles)", file=sys.stderr, flush=True)
    ours = zarr.open_group(str(store / "bench"), mode="r")["image"][...].astype(np.float64)
    theirs = zarr.open_array(str(target), mode="r")[...]
    return {
        "onnx_tiles": tiles,
        "segflow_onnx_s": round(ours_s, 3),
        "onnxruntime_s": round(theirs_s, 3),
        "ratio_onnx": round(theirs_s / ours_s, 3),
        "onnx_max_abs_diff": round(float(np.abs(ours - theirs).max()), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=256, help="input Zarr chunk side")
    parser.add_argument(
        "--block", type=int, default=2048, help="segflow block = output chunk side (the default)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the best counts")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the ONNX Runtime sides")
    args = parser.parse_args()

    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    threads = args.workers * THREADS_PER_WORKER
    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="segflow-bench-inference-"))
    results: dict[str, Any] = {
        "benchmark": "unet-tiled-inference-zarr",
        "size": args.size,
        "tile": TILE,
        "overlap": OVERLAP,
        "block": args.block,
        "workers": args.workers,
        "torch_threads": threads,
        "batch_size": args.batch_size,
    }
    try:
        model_dir = workdir / "model"
        net = make_model(model_dir)
        results["parameters"] = sum(p.numel() for p in net.parameters())
        started = time.perf_counter()
        cluster = start_local_cluster(args.workers)
        client = Client(cluster)
        results["cluster_start_s"] = round(time.perf_counter() - started, 2)
        warm_up(client, model_dir, workdir, args.batch_size, args.block)
        graph = None if args.no_onnx else export_onnx(net, workdir / "model.onnx")
        if graph is not None:
            warm_up(client, graph, workdir, args.batch_size, args.block)
        source = workdir / "input.zarr"
        make_input(source, args.size, args.chunk)
        store = workdir / "segflow.zarr"

        # Best of --repeat runs on each side: the machine is shared and noisy.
        segflow_s = min(
            run_segflow(client, source, store, model_dir, args.batch_size, args.block)
            for _ in range(args.repeat)
        )
        print(f"segflow {segflow_s:.2f} s", file=sys.stderr, flush=True)
        if graph is not None:
            results.update(
                run_onnx_sides(
                    client,
                    graph,
                    source,
                    workdir,
                    args.batch_size,
                    args.block,
                    args.repeat,
                    threads,
                )
            )
        client.close()
        cluster.close()  # the workers' threads would otherwise compete with the next sides
        monai_runs = [
            run_monai(net, source, workdir / "monai.zarr", args.batch_size, args.block)
            for _ in range(args.repeat)
        ]
        monai_s, tiles = min(monai_runs)
        print(f"monai {monai_s:.2f} s ({tiles} tiles)", file=sys.stderr, flush=True)
        raw_s = min(run_raw(net, tiles, args.batch_size) for _ in range(args.repeat))
        print(f"raw forward {raw_s:.2f} s", file=sys.stderr, flush=True)

        # segflow stores a float output as the item's "image" array
        ours = zarr.open_group(str(store / "bench"), mode="r")["image"][...]
        theirs = zarr.open_array(str(workdir / "monai.zarr"), mode="r")[...]
        results.update(
            {
                "tiles": tiles,
                "max_abs_diff": round(float(np.abs(ours.astype(np.float64) - theirs).max()), 6),
                "mean_abs_diff": round(float(np.abs(ours.astype(np.float64) - theirs).mean()), 6),
                "segflow_s": round(segflow_s, 3),
                "monai_s": round(monai_s, 3),
                "raw_forward_s": round(raw_s, 3),
                "ratio_vs_monai": round(monai_s / segflow_s, 3),
                "ratio_vs_raw": round(raw_s / segflow_s, 3),
            }
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

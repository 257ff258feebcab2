"""Peak memory of ``segflow export --format cog`` against the window it reads, and against
writing the same COG from the whole array in memory.

The item: ``skimage.data.binary_blobs`` (4096^2) mirrored 4 x 4 into a 16384^2 uint8 Zarr
array (objects continue across the seams), labelled by ``segment_item`` (threshold ->
label) into a store with 1024^2 chunks. Each export runs in a fresh child process that
first exports a 512^2 item (loading GDAL's drivers, PROJ and Zarr's codecs), reads its peak
resident memory so far (``VmHWM``), exports the large item and reads its peak again; the
figure is how much the peak grew, next to
the bytes of one window of labels (what ``write_cog`` reads at once) for each COG tile
size. The in-memory side reads the whole array, writes it into a tiled GeoTIFF, builds
the same overviews and copies it with GDAL's COG driver (what a script with rasterio does).

The last line printed is one JSON object. Run: ``python benchmarks/bench_export.py``
(``--size 4096`` for the 4096^2 item alone, quicker).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_labels import PIPELINE, blobs, store_mirrored

CHUNK = 1024


def make_store(workdir: Path, size: int) -> tuple[Path, str]:
    """The labelled item, in ``workdir/labels.zarr``; returns the store and the item id."""
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io.zarr import ZarrReader

    source = workdir / "mask.zarr"
    store_mirrored(source, blobs(4096), size // 4096, CHUNK)
    store = workdir / "labels.zarr"
    result = segment_item(
        ZarrReader(str(source), item_id="blobs"), PIPELINE, store=str(store),
        block_shape=2048, chunks=(CHUNK, CHUNK), executor=LocalExecutor(2),
    )  # fmt: skip
    if result.status != "done":
        raise RuntimeError(result.error)
    shutil.rmtree(source)
    return store, "blobs"


def make_tiny(workdir: Path) -> Path:
    """A 512^2 item the child exports first, so that loading GDAL's drivers, PROJ and
    Zarr's codecs is not counted as the export's memory."""
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader

    store = workdir / "tiny.zarr"
    image = blobs(4096)[:512, :512].astype(np.uint8)
    result = segment_item(
        ArrayReader(image, item_id="tiny"), PIPELINE, store=str(store), block_shape=256,
        chunks=(256, 256), executor=LocalExecutor(1),
    )  # fmt: skip
    if result.status != "done":
        raise RuntimeError(result.error)
    return store


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def _child_export(store: str, target: str, mode: str, block: int) -> None:
    """In the child process: one export, then one JSON line of its memory and time."""
    import rasterio
    import rasterio.shutil
    import zarr
    from rasterio.enums import Resampling

    from segflow.export import stored_items
    from segflow.export.cog import overview_factors, write_cog

    [tiny] = stored_items(str(Path(store).with_name("tiny.zarr")))
    write_cog(tiny, "labels", target + ".tiny.tif", block=256)  # warm up (not measured)
    [item] = stored_items(store)
    before = _rss_mb("VmHWM")
    started = time.perf_counter()
    if mode == "segflow":
        write_cog(item, "labels", target, block=block)
    else:
        labels = zarr.open_array(store, path=f"{item.id}/labels", mode="r")[...]
        profile = {"driver": "GTiff", "height": labels.shape[0], "width": labels.shape[1],
                   "count": 1, "dtype": str(labels.dtype), "tiled": True, "blockxsize": block,
                   "blockysize": block, "compress": "zstd", "BIGTIFF": "IF_SAFER"}  # fmt: skip
        partial = target + ".partial.tif"
        with rasterio.open(partial, "w", **profile) as dst:
            dst.write(labels, 1)
            dst.build_overviews(list(overview_factors(labels.shape, block)), Resampling.nearest)
        rasterio.shutil.copy(partial, target, driver="COG", BLOCKSIZE=block,
                             COMPRESS="DEFLATE", OVERVIEWS="FORCE_USE_EXISTING")  # fmt: skip
        Path(partial).unlink()
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 2), "before_mb": round(before, 1),
                      "peak_mb": round(_rss_mb("VmHWM"), 1)}))  # fmt: skip


def run_child(store: Path, target: Path, mode: str, block: int) -> dict[str, Any]:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_export as b; "
        "b._child_export(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))"
    )
    here = str(Path(__file__).resolve().parent)
    command = [sys.executable, "-W", "ignore", "-c", code, here, str(store), str(target), mode,
               str(block)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["grew_mb"] = round(result["peak_mb"] - result["before_mb"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="item side (multiple of 4096)")
    parser.add_argument("--blocks", default="512,1024,2048", help="COG tile sizes")
    parser.add_argument("--no-inmemory", action="store_true", help="skip the in-memory side")
    args = parser.parse_args()
    from segflow.export.cog import _window

    figures: dict[str, Any] = {"size": args.size, "chunk": CHUNK}
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        store, _ = make_store(workdir, args.size)
        make_tiny(workdir)
        import zarr

        labels = zarr.open_array(str(store), path="blobs/labels", mode="r")
        itemsize = np.dtype(labels.dtype).itemsize
        figures["dtype"] = str(labels.dtype)
        figures["array_mb"] = round(labels.size * itemsize / 2**20, 1)
        print(f"{args.size}^2 {labels.dtype} labels made in {time.perf_counter() - started:.1f} s")
        for block in (int(b) for b in args.blocks.split(",")):
            window = _window((CHUNK, CHUNK), block)
            window_mb = window[0] * window[1] * itemsize / 2**20
            result = run_child(store, workdir / f"segflow-{block}.tif", "segflow", block)
            result.update(window=list(window), window_mb=round(window_mb, 1),
                          ratio=round(result["grew_mb"] / window_mb, 2))  # fmt: skip
            figures[f"segflow_{block}"] = result
            print(f"segflow, tiles {block}: {result}")
        if not args.no_inmemory:
            result = run_child(store, workdir / "inmemory.tif", "inmemory", 512)
            figures["inmemory_512"] = result
            print(f"in memory, tiles 512: {result}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

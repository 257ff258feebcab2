"""A scene against its tiles as separate items, and against merging the tiles first.

``--tiles`` (a square number) tiles of ``--tile``^2 pixels, 3-band uint8, deflate-compressed
and tiled 256 x 256, one CRS, abutting, smooth blobs like fields and roofs. The pipeline is
the shipped configs/aerial.yaml (nodata, luma, gaussian, Otsu, opening, label) in its
256^2 blocks, with its output settings left out (labels only). Three ways, each in its own
process on the in-process executor with 2 threads (peak resident memory only grows):

- ``items``: every tile its own item, one after another (segflow before scenes);
- ``scene``: the tiles as one item (``input.mosaic: true``), read through the footprint index;
- ``merged``: ``rasterio.merge.merge`` of the tiles into one GeoTIFF, then that one item
  (the usual workaround: time includes the merge and its write).

Prints a line per way and the ratios scene / items and scene / merged (time and peak
memory), then, last, a JSON object. The issue's setting is ``--tiles 64 --tile 2048``.

Run: ``python benchmarks/bench_scene.py --tiles 16 --tile 1024``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_tiles(folder: Path, tiles: int, tile: int) -> list[Path]:
    import rasterio
    from affine import Affine
    from scipy import ndimage as ndi

    side = round(tiles**0.5)
    rng = np.random.default_rng(0)
    paths = []
    for row in range(side):
        for col in range(side):
            noise = ndi.gaussian_filter(rng.random((tile, tile), dtype=np.float32), 6)
            grey = ((noise - noise.min()) / np.ptp(noise) * 250 + 1).astype(np.uint8)
            image = np.stack([grey, grey // 2 + 60, 255 - grey])
            x, y = 600_000.0 + col * tile * 0.5, 5_200_000.0 - row * tile * 0.5
            profile = {"driver": "GTiff", "height": tile, "width": tile, "count": 3}
            profile.update(dtype="uint8", crs="EPSG:32632", nodata=0)
            profile.update(transform=Affine(0.5, 0, x, 0, -0.5, y), tiled=True)
            profile.update(blockxsize=256, blockysize=256, compress="deflate")
            path = folder / f"t{row:02d}_{col:02d}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(image)
            paths.append(path)
    return paths


def run_way(way: str, folder: Path, work: Path) -> dict[str, float]:
    """One way's seconds and this process's peak memory (MB)."""
    from segflow.config import load_config
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import discover_items, open_item

    config = load_config(ROOT / "configs" / "aerial.yaml")
    started = time.perf_counter()
    if way == "items":
        readers, _ = discover_items(str(folder))
    elif way == "scene":
        readers, _ = discover_items(str(folder), mosaic=True)
    else:
        readers = [open_item(str(merge_tiles(folder, work / "merged.tif")))]
    objects = 0
    with LocalExecutor(2) as executor:
        for reader in readers:
            result = segment_item(reader, config.pipeline, store=str(work / f"{way}.zarr"),
                                  block_shape=config.blocks.shape, executor=executor,
                                  ome=False)  # fmt: skip
            assert result.status == "done", result.error
            objects += int(result.object_count or 0)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak, "objects": objects}


def merge_tiles(folder: Path, path: Path) -> Path:
    import rasterio
    from rasterio.merge import merge

    sources = [rasterio.open(p) for p in sorted(folder.glob("*.tif"))]
    mosaic, transform = merge(sources)
    profile = {**sources[0].profile, "height": mosaic.shape[1], "width": mosaic.shape[2]}
    profile["transform"] = transform
    for source in sources:
        source.close()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mosaic)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--way", help=argparse.SUPPRESS)  # one way, in a child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(run_way(args.way, Path(args.folder), Path(work))))
        return
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiles"
        folder.mkdir()
        write_tiles(folder, args.tiles, args.tile)
        for way in ("items", "scene", "merged"):
            command = [sys.executable, __file__, f"--way={way}", f"--folder={folder}"]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[way] = json.loads(output.strip().splitlines()[-1])
            r = results[way]
            print(f"{way:<7} {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB, "
                  f"{r['objects']:.0f} objects")  # fmt: skip
    ratios = {
        f"scene_over_{other}_{k}": results["scene"][k] / results[other][k]
        for other in ("items", "merged")
        for k in ("seconds", "peak_mb")
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    figures = {w: {k: round(v, 2) for k, v in r.items()} for w, r in results.items()}
    print(json.dumps({"tiles": args.tiles, "tile": args.tile, **figures,
                      **{k: round(v, 3) for k, v in ratios.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()

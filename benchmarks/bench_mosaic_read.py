"""Reading a scene's block windows: segflow's tile-footprint index against a GDAL VRT.

Four tiles (2 x 2) of ``--tile``^2 pixels, 3-band uint8, deflate-compressed and tiled
256 x 256, one CRS, abutting. Windows of ``--block``^2 pixels that touch 1, 2 and 4 tiles
(inside a tile, across the vertical border, across the corner), ``--windows`` of each at
different places. GDAL's block cache is kept at 1 MB (``GDAL_CACHEMAX``), less than one
window's tiles, so that every read decodes its pixels as a block of a run does (a run reads
each window once); the tiles hold smooth, compressible values as aerial images do. Both
readers read every window; the figure is the median time per window. A VRT of the same tiles (one
``SimpleSource`` per tile, written by this script, opened by rasterio) is GDAL's virtual
mosaic; both give the same pixels (checked).

Prints a line per case, then, last, a JSON object.

Run: ``python benchmarks/bench_mosaic_read.py`` (``--tile 2048 --block 512``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GDAL_CACHEMAX", "1")  # MB, read by GDAL when rasterio loads it

import numpy as np
import rasterio
from affine import Affine
from scipy import ndimage as ndi

from segflow.io import open_item

PIXEL = 0.5
X0, Y0 = 600_000.0, 5_200_000.0


def write_tiles(folder: Path, tile: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for row in range(2):
        for col in range(2):
            noise = ndi.gaussian_filter(rng.random((3, tile, tile), dtype=np.float32), (0, 3, 3))
            image = ((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)
            path = folder / f"t{row}{col}.tif"
            x, y = X0 + col * tile * PIXEL, Y0 - row * tile * PIXEL
            transform = Affine(PIXEL, 0, x, 0, -PIXEL, y)
            profile = {"driver": "GTiff", "height": tile, "width": tile, "count": 3}
            profile.update(dtype="uint8", crs="EPSG:32632", transform=transform)
            profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(image)
            paths.append(path)
    return paths


def write_vrt(path: Path, tiles: list[Path], tile: int) -> None:
    size = 2 * tile
    bands = []
    for band in (1, 2, 3):
        sources = []
        for i, tile_path in enumerate(tiles):
            x, y = (i % 2) * tile, (i // 2) * tile
            sources.append(
                f"<SimpleSource><SourceFilename relativeToVRT='0'>{tile_path}</SourceFilename>"
                f"<SourceBand>{band}</SourceBand>"
                f"<SrcRect xOff='0' yOff='0' xSize='{tile}' ySize='{tile}'/>"
                f"<DstRect xOff='{x}' yOff='{y}' xSize='{tile}' ySize='{tile}'/></SimpleSource>"
            )
        bands.append(
            f"<VRTRasterBand dataType='Byte' band='{band}'>{''.join(sources)}</VRTRasterBand>"
        )
    with rasterio.open(tiles[0]) as first:
        srs = first.crs.to_wkt()
    transform = f"{X0}, {PIXEL}, 0, {Y0}, 0, {-PIXEL}"
    path.write_text(
        f"<VRTDataset rasterXSize='{size}' rasterYSize='{size}'><SRS>{srs}</SRS>"
        f"<GeoTransform>{transform}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )


def windows(kind: int, tile: int, block: int, n: int) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` windows touching ``kind`` tiles."""
    steps = np.linspace(0, tile - 2 * block, n).astype(int)
    if kind == 1:
        return [(int(s), int(s)) for s in steps]
    if kind == 2:  # across the border between the two top tiles
        return [(int(s), tile - block // 2) for s in steps]
    offsets = np.linspace(block // 4, 3 * block // 4, n).astype(int)  # across the corner
    return [(tile - int(o), tile - block + int(o)) for o in offsets]


def time_reads(read, corners: list[tuple[int, int]], block: int) -> tuple[float, list[np.ndarray]]:
    seconds, out = [], []
    for r, c in corners:
        started = time.perf_counter()
        out.append(read(r, c, block))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiles"
        folder.mkdir()
        tiles = write_tiles(folder, args.tile)
        write_vrt(Path(tmp) / "scene.vrt", tiles, args.tile)
        scene = open_item(str(folder), mosaic=True)
        vrt = rasterio.open(Path(tmp) / "scene.vrt")

        def read_index(r: int, c: int, b: int) -> np.ndarray:
            return scene.read((slice(r, r + b), slice(c, c + b)))

        def read_vrt(r: int, c: int, b: int) -> np.ndarray:
            return vrt.read(window=((r, r + b), (c, c + b)))

        for kind in (1, 2, 4):
            corners = windows(kind, args.tile, args.block, args.windows)
            t_vrt, by_vrt = time_reads(read_vrt, corners, args.block)
            t_index, by_index = time_reads(read_index, corners, args.block)
            assert all(np.array_equal(a, b) for a, b in zip(by_index, by_vrt, strict=True))
            results[f"{kind}_tiles"] = {
                "index_ms": round(1000 * t_index, 2),
                "vrt_ms": round(1000 * t_vrt, 2),
                "vrt_over_index": round(t_vrt / t_index, 2),
            }
            print(
                f"block {args.block}^2 touching {kind} tile(s): index {1000 * t_index:.1f} ms, "
                f"VRT {1000 * t_vrt:.1f} ms (VRT / index {t_vrt / t_index:.2f})"
            )
        vrt.close()
    print(json.dumps({"tile": args.tile, "block": args.block, **results}))


if __name__ == "__main__":
    main()

"""The README's scene figure: objects along tile borders, tiles as items against one scene.

The bundled aerial sample (tests/data/aerial/RGB.byte.tif) is cut into four tiles at row
360 and column 400 and segmented with configs/aerial.yaml twice: each tile as its own item
(as segflow did before scenes: its own Otsu threshold, objects cut at its edges), and the
four tiles as one scene (``input.mosaic: true``). The figure shows the same crop around
the tiles' common corner from both runs: objects in colours, tile borders in red. Prints
the object counts and how many objects of the scene cross a tile border.

    python benchmarks/figure_scene_border.py   # writes benchmarks/figures/scene-border.png
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import rasterio
import zarr
from affine import Affine

from segflow.config import load_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import open_item
from segflow.io.base import Reader

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "aerial" / "RGB.byte.tif"
OUT = ROOT / "benchmarks" / "figures" / "scene-border.png"
CUT = (360, 400)  # row, column where the tiles meet
CROP = 120  # half the side of the crop around the corner
ZOOM = 2


def write_tiles(folder: Path) -> list[tuple[int, int, Path]]:
    with rasterio.open(SAMPLE) as src:
        image, profile = src.read(), src.profile
    rows, cols = (0, CUT[0], image.shape[1]), (0, CUT[1], image.shape[2])
    tiles = []
    for r0, r1 in itertools.pairwise(rows):
        for c0, c1 in itertools.pairwise(cols):
            path = folder / f"tile_{r0}_{c0}.tif"
            part = {**profile, "height": r1 - r0, "width": c1 - c0}
            part["transform"] = profile["transform"] @ Affine.translation(c0, r0)
            with rasterio.open(path, "w", **part) as dst:
                dst.write(image[:, r0:r1, c0:c1])
            tiles.append((r0, c0, path))
    return tiles


def labels_of(reader: Reader, store: Path, pipeline: list, block: object) -> np.ndarray:
    with LocalExecutor(2) as executor:
        result = segment_item(reader, pipeline, store=str(store), block_shape=block,
                              executor=executor, ome=False)  # fmt: skip
    assert result.status == "done", result.error
    return np.asarray(zarr.open_group(store, mode="r")[f"{reader.info.id}/labels"][...])


def colour(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Objects in random colours over the dimmed grey image, tile borders in red."""
    grey = image.mean(axis=0)
    grey = np.clip((grey - np.percentile(grey, 2)) / np.ptp(grey) * 255, 0, 255) * 0.5
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    palette = np.random.default_rng(1).integers(60, 256, (int(labels.max()) + 1, 3))
    rgb[labels > 0] = palette[labels[labels > 0]]
    rgb[CUT[0] - 1 : CUT[0] + 1, :] = rgb[:, CUT[1] - 1 : CUT[1] + 1] = (255, 0, 0)
    return rgb


def main() -> None:
    config = load_config(ROOT / "configs" / "aerial.yaml")
    pipeline, block = config.pipeline, config.blocks.shape
    with tempfile.TemporaryDirectory() as tmp, rasterio.open(SAMPLE) as src:
        folder = Path(tmp) / "tiles"
        folder.mkdir()
        image = src.read()
        apart = np.zeros(image.shape[1:], dtype=np.int64)
        for r0, c0, path in write_tiles(folder):
            tile = labels_of(open_item(str(path)), Path(tmp) / f"{path.stem}.zarr", pipeline, block)
            tile = np.where(tile > 0, tile.astype(np.int64) + apart.max(), 0)
            apart[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]] = tile
        scene = labels_of(
            open_item(str(folder), mosaic=True), Path(tmp) / "s.zarr", pipeline, block
        )
    across = np.union1d(
        np.intersect1d(scene[CUT[0] - 1], scene[CUT[0]]),
        np.intersect1d(scene[:, CUT[1] - 1], scene[:, CUT[1]]),
    )
    print(f"tiles as 4 items: {len(np.unique(apart)) - 1} objects")
    count = len(np.unique(scene)) - 1
    print(f"one scene: {count} objects, {np.count_nonzero(across)} across a tile border")
    crop = (slice(CUT[0] - CROP, CUT[0] + CROP), slice(CUT[1] - CROP, CUT[1] + CROP))
    panels = [colour(labels, image)[crop] for labels in (apart, scene)]
    gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
    figure = np.concatenate([panels[0], gap, panels[1]], axis=1)
    figure = figure.repeat(ZOOM, axis=0).repeat(ZOOM, axis=1)
    OUT.parent.mkdir(exist_ok=True)
    iio.imwrite(OUT, figure)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""The README's "Boxes to masks" picture: boxes and the masks ``from_boxes`` makes of them.

Left, the bundled DSB2018 fluorescence sample (``tests/data/nuclei``) with the bounding
boxes of its human nucleus masks (yellow) and the outlines of the masks ``from_boxes``
makes from those boxes alone (magenta, default ``threshold`` method, 96 x 80 blocks);
right, the human masks' outlines (green) for comparison. Both at 2x.

Run: ``python benchmarks/figure_boxes.py`` (writes ``benchmarks/figures/boxes-nuclei.png``).
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from segflow import segment

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "nuclei" / "003cee89357d9fe1"
OUT = ROOT / "benchmarks" / "figures" / "boxes-nuclei.png"


def main() -> None:
    image = iio.imread(SAMPLE / "image.png")[..., :3]
    labels = tifffile.imread(SAMPLE / "labels.tif")
    boxes = [
        {"xmin": s[1].start, "ymin": s[0].start, "xmax": s[1].stop, "ymax": s[0].stop}
        for s in ndi.find_objects(labels)
    ]
    masks = segment(
        image, [{"op": "from_boxes", "boxes": boxes}], channel_axis=-1, block_shape=(96, 80)
    )
    grey = np.repeat(image.mean(axis=-1, keepdims=True), 3, axis=-1)
    grey = np.clip(grey * 255.0 / max(float(grey.max()), 1.0), 0, 255).astype(np.uint8)
    grey = np.kron(grey, np.ones((2, 2, 1), dtype=np.uint8))
    left, right = grey.copy(), grey.copy()
    yellow, magenta, green = (255, 220, 0), (255, 0, 255), (0, 255, 0)
    for box in boxes:
        # drawn just outside the box, so the mask's outline inside it stays visible
        y0, x0 = max(2 * box["ymin"] - 1, 0), max(2 * box["xmin"] - 1, 0)
        y1, x1 = min(2 * box["ymax"], left.shape[0] - 1), min(2 * box["xmax"], left.shape[1] - 1)
        left[[y0, y1], x0 : x1 + 1] = yellow
        left[y0 : y1 + 1, [x0, x1]] = yellow
    twice = np.ones((2, 2), dtype=np.uint32)
    left[find_boundaries(np.kron(masks, twice), mode="inner")] = magenta
    right[find_boundaries(np.kron(labels.astype(np.uint32), twice), mode="inner")] = green
    gap = np.full((left.shape[0], 8, 3), 255, dtype=np.uint8)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(OUT, np.concatenate([left, gap, right], axis=1))
    print(OUT)


if __name__ == "__main__":
    main()

"""The README's realism figure: real nuclei images beside synthetic ones.

Top row: 192^2 crops of the five DSB2018 images of ../shared/data (CC0, BBBC038; human
outlines in red below each), bottom rows: synthetic images of segflow.models.synthetic of
the same kinds (their exact outlines below each). Every image is shown as the model sees
it: the BT.601 luma of RGB, scaled between its 1st and 99.5th percentile (the nuclei models'
normalisation), with the RGB original for the stained ones.

    python benchmarks/figure_synthetic.py  # writes benchmarks/figures/synthetic-vs-real.png
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.segmentation import find_boundaries

from segflow.models.synthetic import synthetic_nuclei
from segflow.ops.intensity import to_luma

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "microscopy" / "dsb2018_nuclei"
OUT = Path(__file__).resolve().parent / "figures" / "synthetic-vs-real.png"
SIZE = 192
# (ImageId prefix, the synthetic kind that stands for it, a radius of that scale)
PAIRS = [
    ("003cee89", "fluorescence", 6.0),
    ("10ba6cbe", "fluorescence", 11.0),
    ("538b7673", "fluorescence", 5.0),
    ("00ae65c1", "stained", 9.0),
    ("091944f1", "brightfield", 22.0),
]


def _panel(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Two stacked RGB views, the second with the outlines, of a ``(c, y, x)`` image."""
    if image.shape[0] >= 3:
        view = np.moveaxis(image[:3].astype(float), 0, -1) / 255.0
    else:
        grey = to_luma(image)[0].astype(float)
        low, high = np.percentile(grey, [1, 99.5])
        view = np.repeat(np.clip((grey - low) / max(high - low, 1e-9), 0, 1)[..., None], 3, -1)
    outlined = view.copy()
    outlined[find_boundaries(labels)] = (1.0, 0.15, 0.15)
    return np.concatenate([view, outlined], axis=0)


def _real(prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    folders = sorted(DATA.glob(f"{prefix}*"))
    if not folders:
        return None
    image = np.moveaxis(iio.imread(folders[0] / "image.png")[..., :3], -1, 0)
    labels = iio.imread(folders[0] / "labels.tif")
    # the window with the most nuclei (the embryo's band is off-centre)
    starts = [
        (y, x)
        for y in range(0, max(1, labels.shape[0] - SIZE + 1), 32)
        for x in range(0, max(1, labels.shape[1] - SIZE + 1), 32)
    ]
    y0, x0 = max(
        starts, key=lambda s: np.unique(labels[s[0] : s[0] + SIZE, s[1] : s[1] + SIZE]).size
    )
    window = (slice(y0, y0 + SIZE), slice(x0, x0 + SIZE))
    return image[(slice(None), *window)], labels[window]


def main() -> None:
    real_row, synthetic_row = [], []
    for i, (prefix, kind, radius) in enumerate(PAIRS):
        real = _real(prefix)
        if real is None:
            raise SystemExit(f"needs {DATA} (../shared/data beside the project)")
        real_row.append(_panel(*real))
        image, labels = synthetic_nuclei((SIZE, SIZE), seed=[2026, i], kind=kind, radius=radius)  # type: ignore[arg-type]
        synthetic_row.append(_panel(image, labels))
    gap = np.ones((2 * SIZE, 4, 3))
    rows = [
        np.concatenate([p for panel in row for p in (panel, gap)][:-1], 1)
        for row in (real_row, synthetic_row)
    ]
    figure = np.concatenate([rows[0], np.ones((6, rows[0].shape[1], 3)), rows[1]], 0)
    OUT.parent.mkdir(exist_ok=True)
    iio.imwrite(OUT, (figure * 255).astype(np.uint8))
    print(OUT)


if __name__ == "__main__":
    main()

"""Boxes to masks: ``from_boxes`` against human nucleus masks, with the plain baseline.

The boxes are the bounding boxes of the human instance masks of DSB2018 stage1 images
(``/work/shared/data/microscopy/dsb2018_nuclei``, see its PROVENANCE.md; without it, the
bundled sample in ``tests/data/nuclei``). Each box's mask is scored by its IoU with the
human mask it came from. Three sides:

* baseline: per-box Otsu threshold of the grey image inside the box, the largest component
  (each box alone, no overlap rule);
* ``from_boxes`` with ``method: threshold`` (the default) and ``method: watershed``, run
  by ``segflow.segment`` in 128 x 128 blocks (the same labels as one block: tested).

The fluorescence images are the target set (mean IoU >= 0.82, IoU > 0.5 for >= 97 % of
boxes, pooled over their boxes); the stained and brightfield images are printed too (the
baseline's fixed polarity fails on dark nuclei). Prints a table, then, last, one JSON
object with the pooled fluorescence figures of every side.

``--held-out`` adds the figures nothing was chosen on: ``level`` chosen by leave-one-image-out
over the fluorescence images (the level that scores best on the other two, scored on the
third), and the default on two kinds never used for choosing, from ``/work/shared/data``:
SpaceNet 4 building footprints (panchromatic, off-nadir: roofs sit a few pixels off their
footprints) and ISBI 2012 EM cell interiors (slices 0-4, interiors of >= 50 px as instances).

Run: ``python benchmarks/bench_boxes.py`` (``--data DIR`` for another DSB2018 folder,
``--held-out`` for the held-out figures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import io
from skimage.filters import threshold_otsu

from segflow import segment

SHARED = Path("/work/shared/data/microscopy/dsb2018_nuclei")
BUNDLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "nuclei"
KINDS = {  # DSB2018 image id prefix -> modality (PROVENANCE.md)
    "003cee89357d9fe1": "fluorescence",
    "10ba6cbee4873b32": "fluorescence",
    "538b7673d507014d": "fluorescence",
    "00ae65c1c6631ae6": "stained",
    "091944f1d2611c91": "brightfield",
}


def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return io.imread(folder / "image.png")[..., :3], tifffile.imread(folder / "labels.tif")


def boxes_of(labels: np.ndarray) -> list[dict]:
    return [
        {"xmin": s[1].start, "ymin": s[0].start, "xmax": s[1].stop, "ymax": s[0].stop}
        for s in ndi.find_objects(labels)
        if s is not None
    ]


def baseline(image: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per-box Otsu on the grey image, the largest component; IoU per box."""
    grey = image.astype(np.float64).mean(axis=-1)
    ious = []
    for k, s in enumerate(ndi.find_objects(labels), start=1):
        if s is None:
            continue
        values = grey[s]
        mask = values > threshold_otsu(values) if np.ptp(values) else np.ones(values.shape, bool)
        parts, n = ndi.label(mask)
        if n:
            sizes = np.bincount(parts.ravel())
            sizes[0] = 0
            mask = parts == sizes.argmax()
        ref = labels[s] == k
        ious.append(float((mask & ref).sum() / (mask | ref).sum()))
    return ious


def from_boxes(
    image: np.ndarray, labels: np.ndarray, method: str, level: float = 0.75, fit: str = "level"
) -> list[float]:
    step = {"op": "from_boxes", "boxes": boxes_of(labels), "method": method, "level": level,
            "fit": fit}  # fmt: skip
    result = segment(image, [step], channel_axis=-1, block_shape=128)
    ids = [k for k, s in enumerate(ndi.find_objects(labels), start=1) if s is not None]
    return [
        float(((result == i) & (labels == k)).sum() / ((result == i) | (labels == k)).sum())
        for i, k in enumerate(ids, start=1)
    ]


def summary(ious: list[float]) -> dict:
    values = np.asarray(ious)
    return {
        "boxes": len(values),
        "mean_iou": round(float(values.mean()), 4),
        "over_0.5": round(float((values > 0.5).mean()), 4),
    }


def cross_validate(folders: list[Path], fit: str = "level") -> list[float]:
    """Leave one fluorescence image out: ``level`` chosen on the others, scored on it (with
    ``fit: box``, ``level`` only breaks ties between cuts that fill the box alike)."""
    levels = [round(float(x), 2) for x in np.arange(0.4, 1.001, 0.05)]
    images = {f.name[:16]: load(f) for f in folders if KINDS.get(f.name[:16]) == "fluorescence"}
    scores = {(n, v): from_boxes(*images[n], "threshold", v, fit) for n in images for v in levels}
    held: list[float] = []
    for name in images:
        others = [m for m in images if m != name]
        pooled = {v: float(np.mean(np.concatenate([scores[m, v] for m in others]))) for v in levels}
        best = max(levels, key=pooled.__getitem__)
        held.extend(scores[name, best])
        row = summary(scores[name, best])
        print(
            f"{name:18} fit {fit}, held out, level {best:.2f} chosen on the others: "
            f"{row['boxes']} boxes, mean IoU {row['mean_iou']:.3f}, IoU>0.5 {row['over_0.5']:.3f}"
        )
    return held


def other_kinds() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Building footprints (SpaceNet 4 pan) and EM cell interiors, as image and instances."""
    import rasterio
    from rasterio.features import rasterize
    from skimage.segmentation import relabel_sequential

    shared = SHARED.parents[1]
    tile = shared / "aerial" / "spacenet4_atlanta_buildings"
    with rasterio.open(tile / "sample_geotiff.tif") as dataset:
        pan, transform, shape = dataset.read(1), dataset.transform, dataset.shape
    features = json.loads((tile / "geotiff_labels.geojson").read_text())["features"]
    shapes = [(f["geometry"], k) for k, f in enumerate(features, start=1)]
    footprints = rasterize(shapes, out_shape=shape, transform=transform, dtype="uint16")
    kinds = {"buildings (pan)": [(pan[..., None], relabel_sequential(footprints)[0])]}
    em = shared / "microscopy" / "isbi2012_em"
    kinds["EM cells (5 slices)"] = []
    for z in range(5):
        interiors, _ = ndi.label(io.imread(em / "label" / f"{z}.png") > 127)
        keep = np.bincount(interiors.ravel()) >= 50
        keep[0] = False
        cells = relabel_sequential(np.where(keep[interiors], interiors, 0))[0]
        slice_ = io.imread(em / "image" / f"{z}.png")[..., None]
        kinds["EM cells (5 slices)"].append((slice_, cells))
    return kinds


def held_out() -> None:
    if not SHARED.exists():
        print(f"--held-out needs {SHARED.parents[1]}; skipped")
        return
    folders = sorted(p for p in SHARED.iterdir() if (p / "labels.tif").exists())
    for fit in ("level", "box"):
        pooled = summary(cross_validate(folders, fit))
        print(f"{'pooled':18} fit {fit}, held out by image: {json.dumps(pooled)}")
    kinds = other_kinds()
    for folder in folders:  # the kinds nothing was chosen on, under fit: box too
        if KINDS.get(folder.name[:16]) in ("stained", "brightfield"):
            kinds[KINDS[folder.name[:16]]] = [load(folder)]
    sides = {
        "baseline": baseline,
        "threshold": lambda i, lab: from_boxes(i, lab, "threshold"),
        "fit: box": lambda i, lab: from_boxes(i, lab, "threshold", fit="box"),
    }
    for kind, images in kinds.items():
        for name, side in sides.items():
            ious = [iou for image, labels in images for iou in side(image, labels)]
            print(f"{kind:20} {name:10} {json.dumps(summary(ious))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED if SHARED.exists() else BUNDLED)
    parser.add_argument("--held-out", action="store_true", help="also the held-out figures")
    args = parser.parse_args()
    if args.held_out:
        held_out()
    folders = sorted(p for p in args.data.iterdir() if (p / "labels.tif").exists())
    sides = {
        "baseline": baseline,
        "threshold": lambda i, lab: from_boxes(i, lab, "threshold"),
        "watershed": lambda i, lab: from_boxes(i, lab, "watershed"),
    }
    pooled: dict[str, dict[str, list[float]]] = {}
    print(f"data: {args.data}")
    print(
        f"{'image':18} {'kind':13} {'side':10} {'boxes':>5} {'mean IoU':>8} {'IoU>0.5':>8} {'s':>6}"
    )
    for folder in folders:
        kind = KINDS.get(folder.name[:16], "other")
        image, labels = load(folder)
        for name, side in sides.items():
            start = time.perf_counter()
            ious = side(image, labels)
            took = time.perf_counter() - start
            pooled.setdefault(kind, {}).setdefault(name, []).extend(ious)
            row = summary(ious)
            print(
                f"{folder.name[:16]:18} {kind:13} {name:10} {row['boxes']:5d} "
                f"{row['mean_iou']:8.3f} {row['over_0.5']:8.3f} {took:6.2f}"
            )
    for kind, by_side in pooled.items():
        for name, ious in by_side.items():
            row = summary(ious)
            print(
                f"{'pooled':18} {kind:13} {name:10} {row['boxes']:5d} "
                f"{row['mean_iou']:8.3f} {row['over_0.5']:8.3f}"
            )
    fluorescence = pooled.get("fluorescence", {})
    print(json.dumps({name: summary(ious) for name, ious in fluorescence.items()}))


if __name__ == "__main__":
    main()

"""What the ``crf`` step does to the shipped nuclei U-Net: AP50 and boundary IoU.

Four pipelines on every DSB2018 image with human masks (``/work/shared/data``; without
it, the bundled sample):

* shipped: ``configs/nuclei-unet.yaml``'s pipeline (the model's argmax classes);
* crf: the same with the model's ``output: probabilities`` refined by
  ``{op: crf, output: classes}`` (default parameters; the guide the step gets is the luma
  image, 0-255, what the phase starts from after the leading ``luma`` step): every
  class is a CRF label, the thin boundary class too;
* crf_fg5: the same with ``foreground: [1, 2]``: the CRF refines background against
  interior + boundary, and interior and boundary keep their ratio;
* crf_fg: that with ``iterations: 2``, the setting the README recommends for this model
  (chosen on these same five images, not on held-out ones).

Scores against the human instance masks: AP50 (``segflow.evaluate``'s matching: IoU > 0.5,
TP / (TP + FP + FN)) and the boundary IoU of the foreground (Cheng et al. 2021: the IoU of
the mask pixels within ``d = 2`` px of each mask's contour). Prints a table, then, last, one
JSON object with each pipeline's mean figures.

``--held-out`` scores the crf_fg choice out of sample instead: ``iterations`` 1, 2, 3 or 5
(with ``foreground: [1, 2]``) chosen on four images by their mean AP50 (ties to fewer
iterations), scored on the fifth, for each image in turn.

Run: ``python benchmarks/bench_crf.py`` (``--held-out`` for the leave-one-image-out figures).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml
from scipy import ndimage as ndi
from skimage import io

from segflow import segment
from segflow.evaluate import block_overlap, instance_scores

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data/microscopy/dsb2018_nuclei")
DATA = SHARED if SHARED.exists() else ROOT / "tests" / "data" / "nuclei"


def pipelines(variants: dict[str, dict] | None = None) -> dict[str, list[dict]]:
    config = yaml.safe_load((ROOT / "configs" / "nuclei-unet.yaml").read_text())
    shipped = [dict(step) for step in config["pipeline"]]
    for step in shipped:
        if step["op"] == "model":
            step["path"] = str(ROOT / "configs" / step["path"])
    runs = {"shipped": shipped}
    if variants is None:
        variants = {
            "crf": {},
            "crf_fg5": {"foreground": [1, 2]},
            "crf_fg": {"foreground": [1, 2], "iterations": 2},
        }
    for name, extra in variants.items():
        runs[name] = []
        for step in shipped:
            if step["op"] == "model":
                crf = {"op": "crf", "output": "classes", **extra}
                runs[name] += [{**step, "output": "probabilities"}, crf]
            else:
                runs[name].append(step)
    return runs


def boundary_iou(pred: np.ndarray, ref: np.ndarray, d: int = 2) -> float:
    """Boundary IoU of two masks: pixels of each within ``d`` of its own contour."""

    def band(mask: np.ndarray) -> np.ndarray:
        inside = ndi.distance_transform_edt(mask)
        return mask & (inside <= d)

    a, b = band(pred), band(ref)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def held_out() -> None:
    """Leave one image out: the crf's ``iterations`` chosen on the other four."""
    counts = (1, 2, 3, 5)
    runs = pipelines({f"fg{n}": {"foreground": [1, 2], "iterations": n} for n in counts})
    folders = sorted(p for p in DATA.iterdir() if (p / "labels.tif").exists())
    scores: dict[tuple[str, str], float] = {}
    for folder in folders:
        image, labels = io.imread(folder / "image.png"), tifffile.imread(folder / "labels.tif")
        for name, pipeline in runs.items():
            result = segment(image, pipeline, channel_axis=-1, block_shape=256)
            overlap = block_overlap(result, labels, instances=True)
            scores[folder.name, name] = float(instance_scores(overlap)["ap50"])
    chosen, shipped = [], []
    for folder in folders:
        others = [f.name for f in folders if f != folder]
        best = max(counts, key=lambda n: (np.mean([scores[o, f"fg{n}"] for o in others]), -n))
        chosen.append(scores[folder.name, f"fg{best}"])
        shipped.append(scores[folder.name, "shipped"])
        print(
            f"{folder.name[:16]:18} iterations {best} chosen on the others: "
            f"AP50 {chosen[-1]:.3f} (shipped {shipped[-1]:.3f})"
        )
    print(
        json.dumps(
            {
                "held_out_ap50": round(float(np.mean(chosen)), 4),
                "shipped_ap50": round(float(np.mean(shipped)), 4),
            }
        )
    )


def main() -> None:
    if "--held-out" in sys.argv[1:]:
        held_out()
        return
    runs = pipelines()
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    print(f"data: {DATA}")
    print(f"{'image':18} {'pipeline':9} {'AP50':>6} {'bIoU':>6} {'s':>6}")
    for folder in sorted(p for p in DATA.iterdir() if (p / "labels.tif").exists()):
        image = io.imread(folder / "image.png")
        labels = tifffile.imread(folder / "labels.tif")
        for name, pipeline in runs.items():
            start = time.perf_counter()
            result = segment(image, pipeline, channel_axis=-1, block_shape=256)
            took = time.perf_counter() - start
            ap50 = float(instance_scores(block_overlap(result, labels, instances=True))["ap50"])
            biou = boundary_iou(result > 0, labels > 0)
            rows[name].append((ap50, biou))
            print(f"{folder.name[:16]:18} {name:9} {ap50:6.3f} {biou:6.3f} {took:6.1f}")
    means = {
        name: {
            "ap50": round(float(np.mean([r[0] for r in values])), 4),
            "boundary_iou": round(float(np.mean([r[1] for r in values])), 4),
        }
        for name, values in rows.items()
    }
    print(json.dumps(means))


if __name__ == "__main__":
    main()

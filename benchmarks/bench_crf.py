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

Run: ``python benchmarks/bench_crf.py``.
"""

from __future__ import annotations

import json
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


def pipelines() -> dict[str, list[dict]]:
    config = yaml.safe_load((ROOT / "configs" / "nuclei-unet.yaml").read_text())
    shipped = [dict(step) for step in config["pipeline"]]
    for step in shipped:
        if step["op"] == "model":
            step["path"] = str(ROOT / "configs" / step["path"])
    runs = {"shipped": shipped}
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


def main() -> None:
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

"""The shipped flow model's post-processing levers, measured: AP50 and counts per setting.

The model runs once per image (``luma`` -> ``model`` with ``output: raw``, cached as
``.npy`` under ``--cache``); then ``flow_dynamics`` runs in-process on the cached flows for
every setting of the grid, and each result is scored as ``segflow evaluate`` scores an item
(``segflow.evaluate``: AP at IoU 0.5, matched / predicted / reference).

Two image sets:

``synthetic``
    Images drawn by the training config's own generator (``configs/train/nuclei-flows.yaml``:
    256^2, kinds fluorescence, fluorescence, brightfield, stained, radius 4-24, seed 0) at
    indices ``--first`` onwards, which neither training (0-159) nor the choice of the best
    epoch (160-167) saw. Defaults are chosen here.
``dsb``
    The five DSB2018 images of ``../shared/data`` (held out: scored, never chosen on).
``validation``
    The real validation images of a train config (``--train-config``, default
    ``configs/train/nuclei-dsb.yaml``: its ``data.validation`` stems, which chose the best
    epoch and were never trained on). Defaults of a model trained on real images are chosen
    here, never on ``dsb``.
``stardist``
    StarDist's own test image (``stardist/data/images/img2d.tif``, 512^2 uint16, and its 125
    human-labelled nuclei ``mask2d.tif``; a crop of DSB2018's 4dbbb275..., which no segflow
    training config uses): pass the folder holding both with ``--stardist-data`` (unzip them
    from a ``pip download stardist --no-deps`` wheel). An independent check, never chosen on.

    python benchmarks/sweep_flows.py --set synthetic --grid flow_threshold=0,0.4,0.6
    python benchmarks/sweep_flows.py --set dsb --grid cellprob_threshold=0,1,2 --model-set \
        "pixel_size=[2,2]"

Object size: ``--model-set diameter=D`` runs the model step at the objects' diameter ``D``
(item pixels; the step zooms by the card's 17 / ``D``). ``--auto-diameter`` estimates ``D``
per image as Cellpose's size model refines its estimate: the median equivalent diameter
``sqrt(4 area / pi)`` of the masks of a first pass at the item's own pixels (the shipped
``flow_dynamics`` setting), then runs the model at it (no zoom where the first pass finds no
mask); the estimates are printed. ``--oracle-diameter`` takes each image's diameter from its
reference masks instead: what a perfect estimate would reach, never a method or a default.

    python benchmarks/sweep_flows.py --set dsb --model-set diameter=20 --grid flow_threshold=0.5
    python benchmarks/sweep_flows.py --set synthetic --auto-diameter --grid flow_threshold=0.5

``--model`` scores another flow model folder (default: the shipped ``nuclei-flows``), e.g.
``--model configs/models/nuclei-dsb``.

Each row prints the mean AP50 over the set, then per image ``ap50 (predicted/reference)``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT.parent / "shared" / "data" / "microscopy" / "dsb2018_nuclei"
MODEL = ROOT / "configs" / "models" / "nuclei-flows"
BASE = {"op": "flow_dynamics", "niter": 200, "cellprob_threshold": 0.0, "min_size": 15}
#: The shipped config's flow_dynamics (configs/nuclei-flows.yaml): the first pass of
#: ``--auto-diameter``.
SHIPPED = {**BASE, "flow_threshold": 0.5}


def _dsb() -> list[tuple[str, np.ndarray, np.ndarray]]:
    import imageio.v3 as iio

    out = []
    for folder in sorted(DSB.glob("*")):
        image = np.moveaxis(iio.imread(folder / "image.png"), -1, 0)
        out.append((folder.name[:8], image, iio.imread(folder / "labels.tif")))
    if not out:
        sys.exit(f"no DSB2018 images under {DSB}")
    return out


def _stardist(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    import tifffile

    image, labels = folder / "img2d.tif", folder / "mask2d.tif"
    if not image.is_file() or not labels.is_file():
        sys.exit(f"--stardist-data {folder}: img2d.tif and mask2d.tif are not both there")
    return [("img2d", tifffile.imread(image)[np.newaxis], tifffile.imread(labels))]


def _validation(config: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from segflow.train_config import find_pairs, load_train_config, read_pairs

    train = load_train_config(config)
    keep = set(train.data.validation)
    pairs = [
        (image, reference)
        for image, reference in find_pairs(train.data)
        if Path(image).parent.name in keep or Path(image).name.split(".")[0] in keep
    ]
    if not pairs:
        sys.exit(f"--train-config {config}: no validation image found (data.validation)")
    read = read_pairs(pairs, channels=train.data.channels)
    return [
        (Path(image).name[:8], pixels, labels)
        for (image, _), (pixels, labels) in zip(pairs, read, strict=True)
    ]


def _synthetic(first: int, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from segflow.train_config import SyntheticData, synthetic_pairs

    spec = SyntheticData(
        count=160,
        validation=8,
        shape=[256, 256],
        kinds=["fluorescence", "fluorescence", "brightfield", "stained"],
        radius=[4, 24],
        seed=0,
    )
    pairs = synthetic_pairs(spec, "luma", first, count)
    kinds = spec.kinds
    return [
        (f"{kinds[(first + i) % len(kinds)][:5]}-{first + i}", image, labels)
        for i, (image, labels) in enumerate(pairs)
    ]


def _flows(
    name: str, image: np.ndarray, cache: Path, model_set: dict[str, Any], scale: float,
    model: Path = MODEL,
) -> np.ndarray:  # fmt: skip
    """The model's raw output ``(dY, dX, cellprob)`` for one image, cached. With ``scale``
    other than 1 the image is resized by it (bilinear, as Cellpose's ``diameter`` does),
    and the output resized back: an isotropic zoom keeps the flows' directions."""
    from skimage.transform import resize

    from segflow import segment

    tag = "-".join(f"{k}={v}" for k, v in sorted(model_set.items())).replace("/", "_")
    tag += f"-scale={scale}" if scale != 1 else ""
    tag += f"-model={model.name}-{_weights_digest(model)}" if model != MODEL else ""
    path = cache / f"{name}{'-' + tag if tag else ''}.npy"
    if path.exists():
        return np.load(path)
    shape = image.shape[1:]
    if scale != 1:
        size = tuple(max(round(n * scale), 2) for n in shape)
        image = resize(image.astype(np.float32), (image.shape[0], *size), order=1)
    step = {"op": "model", "path": str(model), "device": "cpu", "output": "raw", **model_set}
    flows = np.asarray(segment(image, [{"op": "luma"}, step], channel_axis=0, n_threads=1))
    if scale != 1:
        flows = resize(flows, (flows.shape[0], *shape), order=1)
    flows = flows.astype(np.float32)
    np.save(path, flows)
    return flows


def _weights_digest(model: Path) -> str:
    """A short digest of the model folder's files: the cache key of its outputs (training
    runs' folders are all named ``best``, so the name alone mixed models up)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def median_diameter(labels: np.ndarray) -> float | None:
    """The median equivalent diameter ``sqrt(4 area / pi)`` of the masks (Cellpose's
    ``utils.diameters``); None without masks."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(4 * areas / np.pi))) if areas.size else None


def _auto_flows(
    images: list[tuple[str, np.ndarray, np.ndarray]], cache: Path, model_set: dict[str, Any],
    max_travel: int, oracle: bool = False, model: Path = MODEL,
) -> list[np.ndarray]:  # fmt: skip
    """Each image's flows at the diameter its first pass's masks imply (``oracle``: its
    reference masks, the bound a perfect estimate would reach; never a method)."""
    from segflow import segment

    out = []
    for name, image, reference in images:
        first = _flows(name, image, cache, model_set, 1.0, model)
        step = {**SHIPPED, "max_travel": max_travel}
        labels = reference if oracle else segment(first, [step], channel_axis=0, n_threads=1)
        diameter = median_diameter(np.asarray(labels))
        print(f"# {name}: estimated diameter {diameter}", flush=True)
        if diameter is None:
            out.append(first)
            continue
        at = {**model_set, "diameter": round(diameter, 2)}
        out.append(_flows(name, image, cache, at, 1.0, model))
    return out


def _score(labels: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    from segflow.evaluate import block_overlap, instance_scores

    return instance_scores(block_overlap(labels, reference, instances=True))


def _grid(specs: list[str]) -> list[dict[str, Any]]:
    names, values = [], []
    for spec in specs:
        name, _, listed = spec.partition("=")
        names.append(name)
        values.append([json.loads(v) for v in listed.split(",")])
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--set", choices=("synthetic", "dsb", "validation", "stardist"), default="synthetic"
    )
    parser.add_argument(
        "--train-config", type=Path, default=ROOT / "configs" / "train" / "nuclei-dsb.yaml"
    )
    parser.add_argument("--model", type=Path, default=MODEL, help="a flow model folder")
    parser.add_argument("--stardist-data", type=Path, help="folder of img2d.tif, mask2d.tif")
    parser.add_argument("--first", type=int, default=1000, help="first synthetic index")
    parser.add_argument("--count", type=int, default=48, help="synthetic images")
    parser.add_argument("--cache", type=Path, default=ROOT / "outputs" / "sweep-flows")
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,...")
    parser.add_argument(
        "--model-set", action="append", default=[], help="model step parameter NAME=JSON"
    )
    parser.add_argument("--max-travel", type=int, default=160)
    parser.add_argument("--scale", type=float, default=1.0, help="zoom the image by this")
    parser.add_argument(
        "--auto-diameter", action="store_true", help="diameter from a first pass's masks"
    )
    parser.add_argument(
        "--oracle-diameter", action="store_true", help="diameter from the reference masks"
    )
    args = parser.parse_args()
    from segflow import segment

    args.cache.mkdir(parents=True, exist_ok=True)
    model_set = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.model_set)}
    if args.set == "stardist" and args.stardist_data is None:
        parser.error("--set stardist needs --stardist-data")
    images = (
        _dsb()
        if args.set == "dsb"
        else _stardist(args.stardist_data)
        if args.set == "stardist"
        else _validation(args.train_config)
        if args.set == "validation"
        else _synthetic(args.first, args.count)
    )
    model = args.model.resolve()
    if args.auto_diameter or args.oracle_diameter:
        flows = _auto_flows(
            images, args.cache, model_set, args.max_travel, args.oracle_diameter, model
        )
    else:
        flows = [
            _flows(n, image, args.cache, model_set, args.scale, model) for n, image, _ in images
        ]
    for setting in _grid(args.grid) or [{}]:
        step = {**BASE, "max_travel": args.max_travel, **setting}
        cells = []
        for (name, _, reference), field in zip(images, flows, strict=True):
            labels = segment(field, [step], channel_axis=0, n_threads=1)
            cells.append((name, _score(np.asarray(labels), reference)))
        mean = float(np.mean([s["ap50"] for _, s in cells]))
        if args.set != "synthetic":
            shown = " ".join(
                f"{n}:{s['ap50']:.3f}/{s['ap50_95']:.3f}"
                f"({s.get('matched', 0)}/{s['n_pred']}/{s['n_ref']})"
                for n, s in cells
            )
        else:  # the mean per kind, and the counts pooled
            kinds = sorted({n.split("-")[0] for n, _ in cells})
            shown = " ".join(
                f"{k}:{np.mean([s['ap50'] for n, s in cells if n.startswith(k)]):.3f}"
                f"({sum(s['n_pred'] for n, s in cells if n.startswith(k))}"
                f"/{sum(s['n_ref'] for n, s in cells if n.startswith(k))})"
                for k in kinds
            )
        print(f"{json.dumps(setting)} mean_ap50={mean:.3f} {shown}", flush=True)


if __name__ == "__main__":
    main()

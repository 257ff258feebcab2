"""Score a store's outputs against reference masks, block by block, without whole arrays.

Each block contributes small counts: the pixel overlap of every (prediction, reference) pair
of objects, the area of every object, and a confusion matrix of classes. Merged on the client,
they give exactly the whole-array scores:

* semantic (``mask``/``classes`` outputs, and the foreground of ``labels``): Dice and IoU per
  class, from the confusion matrix;
* instances (``labels`` outputs against a label image): a prediction and a reference object
  match at threshold ``t`` when their IoU exceeds ``t``; for ``t >= 0.5`` such a match is
  unique, so no assignment problem arises. ``AP@t = TP / (TP + FP + FN)`` — the average
  precision of the 2018 Data Science Bowl and of StarDist/Cellpose papers; ``ap50`` is at
  ``t = 0.5`` and ``ap50_95`` the mean over ``t = 0.50, 0.55, ..., 0.95``.

References are label or class images (any reader: TIFF, PNG, NIfTI, Zarr, GeoTIFF),
GeoJSON polygons rasterised onto the item's grid: one object per polygon when instances are
scored, class 1 (the mask's foreground) for a semantic output, or COCO JSON annotations
(polygons and RLE masks; :mod:`segflow.io.coco`): one object per annotation, or its
category for a semantic output. A reference image with one
value besides 0 (a 0/255 mask, as EM and building masks come) is a mask, not one object:
it is scored by Dice and IoU of the foreground (class 1), with a note that AP needs an
instance label image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segflow.engine.blocks import Box, plan_blocks
from segflow.engine.executor import Executor
from segflow.errors import EvaluationError
from segflow.io.base import ItemInfo

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass
class Overlap:
    """Additive counts of one block (or of the whole item, once merged)."""

    pairs: np.ndarray  # (m, 3) int64: prediction id, reference id, overlapping pixels
    pred_area: np.ndarray  # (p, 2) int64: prediction id, pixels
    ref_area: np.ndarray  # (r, 2) int64: reference id, pixels
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)  # (pred, ref) classes


def _counts(values: np.ndarray) -> np.ndarray:
    ids, counts = np.unique(values, return_counts=True)
    keep = ids != 0
    return np.stack([ids[keep], counts[keep]], axis=1).astype(np.int64)


def block_overlap(pred: np.ndarray, ref: np.ndarray, *, instances: bool) -> Overlap:
    """Counts of one block; ``pred`` and ``ref`` cover the same region."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    pred = pred.astype(np.int64, copy=False).ravel()
    ref = ref.astype(np.int64, copy=False).ravel()
    if instances:
        both = (pred != 0) & (ref != 0)
        key = np.stack([pred[both], ref[both]], axis=1)
        if len(key):
            uniq, counts = np.unique(key, axis=0, return_counts=True)
            pairs = np.column_stack([uniq, counts]).astype(np.int64)
        else:
            pairs = np.empty((0, 3), dtype=np.int64)
        pred_classes, ref_classes = (pred != 0).astype(np.int64), (ref != 0).astype(np.int64)
        return Overlap(pairs, _counts(pred), _counts(ref), _confusion(pred_classes, ref_classes))
    empty = np.empty((0, 3), dtype=np.int64)
    return Overlap(empty, empty[:, :2], empty[:, :2], _confusion(pred, ref))


def _confusion(pred: np.ndarray, ref: np.ndarray) -> dict[tuple[int, int], int]:
    key = np.stack([pred, ref], axis=1)
    uniq, counts = np.unique(key, axis=0, return_counts=True)
    return {(int(p), int(r)): int(c) for (p, r), c in zip(uniq, counts, strict=True)}


def merge_overlaps(parts: Sequence[Overlap]) -> Overlap:
    def group(arrays: list[np.ndarray], width: int) -> np.ndarray:
        data = np.concatenate(arrays) if arrays else np.empty((0, width), np.int64)
        if not len(data):
            return data.reshape(0, width)
        keys, inverse = np.unique(data[:, :-1], axis=0, return_inverse=True)
        sums = np.bincount(inverse.ravel(), weights=data[:, -1]).astype(np.int64)
        return np.column_stack([keys, sums])

    confusion: dict[tuple[int, int], int] = {}
    for part in parts:
        for key, count in part.confusion.items():
            confusion[key] = confusion.get(key, 0) + count
    return Overlap(
        group([p.pairs for p in parts], 3),
        group([p.pred_area for p in parts], 2),
        group([p.ref_area for p in parts], 2),
        confusion,
    )


def instance_scores(overlap: Overlap) -> dict[str, float | int]:
    """AP at each IoU threshold, matched count and object counts."""
    n_pred, n_ref = len(overlap.pred_area), len(overlap.ref_area)
    pred_area = dict(map(tuple, overlap.pred_area.tolist()))
    ref_area = dict(map(tuple, overlap.ref_area.tolist()))
    iou = np.array([c / (pred_area[p] + ref_area[r] - c) for p, r, c in overlap.pairs.tolist()])
    scores: dict[str, float | int] = {"n_pred": n_pred, "n_ref": n_ref}
    aps = []
    for t in THRESHOLDS:
        tp = int(np.count_nonzero(iou > t))
        denominator = n_pred + n_ref - tp  # TP + FP + FN
        ap = tp / denominator if denominator else 1.0
        aps.append(ap)
        if t == 0.5:
            scores["matched"] = tp
    scores["ap50"] = aps[0]
    scores["ap50_95"] = float(np.mean(aps))
    scores["count_error"] = n_pred - n_ref
    return scores


def semantic_scores(confusion: dict[tuple[int, int], int]) -> dict[str, float]:
    """Dice and IoU of every class present in the prediction or the reference (not 0)."""
    classes = sorted({c for key in confusion for c in key if c != 0})
    scores: dict[str, float] = {}
    for c in classes:
        tp = confusion.get((c, c), 0)
        pred = sum(n for (p, _), n in confusion.items() if p == c)
        ref = sum(n for (_, r), n in confusion.items() if r == c)
        scores[f"dice_{c}"] = 2 * tp / (pred + ref) if pred + ref else 1.0
        scores[f"iou_{c}"] = tp / (pred + ref - tp) if pred + ref - tp else 1.0
    return scores


class PolygonReference:
    """GeoJSON polygons rasterised onto an item's grid, read by window: one id per polygon
    (``instances``), or 1 inside any polygon (a semantic reference for a mask)."""

    def __init__(self, path: str, info: ItemInfo, *, instances: bool = True) -> None:
        if info.transform is None:
            raise ValueError(
                f"reference '{path}': polygons need a georeferenced item, "
                f"{info.id!r} has no transform"
            )
        self.path = path
        self.transform = info.transform
        features = json.loads(Path(path).read_text())["features"]
        self.shapes = [
            (f["geometry"], i + 1 if instances else 1)
            for i, f in enumerate(features)
            if f["geometry"]
        ]

    def read(self, region: Box) -> np.ndarray:
        from affine import Affine
        from rasterio.features import rasterize

        rows, cols = region
        a, b, c, d, e, f = self.transform[:6]
        window = Affine(a, b, c, d, e, f) @ Affine.translation(cols.start, rows.start)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        if not self.shapes:
            return np.zeros((1, *shape), dtype=np.int32)
        burned = rasterize(self.shapes, out_shape=shape, transform=window, dtype="int32")
        return burned[np.newaxis]


def open_reference(path: str, info: ItemInfo, *, instances: bool = True) -> Any:
    """A reader for a reference: label/class images through segflow's readers, GeoJSON
    polygons rasterised on the item's grid (one id each for ``instances``, else class 1),
    COCO JSON polygons and RLE masks of the item's image (one id per annotation for
    ``instances``, else its ``category_id``: :mod:`segflow.io.coco`).

    Raises
    ------
    EvaluationError
        When a reference image has another spatial shape than the item (checked once,
        before any block is read), or a COCO file has no image of the item's size for it.
    """
    if path.lower().endswith(VECTOR_SUFFIXES):
        from segflow.io.coco import CocoReference, is_coco

        if is_coco(path):
            return CocoReference(path, info, instances=instances)
        return PolygonReference(path, info, instances=instances)
    from segflow.io import open_item

    reader = open_item(path, f"reference-{info.id}")
    if tuple(reader.info.spatial_shape) != tuple(info.spatial_shape):
        raise EvaluationError(
            f"item {info.id!r}: reference '{path}' has shape {tuple(reader.info.spatial_shape)}, "
            f"the item has {tuple(info.spatial_shape)}"
        )
    return reader


def _overlap_task(prediction: Any, reference: Any, region: Box, *, instances: bool) -> Overlap:
    pred = prediction.read(region)
    ref = reference.read(region)
    ref = ref[0] if ref.ndim == pred.ndim + 1 else ref
    return block_overlap(pred, ref, instances=instances)


def evaluate_item(
    prediction: Any,
    reference: Any,
    shape: Sequence[int],
    *,
    instances: bool,
    executor: Executor,
    block_shape: Sequence[int] | int | None = None,
) -> dict[str, float | int | str]:
    """Scores of one item: ``prediction`` and ``reference`` read windows (``read(region)``).

    A reference with one value besides 0 is scored as a mask (Dice/IoU, no AP) and the
    scores carry an ``eval_note`` saying so.
    """
    # A reader's own shape (open_reference's readers have one) is checked before any block.
    reference_info = getattr(reference, "info", None)
    if reference_info is not None and tuple(reference_info.spatial_shape) != tuple(shape):
        raise EvaluationError(
            f"the reference has shape {tuple(reference_info.spatial_shape)}, the item has "
            f"{tuple(shape)}"
        )
    grid = plan_blocks(tuple(shape), block_shape)
    regions = [b.core for b in grid.blocks()]
    parts = executor.gather(
        executor.map(
            _overlap_task,
            [prediction] * len(regions),
            [reference] * len(regions),
            regions,
            instances=instances,
        )
    )
    merged = merge_overlaps(parts)
    ref_values = sorted({r for _, r in merged.confusion if r != 0})
    if instances and len(merged.ref_area) == 1:
        # One reference "object" covering every non-zero pixel: a binary mask (or an image
        # with one object, which is the same picture). Its AP would compare every predicted
        # object with the whole mask: score the foreground instead, and say so.
        value = int(merged.ref_area[0, 0])
        scores: dict[str, float | int | str] = dict(semantic_scores(merged.confusion))
        scores["eval_note"] = _mask_note(value, "scored as a mask: Dice/IoU of the foreground")
        return scores
    pred_values = {p for p, _ in merged.confusion if p != 0}
    if not instances and len(ref_values) == 1 and ref_values[0] != 1 and pred_values <= {1}:
        value = ref_values[0]  # a 0/255 mask against a mask output (0/1): 255 is class 1
        confusion = {(p, 1 if r == value else r): n for (p, r), n in merged.confusion.items()}
        scores = dict(semantic_scores(confusion))
        scores["eval_note"] = _mask_note(value, "scored as class 1 (the foreground)")
        return scores
    scores = dict(semantic_scores(merged.confusion))
    if instances:
        scores.update(instance_scores(merged))
    return scores


def _mask_note(value: int, how: str) -> str:
    return (
        f"the reference has one value besides 0 ({value}), a mask: {how}; AP needs an "
        "instance label image (one id per object)"
    )


VECTOR_SUFFIXES = (".geojson", ".json")  # polygons, rasterised on the item's grid


def made_by(rows: Sequence[Mapping[str, Any]], config_name: str) -> list[Mapping[str, Any]]:
    """The ``done`` index ``rows`` that config ``config_name`` made (rows from before
    segflow recorded the config's name count as its own: the store had one config then).

    Examples
    --------
    >>> rows = [{"id": "a", "status": "done", "config_name": "nuclei"},
    ...         {"id": "b", "status": "done", "config_name": "unet"},
    ...         {"id": "c", "status": "failed", "config_name": "nuclei"}]
    >>> [row["id"] for row in made_by(rows, "nuclei")]
    ['a']
    """
    return [
        row
        for row in rows
        if row.get("status") == "done" and row.get("config_name") in (None, "", config_name)
    ]


def find_references(reference: str, base: Path | None = None) -> list[str]:
    """Reference files named by a file, a folder (searched recursively) or a glob: what a
    reader of the registry takes (:mod:`segflow.io.registry`), and GeoJSON."""
    import glob

    from segflow.io.registry import claimed_suffixes, folder_suffixes

    path = Path(reference)
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_file() or path.name.lower().endswith(folder_suffixes()):
        return [str(path)]
    if path.is_dir():
        suffixes = (*claimed_suffixes(), *VECTOR_SUFFIXES)
        found = [p for p in path.rglob("*") if p.name.lower().endswith(suffixes)]
        return sorted(str(p) for p in found)
    return sorted(glob.glob(str(path), recursive=True))


def match_references(items: Sequence[tuple[str, str]], references: Sequence[str]) -> dict[str, str]:
    """Pair items ``(id, source path)`` with reference files: same stem as the item's
    source, then the item id, then the only reference in the source's folder; a lone
    GeoJSON reference (vectors in map coordinates: a city's footprints, say) serves every
    item left, and a lone raster reference a lone item.

    Examples
    --------
    >>> match_references([("a", "x/a.tif"), ("b", "y/b.tif")], ["refs/city.geojson"])
    {'a': 'refs/city.geojson', 'b': 'refs/city.geojson'}
    >>> match_references([("a", "x/a.tif")], ["refs/mask.tif"])
    {'a': 'refs/mask.tif'}
    >>> match_references([("a", "x/a.tif"), ("b", "y/b.tif")], ["refs/mask.tif"])
    {}
    """
    by_stem: dict[str, str] = {}
    by_folder: dict[str, list[str]] = {}
    for path in references:
        stem = Path(path).name.split(".")[0]
        by_stem.setdefault(stem, path)
        by_folder.setdefault(str(Path(path).resolve().parent), []).append(path)
    matched = {}
    for item_id, source in items:
        stem = Path(source).name.split(".")[0]
        folder = by_folder.get(str(Path(source).resolve().parent), [])
        if stem in by_stem and by_stem[stem] != source:
            matched[item_id] = by_stem[stem]
        elif item_id in by_stem:
            matched[item_id] = by_stem[item_id]
        elif len(folder) == 1:
            matched[item_id] = folder[0]
        elif len(references) == 1 and (
            references[0].lower().endswith(VECTOR_SUFFIXES) or len(items) == 1
        ):
            matched[item_id] = references[0]
    return matched


def split_coco_matches(
    matched: Mapping[str, str], sources: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """``matched`` (item id -> reference) without the items whose COCO reference has no
    image for them (they have no reference), and one line per COCO file naming its images
    that no item of ``sources`` (item id -> source path) is. An item that two images match
    stays: scoring it reports that, for that item alone.
    """
    from segflow.io.coco import is_coco, load_coco, match_image, unmatched_line

    kept, lines = dict(matched), []
    for path in sorted(set(matched.values())):
        if not is_coco(path):
            continue
        coco = load_coco(path)
        used = set()
        for item_id, source in sources.items():
            try:
                image = match_image(coco, item_id, source)
            except EvaluationError:
                continue  # ambiguous: the item's score says so
            if image is not None:
                used.add(image.id)
            elif kept.get(item_id) == path:
                del kept[item_id]
        if extra := [i.file_name for i in coco.images if i.id not in used]:
            lines.append(unmatched_line(path, extra))
    return kept, lines

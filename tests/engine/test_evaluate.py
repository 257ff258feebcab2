"""Blockwise scores equal scores computed on the whole arrays by brute force."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize
from rasterio.transform import Affine
from scipy import ndimage as ndi

from segflow.engine.executor import LocalExecutor
from segflow.errors import EvaluationError
from segflow.evaluate import (
    THRESHOLDS,
    PolygonReference,
    evaluate_item,
    match_references,
    open_reference,
)
from segflow.io import ArrayReader

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Array:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.array[region]


def brute_force(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    pred_ids = [i for i in np.unique(pred) if i]
    ref_ids = [i for i in np.unique(ref) if i]
    iou = np.zeros((len(pred_ids), len(ref_ids)))
    for a, p in enumerate(pred_ids):
        for b, r in enumerate(ref_ids):
            inter = np.sum((pred == p) & (ref == r))
            iou[a, b] = inter / np.sum((pred == p) | (ref == r))
    aps = []
    for t in THRESHOLDS:
        tp = int(np.sum(iou > t))
        total = len(pred_ids) + len(ref_ids) - tp
        aps.append(tp / total if total else 1.0)
    fg_tp = np.sum((pred > 0) & (ref > 0))
    fg = (pred > 0).sum() + (ref > 0).sum()
    return {"ap50": aps[0], "ap50_95": float(np.mean(aps)), "dice_1": 2 * fg_tp / fg}


@SETTINGS
@given(st.integers(8, 40), st.integers(8, 40), st.integers(0, 2**32 - 1), st.data())
def test_instance_scores_equal_brute_force(h: int, w: int, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    ref, _ = ndi.label(ndi.gaussian_filter(rng.random((h, w)), 1.5) > 0.5)
    noisy = ndi.gaussian_filter(rng.random((h, w)), 1.5) * 0.3 + (ref > 0) * 0.6
    pred, _ = ndi.label(noisy > 0.55)
    if not pred.any() or ref.max() < 2:
        return  # a reference with one object is a mask: see the test below
    blocks = (data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    with LocalExecutor(2) as executor:
        scores = evaluate_item(
            _Array(pred), _Array(ref), (h, w), instances=True, executor=executor,
            block_shape=blocks,
        )  # fmt: skip
    expected = brute_force(pred, ref)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-12), key
    assert scores["n_pred"] == pred.max() and scores["n_ref"] == ref.max()


def test_semantic_scores_per_class() -> None:
    pred = np.array([[1, 1, 2, 2], [0, 1, 2, 0]])
    ref = np.array([[1, 2, 2, 2], [0, 1, 0, 0]])
    with LocalExecutor(2) as executor:
        scores = evaluate_item(
            _Array(pred), _Array(ref), (2, 4), instances=False, executor=executor, block_shape=1
        )
    assert scores["dice_1"] == pytest.approx(2 * 2 / (3 + 2))
    assert scores["iou_2"] == pytest.approx(2 / 4)


def test_a_binary_reference_is_scored_as_a_mask_with_a_note() -> None:
    """A 0/255 reference (EM, building masks) is not one object: labels are scored by the
    Dice/IoU of their foreground, a mask output against 255 as class 1, and AP is left out
    with a note that it needs instance labels."""
    ref = np.zeros((12, 16), dtype=np.uint8)
    ref[1:5, 1:6] = ref[7:11, 8:15] = 255
    labels = np.zeros((12, 16), dtype=np.int32)
    labels[1:5, 1:5], labels[7:11, 8:12], labels[7:11, 12:15] = 1, 2, 3  # 4 px missed
    dice = 2 * (ref > 0)[labels > 0].sum() / ((ref > 0).sum() + (labels > 0).sum())
    with LocalExecutor(2) as executor:
        as_labels = evaluate_item(
            _Array(labels), _Array(ref), ref.shape, instances=True, executor=executor,
            block_shape=5,
        )  # fmt: skip
        as_mask = evaluate_item(
            _Array((labels > 0).astype(np.uint8)), _Array(ref), ref.shape, instances=False,
            executor=executor, block_shape=5,
        )  # fmt: skip
        one_class = evaluate_item(  # a class map against a reference of the same one class
            _Array((labels > 0) * np.uint8(3)), _Array((ref > 0) * np.uint8(3)), ref.shape,
            instances=False, executor=executor,
        )  # fmt: skip

    note = (
        r"the reference has one value besides 0 \(255\), a mask: .*; AP needs an instance "
        r"label image \(one id per object\)"
    )
    for scores in (as_labels, as_mask):
        assert scores["dice_1"] == pytest.approx(dice)
        assert "ap50" not in scores and "dice_255" not in scores
        assert re.fullmatch(note, str(scores["eval_note"]))
    assert one_class == {"dice_3": pytest.approx(dice), "iou_3": pytest.approx(dice / (2 - dice))}


def test_a_reference_of_another_shape_is_refused_naming_both_shapes(tmp_path) -> None:
    """Checked once per item, before any block is read: not a slice error of a block."""
    import tifffile

    path = tmp_path / "refs" / "tile.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, np.zeros((100, 100), dtype=np.uint8))
    item = ArrayReader(np.zeros((512, 512), dtype=np.uint8), "tile").info

    with pytest.raises(
        EvaluationError,
        match=re.escape(
            f"item 'tile': reference '{path}' has shape (100, 100), the item has (512, 512)"
        ),
    ):
        open_reference(str(path), item)

    reference = ArrayReader(np.zeros((100, 100), dtype=np.uint8), "reference-tile")
    with (
        LocalExecutor(1) as executor,
        pytest.raises(
            EvaluationError,
            match=re.escape("the reference has shape (100, 100), the item has (512, 512)"),
        ),
    ):
        evaluate_item(
            _Array(np.zeros((512, 512), np.int32)), reference, (512, 512), instances=True,
            executor=executor, block_shape=256,
        )  # fmt: skip


def test_polygon_references_are_rasterised_on_the_item_grid(tmp_path) -> None:
    transform = Affine(0.5, 0, 100.0, 0, -0.5, 200.0)

    def square(x0: float, y0: float, x1: float, y1: float) -> dict[str, object]:
        ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        return {"type": "Polygon", "coordinates": [ring]}

    squares = [square(101, 199, 104, 196), square(105, 195, 107, 190)]
    path = tmp_path / "buildings.geojson"
    features = [{"type": "Feature", "properties": {}, "geometry": g} for g in squares]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    reader = ArrayReader(np.zeros((30, 20), dtype=np.uint8), "tile")
    info = dataclasses.replace(reader.info, transform=tuple(transform)[:6])
    reference = PolygonReference(str(path), info)
    whole = rasterize([(g, i + 1) for i, g in enumerate(squares)], out_shape=(30, 20),
                      transform=transform, dtype="int32")  # fmt: skip
    pieces = np.zeros_like(whole)
    for rows in (slice(0, 7), slice(7, 30)):
        for cols in (slice(0, 9), slice(9, 20)):
            pieces[rows, cols] = reference.read((rows, cols))[0]
    np.testing.assert_array_equal(pieces, whole)
    assert set(np.unique(whole)) == {0, 1, 2}
    # A mask is scored against the union of the polygons (class 1), not polygon 1 alone.
    semantic = PolygonReference(str(path), info, instances=False)
    np.testing.assert_array_equal(semantic.read((slice(0, 30), slice(0, 20)))[0], whole > 0)
    with LocalExecutor(1) as executor:
        scores = evaluate_item(
            _Array((whole > 0).astype(np.uint8)),
            semantic,
            (30, 20),
            instances=False,
            executor=executor,
            block_shape=7,
        )
    assert scores == {"dice_1": 1.0, "iou_1": 1.0}


def test_references_match_by_stem_id_or_folder(tmp_path) -> None:
    items = [
        ("a_image", f"{tmp_path}/a/image.png"),
        ("tile_7", f"{tmp_path}/images/tile_7.tif"),
        ("scan", f"{tmp_path}/ct/scan.nii.gz"),
    ]
    references = [
        f"{tmp_path}/a/labels.tif",
        f"{tmp_path}/masks/tile_7.geojson",
        f"{tmp_path}/masks/scan.nii.gz",
    ]
    assert match_references(items, references) == {
        "a_image": references[0],
        "tile_7": references[1],
        "scan": references[2],
    }

"""COCO JSON as references: RLE decoding equal to pycocotools', CVAT-structured files read
back to the masks they were made from, scores equal to those against the label image,
and one line for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import shapely
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask
from rasterio.features import shapes

from segflow.config import load_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import ConfigError, EvaluationError
from segflow.evaluate import evaluate_item, open_reference, split_coco_matches
from segflow.io import open_item
from segflow.io.coco import CocoReference, decode_counts, encode_rle, is_coco, rle_segments
from segflow.store.layout import ZarrRegionWriter
from segflow.train_config import coco_extra_lines, find_pairs, parse_train_config, read_pairs

DATA = Path(__file__).parents[1] / "data"
NUCLEI = DATA / "nuclei" / "003cee89357d9fe1"
CONFIGS = Path(__file__).parents[2] / "configs"


def _compressed(mask: np.ndarray) -> str:
    """pycocotools' compressed RLE string of ``mask``."""
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_rle_codec_equals_pycocotools(mask: np.ndarray) -> None:
    counts = encode_rle(mask, (0, 0), mask.shape)
    assert decode_counts(_compressed(mask)) == counts
    back = np.zeros(mask.shape, bool)
    for column, top, bottom in rle_segments(counts, mask.shape[0]).tolist():
        back[top:bottom, column] = True
    np.testing.assert_array_equal(back, mask)


def cvat_coco(images: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """A COCO file as CVAT's "COCO 1.0" export writes it: polygons (float lists, one per
    part) with ``iscrowd`` 0, masks as uncompressed RLE with ``iscrowd`` 1 (every third
    object, and every object with a hole), here and there pycocotools' compressed RLE."""
    document: dict[str, Any] = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "",
                 "version": "", "year": ""},
        "categories": [{"id": 1, "name": "nucleus", "supercategory": ""}],
        "images": [],
        "annotations": [],
    }  # fmt: skip
    for image_id, (name, labels) in enumerate(images, start=1):
        height, width = labels.shape
        document["images"].append(
            {"id": image_id, "width": width, "height": height, "file_name": name, "license": 0,
             "flickr_url": "", "coco_url": "", "date_captured": 0}
        )  # fmt: skip
        for value in np.unique(labels[labels > 0]).tolist():
            mask = labels == value
            parts = [shapely.geometry.shape(g) for g, _ in shapes(mask.astype(np.uint8), mask)]
            k = len(document["annotations"]) + 1
            entry: dict[str, Any] = {
                "id": k,
                "image_id": image_id,
                "category_id": 1,
                "area": float(mask.sum()),
                "attributes": {"occluded": False},
            }
            if k % 3 == 0 or any(p.interiors for p in parts):
                counts: Any = (
                    _compressed(mask) if k % 5 == 0 else encode_rle(mask, (0, 0), mask.shape)
                )
                entry.update(segmentation={"counts": counts, "size": [height, width]}, iscrowd=1)
            else:
                rings = [np.asarray(p.exterior.coords)[:-1].ravel().tolist() for p in parts]
                entry.update(segmentation=rings, iscrowd=0)
            rows, cols = np.nonzero(mask)
            entry["bbox"] = [float(cols.min()), float(rows.min()),
                             float(np.ptp(cols) + 1), float(np.ptp(rows) + 1)]  # fmt: skip
            document["annotations"].append(entry)
    return document


def _nuclei_labels() -> np.ndarray:
    return tifffile.imread(NUCLEI / "labels.tif")


def _write(path: Path, document: dict[str, Any]) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_cvat_coco_reads_back_as_the_labels(tmp_path: Path) -> None:
    labels = _nuclei_labels()
    document = cvat_coco([("003cee89357d9fe1/image.png", labels), ("other/image.png", labels)])
    assert {a["iscrowd"] for a in document["annotations"]} == {0, 1}
    assert any(isinstance(a["segmentation"].get("counts"), str)
               for a in document["annotations"] if a["iscrowd"])  # fmt: skip
    path = _write(tmp_path / "annotations.json", document)
    assert is_coco(path)
    info = open_item(str(NUCLEI / "image.png")).info
    reference = open_reference(path, info)
    assert isinstance(reference, CocoReference)
    whole = reference.read((slice(0, labels.shape[0]), slice(0, labels.shape[1])))[0]
    values = np.unique(labels[labels > 0])
    # Annotation k (file order) is object values[k - 1] of the label image.
    np.testing.assert_array_equal(whole, np.searchsorted(values, labels) + 1 - (labels == 0))
    window = reference.read((slice(37, 101), slice(120, 171)))[0]
    np.testing.assert_array_equal(window, whole[37:101, 120:171])
    full = (slice(0, labels.shape[0]), slice(0, labels.shape[1]))
    semantic = CocoReference(path, info, instances=False).read(full)
    np.testing.assert_array_equal(semantic[0], (labels > 0).astype(np.int64))


@pytest.fixture(scope="module")
def nuclei_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("nuclei") / "nuclei.zarr"
    pipeline = load_config(CONFIGS / "nuclei.yaml").pipeline
    reader = open_item(str(NUCLEI / "image.png"))
    result = segment_item(
        reader, pipeline, store=str(store), block_shape=(128, 128), executor=LocalExecutor(2)
    )
    assert result.status == "done", result.error
    return store


# The reference labels.tif has no geotransform: rasterio warns when it is read (from a
# worker thread, so whether the warning reaches this test depends on the order of reads).
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_evaluate_scores_a_cvat_coco_file_as_the_label_image(
    nuclei_store: Path, tmp_path: Path
) -> None:
    labels = _nuclei_labels()
    path = _write(tmp_path / "refs.json", cvat_coco([("nuclei/image.png", labels)]))
    info = open_item(str(NUCLEI / "image.png")).info

    def scores(reference: str) -> dict[str, Any]:
        with LocalExecutor(2) as executor:
            return evaluate_item(
                ZarrRegionWriter(str(nuclei_store), info.id, "labels"),
                open_reference(reference, info), info.spatial_shape, instances=True,
                executor=executor, block_shape=(100, 100),
            )  # fmt: skip

    from_coco = scores(path)
    assert from_coco == scores(str(NUCLEI / "labels.tif"))
    assert from_coco["n_ref"] == 36


def test_coco_images_and_items_that_do_not_match(tmp_path: Path) -> None:
    labels = _nuclei_labels()
    entries = [("003cee89357d9fe1/image.png", labels), ("b.png", labels), ("c.png", labels)]
    path = _write(tmp_path / "refs.json", cvat_coco(entries))
    sources = {"image": str(NUCLEI / "image.png"), "lone": "/data/lone.png"}
    kept, lines = split_coco_matches({"image": path, "lone": path}, sources)
    assert kept == {"image": path}  # "lone" has no image in the file: no reference
    assert lines == [f"COCO file '{path}': 2 image(s) not in the collection: b.png, c.png"]

    small = _write(tmp_path / "small.json", cvat_coco([("image.png", labels[:50])]))
    info = open_item(str(NUCLEI / "image.png")).info
    with pytest.raises(EvaluationError) as error:
        open_reference(small, info)
    assert str(error.value) == (
        f"item 'image': COCO file '{small}' gives image 'image.png' height x width 50 x 256, "
        "the image is 256 x 256"
    )
    twice = _write(tmp_path / "twice.json", cvat_coco([("image.png", labels)] * 2))
    with pytest.raises(EvaluationError, match=r"item 'image': 2 images of COCO file .* match its"):
        open_reference(twice, info)
    with pytest.raises(EvaluationError, match=r"item 'image': COCO file .* has no image for it"):
        open_reference(_write(tmp_path / "none.json", cvat_coco([("x.png", labels)])), info)
    document = cvat_coco([("image.png", labels)])
    document["annotations"][2]["segmentation"]["size"] = [10, 10]
    with pytest.raises(
        EvaluationError, match=r"an RLE mask of image 'image.png' has size \[10, 10\]"
    ):
        open_reference(_write(tmp_path / "rle.json", document), info)
    document["annotations"][0]["image_id"] = 7
    with pytest.raises(EvaluationError, match=r"annotation 1 names image_id 7, which the file's"):
        open_reference(_write(tmp_path / "id.json", document), info)


def test_geojson_is_not_taken_for_coco(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", {"type": "FeatureCollection", "features": []})
    assert not is_coco(path)


def test_train_reads_coco_references(tmp_path: Path) -> None:
    labels = _nuclei_labels()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        iio.imwrite(tmp_path / name / "image.png", (labels > 0).astype(np.uint8) * 200)
    entries = [("a/image.png", labels), ("b/image.png", labels), ("c/image.png", labels)]
    _write(tmp_path / "annotations.json", cvat_coco(entries))
    model = {"architecture": {"name": "segnet"}, "spatial_dims": 2, "channels": [{"name": "x"}],
             "head": "foreground_boundary", "tile": [16, 16]}  # fmt: skip
    data = {"images": "*/image.png", "references": "annotations.json"}
    config = parse_train_config({"data": data, "model": model, "output": "out"}, base_dir=tmp_path)
    pairs = find_pairs(config.data)
    assert [Path(i).parent.name for i, _ in pairs] == ["a", "b"]
    [(_, first), _] = read_pairs(pairs)
    values = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(first, np.searchsorted(values, labels) + 1 - (labels == 0))
    reference = str(tmp_path / "annotations.json")
    assert coco_extra_lines(pairs) == [
        f"COCO file '{reference}': 1 image(s) not in the collection: c/image.png"
    ]
    iio.imwrite(tmp_path / "b" / "image.png", np.zeros((20, 20), np.uint8))
    (tmp_path / "d").mkdir()
    iio.imwrite(tmp_path / "d" / "image.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ConfigError) as error:
        find_pairs(config.data)
    b, d = (str(tmp_path / n / "image.png") for n in "bd")
    assert len(error.value.problems) == 2
    assert error.value.problems[0] == (
        f"data.references: image {b!r}: item 'image': COCO file '{reference}' gives image "
        "'b/image.png' height x width 256 x 256, the image is 20 x 20"
    )
    assert error.value.problems[1] == (
        f"data.references: image {d!r}: item 'image': 3 images of COCO file '{reference}' match "
        f"its source '{d}' ('a/image.png', 'b/image.png', 'c/image.png'): give the images "
        "distinct file names (with their folders)"
    )
    iio.imwrite(tmp_path / "b" / "image.png", (labels > 0).astype(np.uint8))
    (tmp_path / "d" / "image.png").rename(tmp_path / "d" / "other.png")
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"images": str(tmp_path / "*/*.png")})}
    )
    with pytest.raises(ConfigError) as error:
        find_pairs(config.data)
    other = str(tmp_path / "d" / "other.png")
    assert error.value.problems == [
        f"data.references: image {other!r}: item 'other': COCO file '{reference}' has no image "
        f"for it (source '{other}')"
    ]

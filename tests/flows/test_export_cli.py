"""``segflow export`` on a real store, and COCO files as ``segflow evaluate`` and
``segflow train`` references through the command line (real Prefect, real Dask)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import tifffile
import yaml
from rasterio.features import shapes
from typer.testing import CliRunner

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.flows.cli import app
from segflow.io import ArrayReader

CONFIGS = Path(__file__).parents[2] / "configs"
NUCLEI = Path(__file__).parents[1] / "data" / "nuclei" / "003cee89357d9fe1"
runner = CliRunner()


def coco_of(images: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """COCO JSON of label images as an annotation tool writes it: one polygon annotation
    per object (its outline's pixel corners)."""
    document: dict[str, Any] = {"images": [], "annotations": [],
                                "categories": [{"id": 1, "name": "nucleus"}]}  # fmt: skip
    for image_id, (name, labels) in enumerate(images, start=1):
        height, width = labels.shape
        document["images"].append(
            {"id": image_id, "file_name": name, "width": width, "height": height}
        )
        for value in np.unique(labels[labels > 0]).tolist():
            mask = labels == value
            parts = [shapely.geometry.shape(g) for g, _ in shapes(mask.astype(np.uint8), mask)]
            rows, cols = np.nonzero(mask)
            document["annotations"].append(
                {"id": len(document["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                 "segmentation": [np.asarray(p.exterior.coords).ravel().tolist() for p in parts],
                 "area": float(mask.sum()), "iscrowd": 0,
                 "bbox": [float(cols.min()), float(rows.min()), float(np.ptp(cols) + 1),
                          float(np.ptp(rows) + 1)]}
            )  # fmt: skip
    return document


def test_export_writes_each_format_and_refuses_in_one_line(tmp_path: Path) -> None:
    image = np.zeros((40, 70), np.float32)
    image[5:20, 5:30] = image[25:35, 40:65] = 1
    store = tmp_path / "s.zarr"
    result = segment_item(
        ArrayReader(image, item_id="tile"),
        [{"op": "threshold", "value": 0.5}, {"op": "label"}],
        store=str(store), block_shape=16, chunks=(16, 16), executor=LocalExecutor(1),
    )  # fmt: skip
    assert result.status == "done", result.error

    cog = runner.invoke(app, ["export", str(store), "--format", "cog", "--tile", "32"])
    assert cog.exit_code == 0, cog.output
    path = tmp_path / "s.cog" / "tile.labels.tif"
    assert cog.stdout == f"tile labels -> {path} (70 x 40, overviews 2 4, no CRS)\n"
    with rasterio.open(path) as dataset:
        assert dataset.read(1).max() == 2 and dataset.block_shapes == [(32, 32)]
    coco = runner.invoke(app, ["export", str(store), "--format", "coco", "--tolerance", "1"])
    assert coco.exit_code == 0, coco.output
    assert coco.stdout == (
        f"2 objects of 1 item(s) -> {tmp_path / 's.coco.json'} (coco, pixel coordinates, "
        "tolerance 1 px)\n"
    )
    document = json.loads((tmp_path / "s.coco.json").read_text())
    assert [a["bbox"] for a in document["annotations"]] == [[5, 5, 25, 15], [40, 25, 25, 10]]
    cvat = runner.invoke(app, ["export", str(store), "--format", "cvat", "--category", "cell"])
    assert cvat.exit_code == 0, cvat.output
    assert cvat.stdout == (
        f"2 objects of 1 item(s) -> {tmp_path / 's.cvat.xml'} (cvat, pixel coordinates, "
        "tolerance 0 px)\n"
    )
    polygons = ET.parse(tmp_path / "s.cvat.xml").getroot().findall("image/polygon")
    assert [(p.attrib["label"], p.attrib["points"]) for p in polygons] == [
        ("cell", "5.00,5.00;5.00,20.00;30.00,20.00;30.00,5.00"),
        ("cell", "40.00,25.00;40.00,35.00;65.00,35.00;65.00,25.00"),
    ]
    out = tmp_path / "o" / "objects.geojson"
    geojson = runner.invoke(
        app, ["export", str(store), "--format", "geojson", "--crs", "--out", str(out)]
    )
    assert geojson.exit_code == 0, geojson.output
    # Without a CRS: the item's physical coordinates (pixel centres at whole numbers).
    [first, _] = json.loads(out.read_text())["features"]
    assert shapely.geometry.shape(first["geometry"]).bounds == (4.5, 4.5, 29.5, 19.5)

    for args, line in [
        (["--format", "coco", "--crs"],
         "--crs: COCO polygons are in pixel coordinates; drop --crs"),
        (["--format", "cvat", "--crs"],
         "--crs: CVAT polygons are in pixel coordinates; drop --crs"),
        (["--format", "cog", "--item", "nope"],
         f"--item nope: not a committed item of '{store}' (1 item(s): tile)"),
        (["--format", "cog", "--tile", "100"], "--tile (100) must be a positive multiple of 16"),
        (["--format", "geojson", "--classes", "classes"],
         "--classes: categories are written to COCO and CVAT files only"),
        (["--format", "coco", "--classes", "classes"],
         "item 'tile': no array 'classes' to export (it has ['labels'])"),
        (["--format", "cog", "--array", "probabilities"],
         "item 'tile': no array 'probabilities' to export (it has ['labels'])"),
    ]:  # fmt: skip
        refused = runner.invoke(app, ["export", str(store), *args])
        assert refused.exit_code == 2 and refused.stderr == line + "\n", refused.output


@pytest.mark.usefixtures("prefect_harness")
def test_evaluate_takes_a_coco_file_and_names_its_other_images(
    tmp_path: Path, dask_address: str
) -> None:
    store = tmp_path / "nuclei.zarr"
    common = ["--set", f"output.store={store}", "--set", f"cluster.address={dask_address}"]
    assert runner.invoke(app, ["run", str(CONFIGS / "nuclei.yaml"), *common]).exit_code == 0
    config = str(CONFIGS / "nuclei.yaml")
    labels = tifffile.imread(NUCLEI / "labels.tif")
    reference = tmp_path / "annotations.json"
    entries = [("003cee89357d9fe1/image.png", labels), ("elsewhere/x.png", labels[:9])]
    reference.write_text(json.dumps(coco_of(entries)))

    by_image = runner.invoke(
        app, ["evaluate", config, "--reference", str(NUCLEI / "labels.tif"), *common]
    )
    assert by_image.exit_code == 0, by_image.output
    expected = pd.read_parquet(store / "evaluation.parquet")
    by_coco = runner.invoke(app, ["evaluate", config, "--reference", str(reference), *common])

    assert by_coco.exit_code == 0, by_coco.output
    assert (
        f"COCO file '{reference}': 1 image(s) not in the collection: elsewhere/x.png"
        in by_coco.stderr
    )
    scores = pd.read_parquet(store / "evaluation.parquet")
    broken = coco_of(entries)
    broken["annotations"][0]["image_id"] = 5
    reference.write_text(json.dumps(broken))
    refused = runner.invoke(app, ["evaluate", config, "--reference", str(reference), *common])
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"{config}: COCO file '{reference}': annotation 1 names image_id 5, which the file's "
        "images do not have\n"
    )
    columns = ["ap50", "ap50_95", "matched", "n_pred", "n_ref", "dice_1", "iou_1"]
    pd.testing.assert_frame_equal(scores[columns], expected[columns])
    assert scores.loc[0, "reference"] == str(reference) and scores.loc[0, "n_ref"] == 36


@pytest.mark.usefixtures("prefect_harness")
def test_train_takes_a_coco_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for k in range(3):
        folder = tmp_path / "data" / f"cell_{k}"
        folder.mkdir(parents=True)
        labels = np.zeros((32, 32), np.uint16)
        labels[4:12, 5:13], labels[18:28, 16:24] = 1, 2
        image = (labels > 0) * 180 + 20 + rng.integers(0, 20, (32, 32))
        tifffile.imwrite(folder / "image.tif", image.astype(np.uint8))
        entries.append((f"cell_{k}/image.tif", labels))
    entries.append(("cell_9/image.tif", labels))  # annotated, but not among the images
    (tmp_path / "data" / "annotations.json").write_text(json.dumps(coco_of(entries)))
    config = {
        "name": "tiny-coco",
        "data": {"images": "data/*/image.tif", "references": "data/annotations.json",
                 "validation": ["cell_2"]},
        "model": {"architecture": {"name": "segnet", "params": {"features": [4, 8]}},
                  "spatial_dims": 2, "channels": [{"name": "grey"}],
                  "head": "foreground_boundary", "tile": [16, 16],
                  "training": {"data": "synthetic", "licence": "CC0-1.0"}},
        "training": {"batch_size": 2, "steps_per_epoch": 2, "max_epochs": 1, "seed": 1},
        "output": "model",
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))

    result = runner.invoke(app, ["train", str(path)])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "best").is_dir()
    annotations = tmp_path / "data" / "annotations.json"
    assert (
        f"{path}: COCO file '{annotations}': 1 image(s) not in the collection: cell_9/image.tif"
        in result.stderr
    )

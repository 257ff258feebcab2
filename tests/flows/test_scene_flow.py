"""A scene through the segment flow: the tiles of one landscape are one item, its objects
cross the tile border whole, and a rerun redoes it only when a tile changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from _geodata import N_BLOBS, blob_image, collection_config, write_geotiff

from segflow.flows.segment import ItemsFailedError, segment_collection
from segflow.store import read_index

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(config: dict[str, object]) -> dict[str, object]:
    result = segment_collection(config, return_state=True).result(raise_on_failure=False)
    if isinstance(result, ItemsFailedError):
        return result.summary
    assert isinstance(result, dict), result
    return result


def test_tiles_are_one_item_and_a_changed_tile_redoes_it(tmp_path: Path, dask_address: str) -> None:
    image = blob_image()  # three blobs; the third spans columns 2..70
    folder = tmp_path / "tiles"
    folder.mkdir()
    # Cut at column 30 (300 m), the right tile overlapping the left by 6 columns.
    write_geotiff(folder / "west.tif", image[:, :, :30])
    write_geotiff(folder / "east.tif", image[:, :, 24:], x0=500_240.0)
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    config["input"] = {"path": str(folder), "mosaic": {"overlap": "last"}}

    summary = run(config)
    assert (summary["done"], summary["failed"]) == (1, 0)
    group = zarr.open_group(store / "tiles", mode="r")
    labels = group["labels"][...]
    assert labels.shape == image.shape[1:] and int(labels.max()) == N_BLOBS
    np.testing.assert_array_equal(labels > 0, image[0] > 100)
    assert [os.path.basename(t["path"]) for t in group.attrs["tiles"]] == ["east.tif", "west.tif"]
    assert group.attrs["transform"][2] == 500_000.0

    again = run(config)
    assert (again["skipped"], again["done"]) == (1, 0)
    write_geotiff(folder / "east.tif", image[:, :, 24:] // 2, x0=500_240.0)  # blobs 100: gone
    assert run(config)["done"] == 1
    rows = read_index(str(store))
    assert list(rows["id"]) == ["tiles"] and list(rows["source"]) == [str(folder)]
    listed = json.loads(rows["tiles"].iloc[0])  # the index lists the tiles it was made of
    assert [os.path.basename(p) for p, _ in listed] == ["east.tif", "west.tif"]
    assert listed[1][1] == group.attrs["tiles"][1]["fingerprint"]  # west: unchanged
    assert listed[0][1] != group.attrs["tiles"][0]["fingerprint"]  # east: rewritten
    labels = zarr.open_group(store / "tiles", mode="r")["labels"][...]
    assert not labels[:, 30:].any()
    # The scene grew from its last version (a fixed threshold): the two blobs left keep
    # their ids, the one gone leaves its id unused (segflow.stitch.keep_ids).
    assert sorted(np.unique(labels[labels > 0]).tolist()) == [1, 3]


def test_a_scene_that_gains_a_tile_reuses_the_blocks_that_do_not_read_it(
    tmp_path: Path, dask_address: str
) -> None:
    image = blob_image()  # the third blob spans columns 2..70: it crosses the new tile
    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "west.tif", image[:, :, :36])
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    config["input"] = {"path": str(folder), "mosaic": True}
    assert run(config)["done"] == 1
    before = zarr.open_group(store / "tiles", mode="r")["labels"][...]

    write_geotiff(folder / "east.tif", image[:, :, 36:], x0=500_360.0)  # the far side
    assert run(config)["done"] == 1
    row = read_index(str(store)).set_index("id").loc["tiles"]
    # Blocks of 32^2 on 64 x 72: the two of columns 0..32 read only the west tile.
    assert (int(row["n_blocks"]), int(row["n_reused"])) == (6, 2)
    assert pd.isna(row["warning"])  # grown: nothing to say
    labels = zarr.open_group(store / "tiles", mode="r")["labels"][...]
    np.testing.assert_array_equal(labels > 0, image[0] > 100)  # the whole scene's objects
    assert len(np.unique(labels[labels > 0])) == N_BLOBS
    # Every object keeps the id it had: the blob the new tile continues too.
    np.testing.assert_array_equal(labels[:, :36][before > 0], before[before > 0])

"""The output store: xarray/rioxarray contract, sharded arrays, region writes, the index."""

from __future__ import annotations

import itertools
import json
import pathlib
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from rasterio.crs import CRS
from rasterio.transform import Affine

from segflow.errors import StoreError
from segflow.io import ArrayReader, ItemInfo, open_item
from segflow.store import (
    ArraySpec,
    ZarrRegionWriter,
    consolidate_store,
    create_item_group,
    create_output_array,
    read_index,
    storage_unit,
    write_index,
)

DATA = pathlib.Path(__file__).parents[1] / "data"
GEO_TRANSFORM = Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 4_000_000.0)


@pytest.fixture
def geo_info(tmp_path: pathlib.Path) -> ItemInfo:
    path = tmp_path / "tile.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=70,
        width=90,
        count=3,
        dtype="uint8",
        crs=CRS.from_epsg(32618),
        transform=GEO_TRANSFORM,
        nodata=0,
    ) as dst:
        dst.write(np.ones((3, 70, 90), np.uint8))
    return open_item(str(path)).info


@pytest.fixture
def volume_info(tmp_path: pathlib.Path) -> ItemInfo:
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, -30.0)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 6), np.int16), affine), path)
    return open_item(str(path)).info


def write_blocks(store: str, info: ItemInfo, spec: ArraySpec, labels: np.ndarray) -> None:
    """Write ``labels`` one storage unit at a time, as the engine's blocks do."""
    writer = ZarrRegionWriter(store, info.id, spec.name)
    unit = storage_unit(spec)
    starts = [range(0, n, u) for n, u in zip(labels.shape, unit, strict=True)]
    for corner in itertools.product(*starts):
        region = tuple(slice(c, c + u) for c, u in zip(corner, unit, strict=True))
        writer.write(region, labels[region])


def test_geo_item_opens_in_xarray_with_crs(tmp_path: pathlib.Path, geo_info: ItemInfo) -> None:
    store = str(tmp_path / "out.zarr")
    spec = ArraySpec("labels", "uint32", chunks=(16, 16), shards=(32, 32))
    labels = np.arange(70 * 90, dtype=np.uint32).reshape(70, 90)
    create_item_group(store, geo_info)
    create_output_array(store, geo_info, spec)
    write_blocks(store, geo_info, spec, labels)
    consolidate_store(store)

    ds = xr.open_zarr(f"{store}/{geo_info.id}")  # consolidated: no warning, one metadata read
    assert ds["labels"].dims == ("y", "x")
    assert ds["labels"].dtype == np.uint32  # fill_value 0 must not turn labels into NaN floats
    np.testing.assert_array_equal(ds["labels"].values, labels)
    np.testing.assert_allclose(ds["x"].values, 500_000.0 + 15.0 + 30.0 * np.arange(90))
    np.testing.assert_allclose(ds["y"].values, 4_000_000.0 - 15.0 - 30.0 * np.arange(70))
    assert ds["x"].attrs["units"] == "m"
    assert ds["x"].attrs["standard_name"] == "projection_x_coordinate"
    assert ds.rio.crs == CRS.from_epsg(32618)
    assert ds["labels"].rio.crs == CRS.from_epsg(32618)
    with warnings.catch_warnings():
        # rioxarray 0.19 builds the transform with affine's deprecated `*` operator.
        warnings.filterwarnings("ignore", "Use `@` matmul", PendingDeprecationWarning)
        assert ds["labels"].rio.transform() == GEO_TRANSFORM
    gdal = ds["spatial_ref"].attrs["GeoTransform"].split()
    assert [float(v) for v in gdal] == list(GEO_TRANSFORM.to_gdal())
    assert ds.attrs["spacing"] == [-30.0, 30.0]
    assert ds.attrs["units"] == "m"
    assert ds.attrs["nodata"] == 0.0
    assert ds.attrs["fingerprint"] == geo_info.fingerprint
    assert CRS.from_wkt(ds.attrs["crs"]) == CRS.from_epsg(32618)


def test_volume_item_has_mm_coordinates(tmp_path: pathlib.Path, volume_info: ItemInfo) -> None:
    store = str(tmp_path / "out.zarr")
    spec = ArraySpec("labels", "uint8", chunks=(2, 4, 4))
    create_item_group(store, volume_info)
    create_output_array(store, volume_info, spec)
    write_blocks(store, volume_info, spec, np.ones((6, 10, 12), np.uint8))

    ds = xr.open_zarr(store, group=volume_info.id, consolidated=False)
    assert ds["labels"].dims == ("z", "y", "x")
    assert "spatial_ref" not in ds.variables
    np.testing.assert_allclose(ds["z"].values, -30.0 + 2.5 * np.arange(6), rtol=1e-6)
    np.testing.assert_allclose(ds["y"].values, -20.0 + 0.8 * np.arange(10), rtol=1e-6)
    np.testing.assert_allclose(ds["x"].values, 10.0 - 0.8 * np.arange(12), rtol=1e-6)
    assert ds["z"].attrs["units"] == "mm"
    assert len(ds.attrs["affine"]) == 4
    np.testing.assert_allclose(ds.attrs["spacing"], (2.5, 0.8, -0.8), rtol=1e-6)


def test_bundled_ct_volume_coordinates_match_affine(tmp_path: pathlib.Path) -> None:
    info = open_item(str(DATA / "ct" / "STS_002" / "CT_mask.nii.gz")).info
    store = str(tmp_path / "out.zarr")
    create_item_group(store, info)
    create_output_array(store, info, ArraySpec("labels", "uint8", chunks=(16, 64, 64)))
    ds = xr.open_zarr(store, group=info.id, consolidated=False)
    affine = np.array(info.affine)
    # World x of voxel i along the file's first axis is affine[0, 0] * i + affine[0, 3].
    np.testing.assert_allclose(
        ds["x"].values, affine[0, 3] + affine[0, 0] * np.arange(161), rtol=1e-6
    )
    np.testing.assert_allclose(
        ds["z"].values, affine[2, 3] + affine[2, 2] * np.arange(48), rtol=1e-6
    )


def test_sharded_array_layout(tmp_path: pathlib.Path, geo_info: ItemInfo) -> None:
    store = str(tmp_path / "out.zarr")
    spec = ArraySpec(
        "labels", "uint16", chunks=(8, 10), shards=(16, 30), fill_value=0, attrs={"a": 1}
    )
    create_item_group(store, geo_info)
    create_output_array(store, geo_info, spec)
    array = zarr.open_array(store, path=f"{geo_info.id}/labels", mode="r")
    assert array.shape == (70, 90)
    assert array.chunks == (8, 10)
    assert array.shards == (16, 30)
    assert array.metadata.dimension_names == ("y", "x")
    assert array.attrs["grid_mapping"] == "spatial_ref"
    assert array.attrs["a"] == 1
    assert storage_unit(spec) == (16, 30)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            ArraySpec("labels", "uint8", chunks=(8, 10), shards=(12, 30)),
            r"array 'tile/labels': shards \(12, 30\) must be a multiple of chunks \(8, 10\)",
        ),
        (
            ArraySpec("labels", "uint8", chunks=(8, 8, 8)),
            r"array 'tile/labels': chunks \(8, 8, 8\) must be 2 positive sizes",
        ),
    ],
)
def test_bad_specs_are_rejected(
    tmp_path: pathlib.Path, geo_info: ItemInfo, spec: ArraySpec, message: str
) -> None:
    store = str(tmp_path / "out.zarr")
    create_item_group(store, geo_info)
    with pytest.raises(StoreError, match=message):
        create_output_array(store, geo_info, spec)


def test_group_and_array_must_exist_or_be_overwritable(
    tmp_path: pathlib.Path, geo_info: ItemInfo
) -> None:
    store = str(tmp_path / "out.zarr")
    spec = ArraySpec("labels", "uint8", chunks=(16, 16))
    with pytest.raises(StoreError, match=r"group 'tile' does not exist .*call create_item_group"):
        create_output_array(store, geo_info, spec)
    create_item_group(store, geo_info)
    with pytest.raises(StoreError, match=r"group 'tile' already exists .*overwrite=True"):
        create_item_group(store, geo_info, overwrite=False)
    create_output_array(store, geo_info, spec)
    with pytest.raises(StoreError, match=r"cannot create array 'tile/labels'"):
        create_output_array(store, geo_info, spec, overwrite=False)
    create_output_array(store, geo_info, ArraySpec("labels", "uint32", chunks=(16, 16)))
    assert zarr.open_array(store, path="tile/labels").dtype == np.uint32
    create_item_group(store, geo_info)  # overwrite drops the old arrays
    assert "labels" not in zarr.open_group(store, path="tile")


def test_writer_checks_regions_and_pickles(tmp_path: pathlib.Path, geo_info: ItemInfo) -> None:
    store = str(tmp_path / "out.zarr")
    create_item_group(store, geo_info)
    create_output_array(
        store, geo_info, ArraySpec("labels", "uint8", chunks=(8, 8), shards=(32, 32))
    )
    writer = ZarrRegionWriter(store, "tile", "labels")
    writer.write((slice(64, 70), slice(64, 90)), np.full((6, 26), 7, np.uint8))  # array edge
    clone = pickle.loads(pickle.dumps(writer))
    assert set(writer.__getstate__()) == {"store", "item_id", "name"}
    np.testing.assert_array_equal(clone.read((slice(64, 70), slice(64, 90))), 7)
    with pytest.raises(
        StoreError, match=r"region \(0:8, 0:8\) does not cover whole storage units \(32, 32\)"
    ):
        writer.write((slice(0, 8), slice(0, 8)), np.zeros((8, 8), np.uint8))
    with pytest.raises(
        ValueError, match=r"`data` shape \(4, 4\) does not match region \(0:32, 0:32\)"
    ):
        writer.write((slice(0, 32), slice(0, 32)), np.zeros((4, 4), np.uint8))
    with pytest.raises(StoreError, match=r"cannot open array 'tile/missing'"):
        ZarrRegionWriter(store, "tile", "missing").read((slice(0, 1), slice(0, 1)))


def test_concurrent_shard_writes_equal_whole_write(tmp_path: pathlib.Path) -> None:
    info = ArrayReader(np.zeros((50, 70), np.uint8), "mem").info
    store = str(tmp_path / "out.zarr")
    spec = ArraySpec("labels", "int32", chunks=(5, 5), shards=(10, 20))
    create_item_group(store, info)
    create_output_array(store, info, spec)
    labels = np.random.default_rng(0).integers(0, 1000, (50, 70), dtype=np.int32)
    writer = ZarrRegionWriter(store, "mem", "labels")
    regions = [
        (slice(y, y + 10), slice(x, x + 20)) for y in range(0, 50, 10) for x in range(0, 70, 20)
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda r: writer.write(r, labels[r]), regions))
    np.testing.assert_array_equal(writer.read((slice(None), slice(None))), labels)
    ds = xr.open_zarr(store, group="mem", consolidated=False)
    assert ds["x"].attrs["units"] == "pixel"
    assert "spatial_ref" not in ds.variables


def test_consolidated_metadata_is_dropped_when_the_store_changes(
    tmp_path: pathlib.Path, geo_info: ItemInfo, volume_info: ItemInfo
) -> None:
    store = str(tmp_path / "out.zarr")
    create_item_group(store, geo_info)
    consolidate_store(store)
    item = f"{store}/{geo_info.id}"
    assert zarr.open_group(item, mode="r").metadata.consolidated_metadata is not None
    assert zarr.open_group(store, mode="r").metadata.consolidated_metadata is None
    create_output_array(store, geo_info, ArraySpec("labels", "uint8", chunks=(16, 16)))
    assert zarr.open_group(item, mode="r").metadata.consolidated_metadata is None
    create_item_group(store, volume_info)
    consolidate_store(store)
    assert "labels" in xr.open_zarr(item)
    assert "x" in xr.open_zarr(f"{store}/{volume_info.id}").coords


def test_nan_nodata_is_valid_json(tmp_path: pathlib.Path) -> None:
    info = ItemInfo(
        id="nan",
        path="x",
        format="array",
        shape=(2, 2),
        dtype="float32",
        axes=("y", "x"),
        spacing=(1.0, 1.0),
        origin=(0.0, 0.0),
        nodata=float("nan"),
    )
    create_item_group(str(tmp_path / "out.zarr"), info)
    text = (tmp_path / "out.zarr" / "nan" / "zarr.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert json.loads(text)["attributes"]["nodata"] == "NaN"


# --- index ------------------------------------------------------------------------------------


def test_index_write_merge_and_read(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "out.zarr"
    empty = read_index(store)
    assert empty.empty
    assert {"id", "source", "status", "error", "shape", "object_count", "seconds"} <= set(
        empty.columns
    )
    assert {"config_hash", "code_version", "fingerprint"} <= set(empty.columns)

    path = write_index(
        str(store),
        [
            {"id": "b", "status": "failed", "error": "item 'b.tif': truncated", "source": "b.tif"},
            {"id": "a", "status": "done", "shape": (718, 791), "object_count": 12, "seconds": 1.5},
        ],
    )
    assert path == str(store / "index.parquet")
    write_index(
        str(store),
        [{"id": "b", "status": "done", "object_count": 3, "seconds": 0.5, "model": "unet"}],
    )
    frame = read_index(str(store))
    assert list(frame["id"]) == ["a", "b"]
    row_a = frame.set_index("id").loc["a"]
    row_b = frame.set_index("id").loc["b"]
    assert row_a["shape"] == "(718, 791)"
    assert row_a["object_count"] == 12
    assert pd.isna(row_a["model"])
    assert row_b["status"] == "done"
    assert pd.isna(row_b["error"])  # the failed row was replaced, not merged
    assert row_b["model"] == "unet"
    assert str(frame["object_count"].dtype) == "Int64"


def test_index_rejects_bad_rows(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"index row 'a': `status` 'ok' must be one of"):
        write_index(str(tmp_path), [{"id": "a", "status": "ok"}])
    with pytest.raises(ValueError, match=r"has no `id`"):
        write_index(str(tmp_path), [{"status": "done"}])
    with pytest.raises(ValueError, match=r"index rows repeat ids \['a'\]"):
        write_index(str(tmp_path), [{"id": "a", "status": "done"}, {"id": "a", "status": "done"}])
    assert not (tmp_path / "index.parquet").exists()

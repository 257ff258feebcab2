"""Readers against real files: windowed reads equal slices of the whole array, metadata."""

from __future__ import annotations

import pathlib
import pickle

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from rasterio.crs import CRS
from rasterio.transform import Affine

from segflow.errors import ItemReadError
from segflow.io import ArrayReader, GeoTIFFReader, ImageReader, NiftiReader, ZarrReader, open_item

DATA = pathlib.Path(__file__).parents[1] / "data"
REGIONS_2D = [
    (slice(0, 7), slice(0, 9)),  # the whole small image
    (slice(2, 5), slice(3, 8)),
    (slice(6, 7), slice(8, 9)),  # last pixel
    (slice(3, 3), slice(0, 9)),  # empty
]


def write_geotiff(path: pathlib.Path, data: np.ndarray, *, nodata: float | None = 0) -> None:
    """A real multi-band GeoTIFF in UTM 18N with 30 m pixels, north-up."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        crs=CRS.from_epsg(32618),
        transform=Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 4_000_000.0),
        nodata=nodata,
    ) as dst:
        dst.write(data)


@pytest.fixture
def geotiff(tmp_path: pathlib.Path) -> tuple[pathlib.Path, np.ndarray]:
    data = np.arange(3 * 7 * 9, dtype=np.uint16).reshape(3, 7, 9)
    path = tmp_path / "tile.tif"
    write_geotiff(path, data)
    return path, data


@pytest.mark.parametrize("region", REGIONS_2D)
def test_geotiff_windows_equal_slices(
    geotiff: tuple[pathlib.Path, np.ndarray], region: tuple[slice, slice]
) -> None:
    path, data = geotiff
    block = GeoTIFFReader(str(path), "tile").read(region)
    np.testing.assert_array_equal(block, data[(slice(None), *region)])
    assert block.dtype == np.uint16


def test_geotiff_metadata(geotiff: tuple[pathlib.Path, np.ndarray]) -> None:
    path, _ = geotiff
    info = GeoTIFFReader(str(path), "tile").info
    assert info.id == "tile"
    assert info.format == "geotiff"
    assert info.axes == ("c", "y", "x")
    assert info.shape == (3, 7, 9)
    assert info.spatial_shape == (7, 9)
    assert info.n_channels == 3
    assert info.dtype == "uint16"
    assert info.spacing == (-30.0, 30.0)
    assert info.origin == (4_000_000.0 - 15.0, 500_000.0 + 15.0)  # centre of pixel (0, 0)
    assert info.units == "m"
    assert info.nodata == 0.0
    assert info.transform == (30.0, 0.0, 500_000.0, 0.0, -30.0, 4_000_000.0)
    assert info.crs_wkt is not None and CRS.from_wkt(info.crs_wkt) == CRS.from_epsg(32618)
    assert len(info.fingerprint) == 16


def test_geotiff_geographic_units_and_no_nodata(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "wgs84.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=4,
        width=5,
        count=1,
        dtype="float32",
        crs=CRS.from_epsg(4326),
        transform=Affine(0.001, 0.0, -115.0, 0.0, -0.001, 36.0),
    ) as dst:
        dst.write(np.ones((1, 4, 5), dtype=np.float32))
    info = GeoTIFFReader(str(path)).info
    assert info.units == "degree"
    assert info.nodata is None
    assert info.id == "wgs84"


def test_geotiff_reader_pickles_as_paths_and_reopens(
    geotiff: tuple[pathlib.Path, np.ndarray],
) -> None:
    path, data = geotiff
    reader = GeoTIFFReader(str(path), "tile")
    reader.read((slice(0, 1), slice(0, 1)))  # opens the handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.info == reader.info
    assert set(reader.__getstate__()) == {"path", "info"}
    np.testing.assert_array_equal(clone.read((slice(1, 4), slice(2, 6))), data[:, 1:4, 2:6])


def test_bundled_geotiff_sample() -> None:
    reader = open_item(str(DATA / "aerial" / "RGB.byte.tif"))
    info = reader.info
    assert isinstance(reader, GeoTIFFReader)
    assert info.shape == (3, 718, 791)
    assert info.nodata == 0.0
    assert CRS.from_wkt(info.crs_wkt or "").to_epsg() == 32618
    assert info.spacing[0] < 0 < info.spacing[1]
    with rasterio.open(DATA / "aerial" / "RGB.byte.tif") as src:
        whole = src.read()
    np.testing.assert_array_equal(
        reader.read((slice(100, 164), slice(700, 791))), whole[:, 100:164, 700:]
    )


def test_geotiff_reader_rejects_garbage(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff")
    with pytest.raises(ItemReadError, match=r"item '.*bad\.tif': not a readable GeoTIFF \("):
        GeoTIFFReader(str(bad))


def test_read_region_is_validated(geotiff: tuple[pathlib.Path, np.ndarray]) -> None:
    reader = GeoTIFFReader(str(geotiff[0]), "tile")
    with pytest.raises(ValueError, match=r"item 'tile': `region` has 1 slices, expected one"):
        reader.read((slice(0, 2),))
    with pytest.raises(ValueError, match=r"along 'x' must have step 1 and lie inside 0\.\.9"):
        reader.read((slice(0, 2), slice(0, 10)))


# --- NIfTI ------------------------------------------------------------------------------------

AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 10.0],  # x flipped, as in LPS-stored CT
        [0.0, 0.8, 0.0, -20.0],
        [0.0, 0.0, 2.5, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture(params=[".nii", ".nii.gz"])
def nifti(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> tuple[pathlib.Path, np.ndarray]:
    data_xyz = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)  # (x, y, z) on disk
    path = tmp_path / f"vol{request.param}"
    nib.save(nib.Nifti1Image(data_xyz, AFFINE), path)
    return path, data_xyz


@pytest.mark.parametrize(
    "region",
    [
        (slice(0, 4), slice(0, 5), slice(0, 6)),
        (slice(1, 3), slice(2, 5), slice(0, 4)),
        (slice(3, 4), slice(4, 5), slice(5, 6)),
    ],
)
def test_nifti_windows_equal_transposed_slices(
    nifti: tuple[pathlib.Path, np.ndarray], region: tuple[slice, slice, slice]
) -> None:
    path, data_xyz = nifti
    reader = NiftiReader(str(path))
    whole_zyx = data_xyz.transpose(2, 1, 0)
    block = reader.read(region)
    np.testing.assert_array_equal(block, whole_zyx[region][np.newaxis])
    assert block.flags.c_contiguous


def test_nifti_metadata(nifti: tuple[pathlib.Path, np.ndarray]) -> None:
    path, _ = nifti
    info = NiftiReader(str(path)).info
    assert info.id == "vol"  # .nii.gz stripped whole
    assert info.axes == ("z", "y", "x")
    assert info.shape == (4, 5, 6)
    assert info.dtype == "int16"
    assert info.units == "mm"
    # Signed steps in (z, y, x) order: origin + i * spacing is the world coordinate.
    np.testing.assert_allclose(info.spacing, (2.5, 0.8, -0.8), rtol=1e-6)
    np.testing.assert_allclose(info.origin, (-30.0, -20.0, 10.0), rtol=1e-6)
    np.testing.assert_allclose(np.array(info.affine), AFFINE, rtol=1e-6)
    voxel = np.array([5, 4, 3, 1])  # (i, j, k) = (x, y, z) indices
    world = AFFINE @ voxel
    coord_zyx = np.array(info.origin) + np.array([3, 4, 5]) * np.array(info.spacing)
    np.testing.assert_allclose(coord_zyx, world[2::-1], rtol=1e-6)


def test_nifti_scaled_data_reports_float_dtype(tmp_path: pathlib.Path) -> None:
    image = nib.Nifti1Image(np.ones((3, 3, 3), dtype=np.int16), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii")
    reader = NiftiReader(str(tmp_path / "scaled.nii"))
    block = reader.read((slice(0, 1), slice(0, 1), slice(0, 1)))
    assert reader.info.dtype == str(block.dtype)
    assert block.dtype.kind == "f"
    assert float(block[0, 0, 0, 0]) == 10.5


def test_nifti_4d_is_rejected(tmp_path: pathlib.Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(ItemReadError, match=r"item '.*t\.nii\.gz': NIfTI shape \(4, 4, 3, 2\)"):
        NiftiReader(str(tmp_path / "t.nii.gz"))


def test_nifti_trailing_singleton_is_3d(tmp_path: pathlib.Path) -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4, 1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii")
    reader = NiftiReader(str(tmp_path / "one.nii"))
    assert reader.info.shape == (4, 3, 2)
    np.testing.assert_array_equal(
        reader.read((slice(0, 4), slice(0, 3), slice(0, 2)))[0], data[..., 0].T
    )


def test_nifti_garbage_is_rejected(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ItemReadError, match=r"item '.*bad\.nii\.gz': not a readable NIfTI file"):
        NiftiReader(str(tmp_path / "bad.nii.gz"))


def test_bundled_ct_sample() -> None:
    reader = open_item(str(DATA / "ct" / "STS_002" / "CT_image.nii.gz"))
    mask = open_item(str(DATA / "ct" / "STS_002" / "CT_mask.nii.gz"))
    assert reader.info.shape == mask.info.shape == (48, 143, 161)
    assert reader.info.dtype == "float32"
    assert mask.info.dtype == "uint8"
    assert reader.info.attrs["orientation"] == "LPS"
    np.testing.assert_allclose(np.abs(reader.info.spacing), (3.27, 0.9766, 0.9766), atol=1e-4)
    whole = np.asarray(nib.load(DATA / "ct" / "STS_002" / "CT_mask.nii.gz").dataobj).T
    block = mask.read((slice(10, 30), slice(0, 143), slice(40, 100)))
    np.testing.assert_array_equal(block[0], whole[10:30, :, 40:100])
    assert int(whole.sum()) == 17_090  # GTV voxels listed in PROVENANCE.md


# --- TIFF / PNG / JPEG ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kwargs", "axes", "to_cyx"),
    [
        ((7, 9), {}, ("y", "x"), lambda a: a[np.newaxis]),
        ((7, 9, 3), {}, ("c", "y", "x"), lambda a: np.moveaxis(a, -1, 0)),
        ((7, 9, 4), {}, ("c", "y", "x"), lambda a: np.moveaxis(a, -1, 0)),
        ((5, 7, 9), {}, ("z", "y", "x"), lambda a: a[np.newaxis]),
        (
            (3, 7, 9),
            {"photometric": "rgb", "planarconfig": "separate"},
            ("c", "y", "x"),
            lambda a: a,
        ),
    ],
)
def test_tiff_layouts(
    tmp_path: pathlib.Path, shape: tuple[int, ...], kwargs: dict, axes: tuple[str, ...], to_cyx
) -> None:
    data = np.random.default_rng(0).integers(0, 60_000, shape, dtype=np.uint16)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, **kwargs)
    reader = open_item(str(path))
    assert isinstance(reader, ImageReader)
    assert reader.info.format == "tiff"
    assert reader.info.axes == axes
    assert reader.info.units == "pixel"
    expected = to_cyx(data)
    region = tuple(slice(1, n - 1) for n in expected.shape[1:])
    np.testing.assert_array_equal(reader.read(region), expected[(slice(None), *region)])


def test_tiff_reads_are_copies(tmp_path: pathlib.Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    reader = ImageReader(str(tmp_path / "a.tif"))
    block = reader.read((slice(0, 4), slice(0, 4)))
    block += 1  # must not change what the next read sees
    assert reader.read((slice(0, 4), slice(0, 4))).sum() == 0


def test_tiff_rewritten_file_is_reread(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    assert ImageReader(str(path)).read((slice(0, 4), slice(0, 4))).sum() == 0
    tifffile.imwrite(path, np.ones((4, 4), np.uint8))
    stat = path.stat()
    # Make sure the cache key (mtime_ns) changes even on coarse-timestamp file systems.
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert ImageReader(str(path)).read((slice(0, 4), slice(0, 4))).sum() == 16


def test_png_rgba_and_grey(tmp_path: pathlib.Path) -> None:
    rgba = np.random.default_rng(1).integers(0, 255, (6, 8, 4), dtype=np.uint8)
    grey = rgba[..., 0].copy()
    iio.imwrite(tmp_path / "rgba.png", rgba)
    iio.imwrite(tmp_path / "grey.png", grey)
    reader = open_item(str(tmp_path / "rgba.png"))
    assert reader.info.axes == ("c", "y", "x") and reader.info.shape == (4, 6, 8)
    np.testing.assert_array_equal(
        reader.read((slice(2, 6), slice(0, 3))), np.moveaxis(rgba, -1, 0)[:, 2:6, :3]
    )
    grey_reader = open_item(str(tmp_path / "grey.png"))
    assert grey_reader.info.axes == ("y", "x")
    np.testing.assert_array_equal(grey_reader.read((slice(0, 6), slice(0, 8)))[0], grey)


def test_jpeg_rgb(tmp_path: pathlib.Path) -> None:
    rgb = np.full((8, 8, 3), 128, dtype=np.uint8)
    iio.imwrite(tmp_path / "photo.jpg", rgb)
    reader = open_item(str(tmp_path / "photo.jpg"))
    assert reader.info.format == "jpeg"
    assert reader.info.shape == (3, 8, 8)
    decoded = np.moveaxis(
        iio.imread(tmp_path / "photo.jpg"), -1, 0
    )  # JPEG is lossy: compare decodes
    np.testing.assert_array_equal(reader.read((slice(0, 8), slice(0, 8))), decoded)


def test_bundled_nuclei_sample() -> None:
    folder = DATA / "nuclei" / "003cee89357d9fe1"
    image = open_item(str(folder / "image.png"))
    labels = open_item(str(folder / "labels.tif"))
    assert image.info.shape == (4, 256, 256)
    assert isinstance(labels, ImageReader)  # plain TIFF: no georeferencing
    assert labels.info.axes == ("y", "x") and labels.info.dtype == "uint16"
    whole = tifffile.imread(folder / "labels.tif")
    assert len(np.unique(whole)) == 37  # background + 36 nuclei, per PROVENANCE.md
    np.testing.assert_array_equal(labels.read((slice(64, 128), slice(0, 256)))[0], whole[64:128])


def test_unreadable_png(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ItemReadError, match=r"item '.*bad\.png': not a readable PNG/JPEG image"):
        ImageReader(str(tmp_path / "bad.png"))


# --- Zarr and in-memory arrays ----------------------------------------------------------------


def test_zarr_v3_with_dimension_names_and_channel_last(tmp_path: pathlib.Path) -> None:
    data = np.arange(7 * 9 * 2, dtype=np.float32).reshape(7, 9, 2)
    zarr.create_array(
        tmp_path / "scene.zarr", data=data, chunks=(3, 4, 1), dimension_names=("y", "x", "band")
    )
    reader = ZarrReader(str(tmp_path / "scene.zarr"))
    assert reader.info.id == "scene"
    assert reader.info.axes == ("c", "y", "x") and reader.info.shape == (2, 7, 9)
    whole = np.moveaxis(data, -1, 0)
    for region in REGIONS_2D:
        np.testing.assert_array_equal(reader.read(region), whole[(slice(None), *region)])
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read((slice(1, 6), slice(2, 9))), whole[:, 1:6, 2:9])


def test_zarr_v2_and_inferred_axes(tmp_path: pathlib.Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    zarr.create_array(tmp_path / "stack.zarr", data=data, chunks=(2, 2, 2), zarr_format=2)
    reader = ZarrReader(str(tmp_path / "stack.zarr"), "stack")
    assert reader.info.axes == ("z", "y", "x")
    np.testing.assert_array_equal(
        reader.read((slice(1, 3), slice(0, 5), slice(4, 6)))[0], data[1:3, :, 4:]
    )


def test_zarr_array_inside_a_group(tmp_path: pathlib.Path) -> None:
    group = zarr.open_group(tmp_path / "store.zarr", mode="w")
    group.create_array("raw", data=np.ones((4, 4), np.uint8))
    reader = ZarrReader(str(tmp_path / "store.zarr"), "raw", array_path="raw")
    assert reader.info.shape == (4, 4)
    with pytest.raises(ItemReadError, match=r"is a Zarr group, not an array \(.*\['raw'\]"):
        ZarrReader(str(tmp_path / "store.zarr"))


def test_zarr_ome_multiscale_level(tmp_path: pathlib.Path) -> None:
    group = zarr.open_group(tmp_path / "cells.ome.zarr", mode="w")
    group.create_array("0", data=np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5))
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "z", "type": "space", "unit": "micrometer"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, 2.0, 0.5, 0.5]},
                            {"type": "translation", "translation": [0.0, 10.0, 0.0, 0.0]},
                        ],
                    }
                ],
            }
        ],
    }
    reader = ZarrReader(str(tmp_path / "cells.ome.zarr"))
    assert reader.info.axes == ("c", "z", "y", "x") and reader.info.shape == (2, 3, 4, 5)
    assert reader.info.spacing == (2.0, 0.5, 0.5)
    assert reader.info.origin == (10.0, 0.0, 0.0)
    assert reader.info.units == "micrometer"


def test_zarr_unsupported_dimensions(tmp_path: pathlib.Path) -> None:
    zarr.create_array(
        tmp_path / "t.zarr", data=np.zeros((2, 3, 4, 5)), dimension_names=("t", "z", "y", "x")
    )
    with pytest.raises(ItemReadError, match=r"dimension names \('t', 'z', 'y', 'x'\) of shape"):
        ZarrReader(str(tmp_path / "t.zarr"))
    with pytest.raises(ItemReadError, match=r"item '.*missing\.zarr': not a readable Zarr array"):
        ZarrReader(str(tmp_path / "missing.zarr"))


def test_array_reader_axes() -> None:
    data = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    assert ArrayReader(data, "vol").info.axes == ("z", "y", "x")
    rgb = ArrayReader(data, "rgb", channel_axis=0)
    assert rgb.info.axes == ("c", "y", "x")
    np.testing.assert_array_equal(rgb.read((slice(1, 3), slice(0, 2))), data[:, 1:3, :2])
    last = ArrayReader(data, "yxc", axes=("y", "x", "c"))
    np.testing.assert_array_equal(
        last.read((slice(0, 2), slice(1, 3))), np.moveaxis(data, -1, 0)[:, :2, 1:3]
    )
    assert ArrayReader(data, "a").info.fingerprint == ArrayReader(data.copy(), "a").info.fingerprint
    assert ArrayReader(data, "a").info.fingerprint != ArrayReader(data + 1, "a").info.fingerprint
    with pytest.raises(ValueError, match=r"`axes` \('y', 'x'\) must name each of the 3 dimensions"):
        ArrayReader(data, "bad", axes=("y", "x"))
    with pytest.raises(ValueError, match=r"`array` has shape \(3, 4, 5, 6, 7\)"):
        ArrayReader(np.zeros((3, 4, 5, 6, 7)), "bad")


def test_a_read_refused_for_credentials_says_so_not_that_the_file_is_damaged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Dask worker without the storage's credentials gets a refusal from S3: the error
    names access, not damage (it said "the file is damaged or cut short")."""
    reader = GeoTIFFReader(str(DATA / "aerial" / "RGB.byte.tif"))

    class Refusing:
        def read(self, **kwargs: object) -> np.ndarray:
            raise rasterio.errors.RasterioIOError(
                "Opener failed to determine file info: NoCredentialsError('Unable to locate "
                "credentials')"
            )

    monkeypatch.setattr(reader, "handle", lambda: Refusing())
    with pytest.raises(ItemReadError) as caught:
        reader.read((slice(0, 8), slice(0, 8)))
    message = str(caught.value)
    assert "cannot read window" in message and "damaged" not in message
    assert "no credentials" in message and "each worker needs the credentials" in message

    class Damaged:
        def read(self, **kwargs: object) -> np.ndarray:
            raise rasterio.errors.RasterioIOError("TIFFReadEncodedStrip() failed")

    monkeypatch.setattr(reader, "handle", lambda: Damaged())
    with pytest.raises(ItemReadError, match="the file is damaged or cut short"):
        reader.read((slice(0, 8), slice(0, 8)))

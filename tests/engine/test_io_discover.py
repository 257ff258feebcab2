"""Discovery of collections: folders, globs, unique ids, fingerprints, failures kept apart."""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from rasterio.crs import CRS
from rasterio.transform import Affine

from segflow.errors import ItemReadError
from segflow.io import (
    GeoTIFFReader,
    ImageReader,
    NiftiReader,
    ZarrReader,
    assign_item_ids,
    discover_items,
    open_item,
)

DATA = pathlib.Path(__file__).parents[1] / "data"
ZARR_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def write_geotiff(path: pathlib.Path) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=4,
        width=4,
        count=2,
        dtype="uint8",
        crs=CRS.from_epsg(32618),
        transform=Affine(10.0, 0.0, 0.0, 0.0, -10.0, 40.0),
    ) as dst:
        dst.write(np.ones((2, 4, 4), np.uint8))


@pytest.fixture
def collection(tmp_path: pathlib.Path) -> pathlib.Path:
    """A mixed folder: nested stems that collide, every format, noise files, one bad file."""
    root = tmp_path / "coll"
    for sub in ("a", "b", "b/deep"):
        (root / sub).mkdir(parents=True)
    write_geotiff(root / "a" / "scene.tif")
    tifffile.imwrite(
        root / "b" / "scene.tif", np.zeros((3, 5, 6), np.uint16), photometric="minisblack"
    )
    shutil.copy(DATA / "nuclei" / "003cee89357d9fe1" / "image.png", root / "a" / "image.png")
    shutil.copy(
        DATA / "nuclei" / "003cee89357d9fe1" / "image.png", root / "b" / "deep" / "image.png"
    )
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), root / "ct scan.nii.gz")
    zarr.create_array(root / "raw.zarr", data=np.zeros((4, 4), np.uint8))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.tif").write_bytes(b"AppleDouble junk")
    (root / "bad.tif").write_bytes(b"not a tiff at all")
    return root


def test_discover_folder_finds_every_format_and_keeps_failures_apart(
    collection: pathlib.Path,
) -> None:
    readers, failures = discover_items(str(collection))
    by_id = {r.info.id: r for r in readers}
    assert sorted(by_id) == ["a_image", "a_scene", "b_scene", "ct_scan", "deep_image", "raw"]
    assert isinstance(by_id["a_scene"], GeoTIFFReader)
    assert isinstance(by_id["b_scene"], ImageReader)
    assert by_id["b_scene"].info.axes == ("z", "y", "x")
    assert isinstance(by_id["ct_scan"], NiftiReader)
    assert isinstance(by_id["raw"], ZarrReader)
    assert all(ZARR_NAME.match(item_id) for item_id in by_id)
    assert len(failures) == 1
    bad_path, message = failures[0]
    assert bad_path.endswith("bad.tif")
    assert re.search(r"item '.*bad\.tif': not a readable GeoTIFF/TIFF \(", message)


def test_discover_is_sorted_and_repeatable(collection: pathlib.Path) -> None:
    first, _ = discover_items(str(collection))
    second, _ = discover_items(str(collection))
    paths = [r.info.path for r in first]
    assert paths == sorted(paths)
    assert [r.info.id for r in first] == [r.info.id for r in second]
    assert [r.info.fingerprint for r in first] == [r.info.fingerprint for r in second]


def test_discover_glob(collection: pathlib.Path) -> None:
    readers, failures = discover_items(str(collection / "**" / "*.png"))
    assert [r.info.id for r in readers] == ["a_image", "deep_image"]
    assert failures == []


def test_discover_single_file_and_zarr_folder(collection: pathlib.Path) -> None:
    readers, _ = discover_items(str(collection / "a" / "scene.tif"))
    assert [r.info.id for r in readers] == ["scene"]
    readers, _ = discover_items(str(collection / "raw.zarr"))
    assert [r.info.id for r in readers] == ["raw"]
    readers, _ = discover_items("file://" + str(collection / "a" / "scene.tif"))
    assert [r.info.id for r in readers] == ["scene"]


def test_discover_empty_folder_and_missing_path(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("nothing to see")
    with pytest.raises(
        ItemReadError, match=r"collection '.*empty': no items found, .*\.tif, .*\.zarr"
    ):
        discover_items(str(tmp_path / "empty"))
    with pytest.raises(ItemReadError, match=r"collection '.*nowhere': no such file or folder"):
        discover_items(str(tmp_path / "nowhere"))
    with pytest.raises(ItemReadError, match=r"no items found"):
        discover_items(str(tmp_path / "*.tif"))


def test_bundled_samples_have_unique_ids() -> None:
    readers, failures = discover_items(str(DATA))
    assert failures == []
    ids = [r.info.id for r in readers]
    assert ids == ["RGB.byte", "CT_image", "CT_mask", "image", "labels"]


def test_assign_item_ids_resolves_collisions() -> None:
    ids = assign_item_ids(
        [
            "d/x/image.png",
            "d/y/image.png",
            "d/ct.nii.gz",
            "d/a.tif",
            "d/a.png",
            "d/a b.tif",
            "d/a_b.tif",
            "d/__init__.tif",
        ]
    )
    assert ids == ["x_image", "y_image", "ct", "a.tif", "a.png", "a_b", "a_b_2", "item__init__"]
    assert len(set(ids)) == len(ids)
    # DSB2018 layout: every folder holds image.png; ids take the folder name.
    assert assign_item_ids(["s/0a/image.png", "s/0b/image.png"]) == ["0a_image", "0b_image"]


def test_fingerprint_follows_content_changes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    before = open_item(str(path)).info.fingerprint
    assert open_item(str(path)).info.fingerprint == before
    tifffile.imwrite(path, np.zeros((5, 4), np.uint8))
    assert open_item(str(path)).info.fingerprint != before

    store = tmp_path / "s.zarr"
    array = zarr.create_array(store, shape=(4, 4), chunks=(2, 2), dtype="uint8")
    array[:] = 1
    before = open_item(str(store)).info.fingerprint
    chunk = next(p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")
    stat = chunk.stat()
    os.utime(chunk, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a rewritten chunk
    assert open_item(str(store)).info.fingerprint != before


def test_open_item_unknown_extension(tmp_path: pathlib.Path) -> None:
    (tmp_path / "scan.bmp").write_bytes(b"BM")
    with pytest.raises(
        ItemReadError, match=r"item '.*scan\.bmp': unknown file type, expected one of .*\.tif"
    ):
        open_item(str(tmp_path / "scan.bmp"))


def test_world_file_makes_a_tiff_geo(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ortho.tif"
    tifffile.imwrite(path, np.zeros((4, 6), np.uint8))
    assert isinstance(open_item(str(path)), ImageReader)
    # A world file: pixel size x, rotation, rotation, pixel size y, x and y of pixel (0,0) centre.
    (tmp_path / "ortho.tfw").write_text("2.0\n0.0\n0.0\n-2.0\n101.0\n199.0\n")
    reader = open_item(str(path))
    assert isinstance(reader, GeoTIFFReader)
    assert reader.info.spacing == (-2.0, 2.0)
    assert reader.info.origin == (199.0, 101.0)


def test_items_are_opened_several_at_a_time_in_path_order(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers and fingerprints are read by several threads; the readers and failures come
    back in path order, as one by one."""
    import threading
    import time

    from segflow.io import discover

    rng = np.random.default_rng(0)
    for k in range(24):
        tifffile.imwrite(tmp_path / f"t{k:02d}.tif", (rng.random((8, 8)) * 200).astype(np.uint8))
    for k in (3, 11):
        (tmp_path / f"t{k:02d}b.tif").write_bytes(b"not a tiff")
    threads, original = set(), discover.open_item

    def slow(path: str, item_id: str | None = None, **options: object) -> object:
        threads.add(threading.get_ident())
        time.sleep(0.01)  # a header read that waits, as on a network filesystem
        return original(path, item_id, **options)

    monkeypatch.setattr(discover, "open_item", slow)
    readers, failures = discover_items(str(tmp_path))

    assert [r.info.id for r in readers] == [f"t{k:02d}" for k in range(24)]
    assert [os.path.basename(path) for path, _ in failures] == ["t03b.tif", "t11b.tif"]
    assert len(threads) > 1

"""Scenes of tiles in two UTM zones and two pixel sizes: warped block by block, they equal
the whole mosaic warped at once (exactly with nearest-neighbour, labels included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from _scenes import make_raster, run
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.warp import reproject

from segflow.errors import ItemReadError
from segflow.io import discover_items, open_item

# Three tiles around 12 E, 48 N, where UTM zones 32 and 33 meet: two in zone 32 (10 m and
# 5 m pixels), one in zone 33 overlapping the first; 0 is their nodata value.
TILES = {
    "a.tif": ("EPSG:32632", Affine(10.0, 0, 723_000.0, 0, -10.0, 5_321_000.0), (40, 50)),
    "b.tif": ("EPSG:32633", Affine(10.0, 0, 275_900.0, 0, -10.0, 5_321_030.0), (40, 50)),
    "c.tif": ("EPSG:32632", Affine(5.0, 0, 723_100.0, 0, -5.0, 5_320_640.0), (30, 40)),
}


def write_tiles(folder: Path, seed: int) -> None:
    folder.mkdir()
    for i, (name, (crs, transform, shape)) in enumerate(TILES.items()):
        image = make_raster(shape, "uint8", seed + 7 * i)
        profile = {"driver": "GTiff", "height": shape[0], "width": shape[1], "count": 3}
        profile.update(dtype="uint8", crs=crs, transform=transform, nodata=0)
        with rasterio.open(folder / name, "w", **profile) as dst:
            dst.write(image)


def warp_whole(folder: Path, scene: Any, overlap: str, resampling: str) -> np.ndarray:
    """Every whole tile warped onto the scene's whole grid at once (GDAL, exact transformer,
    the kernel scaled by the tile's pixel-size ratio), painted by the overlap rule."""
    from rasterio.enums import Resampling

    info = scene.info
    out = np.zeros(info.shape, dtype=np.uint8)
    order = list(enumerate(sorted(TILES)))
    for i, name in order if overlap == "last" else order[::-1]:
        with rasterio.open(folder / name) as src:
            warped = np.zeros(info.shape, dtype=np.uint8)
            reproject(src.read(), warped, src_transform=src.transform, src_crs=src.crs,
                      src_nodata=0, dst_transform=Affine(*info.transform), dst_crs=info.crs_wkt,
                      dst_nodata=0, resampling=Resampling[resampling], tolerance=0,
                      XSCALE=scene.scales[i][0], YSCALE=scene.scales[i][1])  # fmt: skip
        out = np.where(warped != 0, warped, out)
    return out


def read_in_blocks(reader: Any, block: tuple[int, int]) -> np.ndarray:
    rows, cols = reader.info.spatial_shape
    out = np.zeros(reader.info.shape, dtype=reader.info.dtype)
    for r in range(0, rows, block[0]):
        for c in range(0, cols, block[1]):
            window = (slice(r, min(r + block[0], rows)), slice(c, min(c + block[1], cols)))
            out[(slice(None), *window)] = reader.read(window)
    return out


def test_the_grid_is_the_majoritys_said_in_one_line(tmp_path: Path) -> None:
    write_tiles(tmp_path / "s", 0)
    notes: list[str] = []
    (scene,), _ = discover_items(str(tmp_path / "s"), notes=notes, mosaic=True)
    assert notes == [
        f"scene 's' ({tmp_path / 's'}): warping 3 tiles onto EPSG:32632 (2 of 3 tiles) at "
        "10 x 10 (1 of 3 tiles), nearest resampling; set input.mosaic.crs / resolution / "
        "resampling to choose"
    ]
    a, _, left, _, e, top = scene.info.transform or ()
    assert (a, e) == (10.0, -10.0) and left % 10 == 0 and top % 10 == 0
    assert scene.info.crs_wkt is not None and "32632" in scene.info.crs_wkt
    given = open_item(str(tmp_path / "s"), mosaic={"crs": "EPSG:32633", "resolution": 5}).info
    assert given.transform is not None and given.transform[0] == 5.0
    assert given.attrs["mosaic_grid"].startswith("warping 3 tiles onto EPSG:32633 (given)")
    with pytest.raises(ItemReadError, match=r"`input.mosaic.crs` \('EPSG:9999999'\) is not a CRS"):
        open_item(str(tmp_path / "s"), mosaic={"crs": "EPSG:9999999"})


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block=st.tuples(st.integers(8, 48), st.integers(8, 48)),
    overlap=st.sampled_from(["first", "last"]),
    seed=st.integers(0, 2**16),
)
def test_nearest_warping_block_by_block_equals_warping_the_whole_mosaic(
    block: tuple[int, int], overlap: str, seed: int
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiles(root / "s", seed)
        scene = open_item(str(root / "s"), mosaic={"overlap": overlap})
        whole = warp_whole(root / "s", scene, overlap, "nearest")
        assert (whole != 0).mean() > 0.5  # the tiles fill most of the grid
        np.testing.assert_array_equal(read_in_blocks(scene, block), whole)
        # Labels over the warped scene (Otsu over it) equal the whole warped mosaic's.
        profile = {"driver": "GTiff", "height": whole.shape[1], "width": whole.shape[2]}
        profile.update(count=3, dtype="uint8", crs=scene.info.crs_wkt, nodata=0,
                       transform=Affine(*scene.info.transform or ()))  # fmt: skip
        with rasterio.open(root / "whole.tif", "w", **profile) as dst:
            dst.write(whole)
        expected = run(open_item(str(root / "whole.tif")), root / "w.zarr", block)
        np.testing.assert_array_equal(run(scene, root / "s.zarr", block), expected)
        assert expected.max() > 1


@pytest.mark.parametrize("resampling", ["bilinear", "cubic", "lanczos"])
def test_resampled_warping_in_blocks_is_within_a_grey_level_of_the_whole(
    tmp_path: Path, resampling: str
) -> None:
    write_tiles(tmp_path / "s", 3)
    scene = open_item(str(tmp_path / "s"), mosaic={"resampling": resampling})
    whole = warp_whole(tmp_path / "s", scene, "first", resampling)
    blocks = read_in_blocks(scene, (7, 9))
    np.testing.assert_array_equal(blocks != 0, whole != 0)
    # A window sums the kernel over a source window that starts elsewhere than the whole
    # tile's, and GDAL rounds the float sum to uint8: measured here, 1 to 4 of about 4,000
    # pixels 1 grey level apart, the others equal.
    differ = np.abs(blocks.astype(int) - whole)
    assert differ.max() <= 1 and (differ.max(axis=0) > 0).sum() <= 0.005 * (whole[0] != 0).sum()

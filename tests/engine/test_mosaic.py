"""Scenes (``input.mosaic``): tiles cut from one raster, run as one item, give the uncut
raster's output exactly; tiles that cannot make one scene are refused in one line."""

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

from segflow.errors import ItemReadError
from segflow.io import discover_items, open_item

ORIGIN = Affine(0.5, 0.0, 600_000.0, 0.0, -0.5, 5_200_000.0)  # 0.5 m pixels, UTM 32N
CRS = "EPSG:32632"


def write_tif(
    path: Path,
    image: np.ndarray,
    row: float,
    col: float,
    *,
    nodata: float | None,
    crs: str | None = CRS,
) -> None:
    profile = {"driver": "GTiff", "height": image.shape[1], "width": image.shape[2]}
    profile.update(count=image.shape[0], dtype=str(image.dtype), nodata=nodata)
    transform = ORIGIN @ Affine.translation(col, row)
    with rasterio.open(path, "w", **profile, crs=crs, transform=transform) as dst:
        dst.write(image)


@st.composite
def tilings(draw: st.DrawFn, max_side: int = 48) -> dict[str, Any]:
    """A raster cut into an uneven grid of tiles, each grown by up to 3 pixels down and
    right (overlaps), some left out (holes, and a smaller scene where an edge tile goes)."""
    shape = (draw(st.integers(12, max_side)), draw(st.integers(12, max_side)))
    # Cut points at least 4 pixels apart: tiles of a few pixels at least, so that Otsu
    # has values to work on whichever tiles are left out.
    cuts = [sorted(draw(st.sets(st.integers(1, n // 4 - 1), max_size=3))) for n in shape]
    edges = [[0, *(4 * c for c in cut), n] for cut, n in zip(cuts, shape, strict=True)]
    tiles = []
    for r0, r1 in zip(edges[0][:-1], edges[0][1:], strict=True):
        for c0, c1 in zip(edges[1][:-1], edges[1][1:], strict=True):
            grow = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            tiles.append((r0, min(r1 + grow[0], shape[0]), c0, min(c1 + grow[1], shape[1])))
    keep = draw(st.lists(st.booleans(), min_size=len(tiles), max_size=len(tiles)))
    kept = [t for t, k in zip(tiles, keep, strict=True) if k] or tiles[:1]
    block = (draw(st.integers(3, shape[0])), draw(st.integers(3, shape[1])))
    return {
        "shape": shape,
        "tiles": kept,
        "block": block,
        "dtype": draw(st.sampled_from(["uint8", "uint16"])),
        "overlap": draw(st.sampled_from(["first", "last", "mean"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def cut_scene(folder: Path, image: np.ndarray, tiles: list[tuple[int, ...]], nodata: Any) -> None:
    folder.mkdir()
    for i, (r0, r1, c0, c1) in enumerate(tiles):
        write_tif(folder / f"t{i:02d}.tif", image[:, r0:r1, c0:c1], r0, c0, nodata=nodata)


def uncut(image: np.ndarray, tiles: list[tuple[int, ...]]) -> tuple[np.ndarray, int, int]:
    """The raster as the tiles cover it: their bounding box, 0 (nodata) where none is."""
    covered = np.zeros(image.shape[1:], dtype=bool)
    for r0, r1, c0, c1 in tiles:
        covered[r0:r1, c0:c1] = True
    rows, cols = np.nonzero(covered)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return np.where(covered, image, 0)[:, box[0], box[1]], int(rows.min()), int(cols.min())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tilings())
def test_a_scene_of_tiles_gives_the_uncut_rasters_labels(case: dict[str, Any]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = make_raster(case["shape"], case["dtype"], case["seed"])
        # Half the cases: tiles carry their nodata tag; else the config names it.
        tagged = case["seed"] % 2 == 0
        cut_scene(root / "tiles", image, case["tiles"], 0 if tagged else None)
        expected, row, col = uncut(image, case["tiles"])
        write_tif(root / "whole.tif", expected, row, col, nodata=0)
        mosaic = {"overlap": case["overlap"], "nodata": None if tagged else 0}
        (scene,), failures = discover_items(str(root / "tiles"), mosaic=mosaic)
        assert failures == []
        assert scene.info.shape == expected.shape
        assert scene.info.transform == open_item(str(root / "whole.tif")).info.transform
        np.testing.assert_array_equal(scene.read((slice(None), slice(None))), expected)
        whole = run(open_item(str(root / "whole.tif")), root / "whole.zarr", case["block"])
        labels = run(scene, root / "scene.zarr", case["block"])
        np.testing.assert_array_equal(labels, whole)
        assert whole.max() > 0


def test_overlap_rules_pick_first_last_or_the_mean(tmp_path: Path) -> None:
    ones = np.full((1, 4, 4), 10, dtype=np.uint16)
    twos = np.full((1, 4, 4), 21, dtype=np.uint16)
    twos[0, 0, 0] = 0  # nodata: never wins, not in the mean
    (tmp_path / "s").mkdir()
    write_tif(tmp_path / "s" / "a.tif", ones, 0, 0, nodata=0)
    write_tif(tmp_path / "s" / "b.tif", twos, 2, 2, nodata=0)
    got = {}
    for rule in ("first", "last", "mean"):
        reader = open_item(str(tmp_path / "s"), mosaic={"overlap": rule})
        got[rule] = reader.read((slice(0, 6), slice(0, 6)))[0]
    assert got["first"][3, 3] == 10 and got["last"][3, 3] == 21
    assert got["mean"][3, 3] == 16  # 15.5 rounded half to even
    assert got["last"][2, 2] == got["mean"][2, 2] == 10  # b's nodata pixel: a's value
    for rule in got:
        assert got[rule][0, 5] == 0 and got[rule][5, 0] == 0  # holes: the nodata value
    assert reader.info.nodata == 0 and reader.info.format == "mosaic"


def test_the_scene_records_its_tiles_and_a_changed_tile_changes_its_fingerprint(
    tmp_path: Path,
) -> None:
    image = make_raster((20, 30), "uint8", 1)
    cut_scene(tmp_path / "s", image, [(0, 20, 0, 16), (0, 20, 14, 30)], None)
    before = open_item(str(tmp_path / "s"), mosaic=True).info
    tiles = before.attrs["tiles"]
    assert [t["window"] for t in tiles] == [[0, 0, 20, 16], [0, 14, 20, 16]]
    assert tiles[0]["path"].endswith("t00.tif") and len(tiles[0]["fingerprint"]) == 16
    write_tif(tmp_path / "s" / "t01.tif", image[:, :, 14:] // 2, 0, 14, nodata=None)
    after = open_item(str(tmp_path / "s"), mosaic=True).info
    assert after.fingerprint != before.fingerprint
    assert after.attrs["tiles"][0] == tiles[0]


def _scene_error(folder: Path, **mosaic: Any) -> str:
    readers, failures = discover_items(str(folder), mosaic=mosaic or True)
    assert readers == [] and len(failures) == 1
    return failures[0][1]


def _two_tiles(tmp_path: Path, second: np.ndarray, **kwargs: Any) -> Path:
    folder = tmp_path / "s"
    folder.mkdir()
    write_tif(folder / "a.tif", np.ones((3, 4, 4), dtype=np.uint8), 0, 0, nodata=None)
    write_tif(folder / "b.tif", second, kwargs.pop("row", 0), kwargs.pop("col", 4), **kwargs)
    return folder


@pytest.mark.parametrize(
    ("second", "kwargs", "message"),
    [
        (np.ones((4, 4, 4), np.uint8), {}, r"tile '.*b\.tif' has bands 4, the first tile "
         r"'.*a\.tif' 3: every tile of a scene must have the same bands"),
        (np.ones((3, 4, 4), np.uint16), {}, r"tile '.*b\.tif' has dtype uint16, the first "
         r"tile '.*a\.tif' uint8"),
        (np.ones((3, 4, 4), np.uint8), {"crs": "EPSG:32633"}, r"a warped scene needs a "
         r"nodata value for the pixels no tile covers, and the tiles do not share one"),
        (np.ones((3, 4, 4), np.uint8), {"row": 0, "col": 2}, r"tiles '.*a\.tif' and "
         r"'.*b\.tif' cover the same footprint|"),  # placeholder replaced below
        (np.ones((3, 4, 4), np.uint8), {"row": 2_400_000}, r"tile\(s\) '.*b\.tif' lie more "
         r"than 1000 km from the scene's other tiles \(`input.mosaic.max_gap_km`\)"),
        (np.ones((3, 4, 4), np.uint8), {"row": 6}, r"the tiles leave holes in the scene's "
         r"10 x 8 grid and have no nodata value to fill them with: set `input.mosaic.nodata`"),
    ],
)  # fmt: skip
def test_tiles_that_make_no_scene_are_refused_in_one_line(
    tmp_path: Path, second: np.ndarray, kwargs: dict[str, Any], message: str
) -> None:
    if message.endswith("|"):  # a duplicate: the same footprint as the first tile
        kwargs = {"row": 0, "col": 0}
        message = message[:-1] + r" \(4 x 4 pixels at row 0, col 0\): a duplicate tile"
    error = _scene_error(_two_tiles(tmp_path, second, nodata=None, **kwargs))
    assert "\n" not in error
    assert error.startswith(f"scene 's' ({tmp_path / 's'}): ")
    with pytest.raises(ItemReadError, match=message):
        open_item(str(tmp_path / "s"), mosaic=True)


def test_a_tile_without_crs_or_off_the_grid_or_another_resolution(tmp_path: Path) -> None:
    band = np.ones((3, 4, 4), np.uint8)
    folder = _two_tiles(tmp_path, band, nodata=None, crs=None)
    no_crs = r"tile '.*b\.tif' has no CRS, the scene's other tiles are in EPSG:32632: give it one"
    with pytest.raises(ItemReadError, match=no_crs):
        open_item(str(folder), mosaic=True)
    write_tif(folder / "b.tif", band, 0, 4.25, nodata=None)
    with pytest.raises(ItemReadError, match=r"tile '.*b\.tif' lies off the scene's pixel grid "
                       r"by 0.250 pixel .*: align it first \(gdalwarp -tap\)"):  # fmt: skip
        open_item(str(folder), mosaic=True)
    coarse = Affine(1.0, 0.0, 600_002.0, 0.0, -1.0, 5_200_000.0)
    with rasterio.open(folder / "b.tif", "w", driver="GTiff", height=4, width=4, count=3,
                       dtype="uint8", crs=None, transform=coarse) as dst:  # fmt: skip
        dst.write(band)
    # Another pixel size: warped, and a tile without a CRS cannot be.
    with pytest.raises(ItemReadError, match=r"tile '.*b\.tif' has no CRS, so it cannot be "
                       r"warped onto the scene's grid"):  # fmt: skip
        open_item(str(folder), mosaic={"nodata": 0})


def test_bad_settings_and_a_nodata_the_dtype_cannot_hold(tmp_path: Path) -> None:
    folder = _two_tiles(tmp_path, np.ones((3, 4, 4), np.uint8), nodata=None)
    assert "`input.mosaic.nodata` (-1) is not a uint8 value" in _scene_error(folder, nodata=-1)
    keys = "overlap, nodata, max_gap_km, crs, resolution, resampling"
    with pytest.raises(ItemReadError, match=rf"`input.mosaic` must be true or a mapping of "
                       rf"{keys} \(got \{{'overlp': 'last'\}}\)"):  # fmt: skip
        open_item(str(folder), mosaic={"overlp": "last"})


def test_a_scene_larger_than_the_limit_fails_alone_before_it_is_read(tmp_path: Path) -> None:
    from segflow.engine.budget import check_item_budget
    from segflow.errors import PlanError

    folder = _two_tiles(tmp_path, np.ones((3, 4, 4), np.uint8), nodata=None, row=400_000)
    info = open_item(str(folder), mosaic={"nodata": 0}).info
    assert info.shape == (3, 400_004, 8)
    too_large = r"item 's' \(.*s\): its metadata declares 3 x 400004 x 8 uint8, .* more than"
    with pytest.raises(PlanError, match=too_large + r" run.max_item_bytes \(1.0 MiB\): raise it"):
        check_item_budget(info, 256, max_item_bytes=2**20)


def test_far_tiles_are_found_among_many(tmp_path: Path) -> None:
    """Above 64 tiles the groups come from a Delaunay triangulation of the centres: the
    same answer as comparing every pair."""
    from segflow.io.scene_grid import far_tiles

    folder = tmp_path / "s"
    folder.mkdir()
    tile = np.ones((1, 2, 2), np.uint8)
    for i in range(70):
        write_tif(folder / f"t{i:02d}.tif", tile, 2 * (i // 10), 2 * (i % 10), nodata=None)
    write_tif(folder / "z1.tif", tile, 3_000_000, 0, nodata=None)  # 1,500 km south
    write_tif(folder / "z2.tif", tile, 3_000_002, 0, nodata=None)  # its neighbour
    infos = [open_item(str(p)).info for p in sorted(folder.iterdir())]
    assert [p.rsplit("/", 1)[-1] for p in far_tiles(infos, max_gap_km=1000)] == ["z1.tif", "z2.tif"]
    assert far_tiles(infos, max_gap_km=2000) == []
    assert far_tiles(infos[-3:], max_gap_km=1000) == [infos[-3].path]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-level SegNet-style network on 16^2 tiles (one band, percentile-scaled)."""
    import torch

    from segflow.models.card import ModelCard
    from segflow.models.checkpoint import save_checkpoint
    from segflow.models.networks import build_network

    card = ModelCard.model_validate(
        {
            "name": "tiny",
            "architecture": {"name": "segnet", "params": {"features": [4, 8]}},
            "spatial_dims": 2,
            "channels": [{"name": "grey", "normalization": {"method": "percentile"}}],
            "head": "foreground_boundary",
            "tile": (16, 16),
            "overlap": 0.25,
        }
    )
    torch.set_num_threads(1)  # the test machine is shared; tiny tensors gain nothing from more
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(path, build_network(card.network_spec()).eval(), card)
    return path


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(tilings(max_side=32))
def test_a_model_pipeline_on_a_scene_gives_the_uncut_rasters_output(
    tiny_model: Path, case: dict[str, Any]
) -> None:
    """Tiled inference with the item's percentiles (a global statistic) over the scene."""
    import tempfile

    step = {"op": "model", "path": str(tiny_model), "device": "cpu", "batch_size": 2,
            "output": "classes"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = make_raster(case["shape"], case["dtype"], case["seed"])[:1]
        cut_scene(root / "tiles", image, case["tiles"], 0)
        expected, row, col = uncut(image, case["tiles"])
        write_tif(root / "whole.tif", expected, row, col, nodata=0)
        (scene,), _ = discover_items(str(root / "tiles"), mosaic={"overlap": case["overlap"]})
        whole = run(open_item(str(root / "whole.tif")), root / "w.zarr", case["block"], [step])
        classes = run(scene, root / "s.zarr", case["block"], [step])
        np.testing.assert_array_equal(classes, whole)


def test_a_scene_keeps_few_tile_files_open_and_pickles_as_its_tiles(tmp_path: Path) -> None:
    import pickle

    from segflow.io import mosaic

    image = make_raster((8, 8 * (mosaic.MAX_OPEN_TILES + 8)), "uint8", 2)
    columns = range(0, image.shape[2], 8)
    cut_scene(tmp_path / "s", image, [(0, 8, c, c + 8) for c in columns], None)
    (tmp_path / "s" / "old.zarr").mkdir()  # a folder item beside the tiles: not a tile
    scene = open_item(str(tmp_path / "s"), mosaic=True)
    assert len(scene.tiles) == len(columns)
    np.testing.assert_array_equal(scene.read((slice(0, 8), slice(None))), image)
    handles = [t.reader.__dict__.get("_local") for t in scene.tiles]
    still_open = [h for h in handles if h is not None and getattr(h, "handle", None) is not None]
    assert len(still_open) == mosaic.MAX_OPEN_TILES
    # Sent with every block's task: each tile's path and metadata, its CRS text once.
    assert len(pickle.dumps(scene)) < 500 * len(scene.tiles)
    copy = pickle.loads(pickle.dumps(scene))
    np.testing.assert_array_equal(copy.read((slice(2, 7), slice(3, 90))), image[:, 2:7, 3:90])


def test_the_shipped_aerial_config_on_the_sample_cut_into_tiles(tmp_path: Path) -> None:
    """configs/aerial.yaml (nodata, luma, gaussian, Otsu, opening, label) on the bundled
    RGB.byte.tif cut into 7 uneven tiles, two overlapping, one left out: the scene's labels
    are the uncut raster's (with the left-out tile's pixels nodata) bit for bit."""
    from segflow.config import load_config

    root = Path(__file__).parents[2]
    config = load_config(root / "configs" / "aerial.yaml")
    with rasterio.open(root / "tests" / "data" / "aerial" / "RGB.byte.tif") as src:
        image, profile = src.read(), src.profile
    tiles = [(0, 300, 0, 410), (0, 310, 400, 791), (300, 718, 0, 200), (300, 520, 200, 560),
             (520, 718, 200, 560), (290, 718, 560, 791), (250, 330, 380, 430)]  # fmt: skip
    left_out = tiles.pop(4)
    (tmp_path / "s").mkdir()
    origin = profile["transform"]
    for i, (r0, r1, c0, c1) in enumerate(tiles):
        part = {**profile, "height": r1 - r0, "width": c1 - c0}
        part["transform"] = origin @ Affine.translation(c0, r0)
        with rasterio.open(tmp_path / "s" / f"tile{i}.tif", "w", **part) as dst:
            dst.write(image[:, r0:r1, c0:c1])
    expected = image.copy()
    expected[:, left_out[0] : left_out[1], left_out[2] : left_out[3]] = 0  # nodata
    with rasterio.open(tmp_path / "whole.tif", "w", **profile) as dst:
        dst.write(expected)
    scene = open_item(str(tmp_path / "s"), mosaic=True)
    assert scene.info.transform == tuple(origin)[:6] and scene.info.nodata == 0
    block = config.blocks.shape
    whole = run(open_item(str(tmp_path / "whole.tif")), tmp_path / "w.zarr", block, config.pipeline)
    labels = run(scene, tmp_path / "s.zarr", block, config.pipeline)
    np.testing.assert_array_equal(labels, whole)
    across = np.intersect1d(labels[299], labels[300])  # tile 0 above, tiles 2, 3 below
    assert whole.max() > 100 and np.count_nonzero(across) >= 5


def test_input_mosaic_in_a_config() -> None:
    from segflow.config import parse_config
    from segflow.errors import ConfigError

    def config(**mosaic: Any) -> Any:
        data = {"output": {"store": "o.zarr"}, "pipeline": [{"op": "otsu"}]}
        return parse_config({**data, "input": {"path": "tiles", **mosaic}})

    plain, on, given = config(), config(mosaic=True), config(mosaic={"overlap": "mean"})
    assert plain.input.reader_options() == {} and config(mosaic=False).input.mosaic is None
    assert on.input.reader_options()["mosaic"]["overlap"] == "first"
    assert given.input.reader_options()["mosaic"]["overlap"] == "mean"
    # A scene's settings change what is stored; no scene keeps the hash configs had before.
    assert "mosaic" not in plain.result_settings()["input"]
    assert len({plain.config_hash(), on.config_hash(), given.config_hash()}) == 3
    with pytest.raises(ConfigError, match=r"^input.mosaic.overlp: unknown key"):
        config(mosaic={"overlp": "mean"})


def test_an_unreadable_tile_fails_the_scene_naming_the_tile(tmp_path: Path) -> None:
    folder = _two_tiles(tmp_path, np.ones((3, 4, 4), np.uint8), nodata=None)
    (folder / "c.tif").write_text("not a TIFF")
    error = _scene_error(folder)
    assert error.startswith(f"scene 's' ({folder}): tile '{folder / 'c.tif'}': not a readable")
    assert "\n" not in error

"""A growing scene (issue 25): a rerun over a scene that gained tiles recomputes only the
blocks whose haloed window reads them, gives a fresh run's objects, and keeps the ids of
the objects the new tiles do not reach; a whole-scene statistic or a moved grid redoes
every block with one line; an interrupted growth leaves the previous version committed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _scenes import PIPELINE, make_raster
from test_mosaic import write_tif

from segflow.engine.blocks import plan_blocks
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import open_item
from segflow.store.commit import read_commit
from segflow.store.versions import list_versions

TILE = 24  # a 3 x 3 scene of 24^2 tiles, blocks of 8^2
BLOCK = 8
# A fixed threshold and a closing (halo 2) before the labels: nothing global.
FIXED: list[dict[str, Any]] = [
    {"op": "mask_nodata"},
    {"op": "combine_bands", "weights": [0.5, 0.3, 0.2]},
    {"op": "threshold", "value": 140},
    {"op": "binary_closing", "radius": 1},
    {"op": "label"},
]
HALO = 2  # binary_closing radius 1: a dilation then an erosion


def put_tiles(folder: Path, image: np.ndarray, cells: list[tuple[int, int]]) -> None:
    """Write the tiles of ``image`` at grid ``cells`` (row, column) into ``folder``."""
    folder.mkdir(exist_ok=True)
    for r, c in cells:
        part = image[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
        write_tif(folder / f"t{r}{c}.tif", part, r * TILE, c * TILE, nodata=0)


def segment(
    scene: Any, store: Path, pipeline: Any, progress: Any = None, block: int = BLOCK
) -> Any:
    with LocalExecutor(2) as executor:
        return segment_item(
            scene,
            pipeline,
            store=str(store),
            block_shape=block,
            executor=executor,
            regions=pipeline[-1]["op"] == "label",  # a region table of labels only
            ome=False,
            resumable=True,
            progress=progress,
        )


def labels_of(store: Path, item: str, name: str = "labels") -> np.ndarray:
    return np.asarray(zarr.open_array(str(store), path=f"{item}/{name}", mode="r")[...])


def recording(scene: Any) -> list[tuple[tuple[int, int], ...]]:
    """Record the windows ``scene`` is asked to read (the blocks that run the pipeline)."""
    reads: list[tuple[tuple[int, int], ...]] = []
    read = scene.read

    def record(region: tuple[slice, ...]) -> np.ndarray:
        reads.append(tuple((s.start, s.stop) for s in region))
        return read(region)

    scene.read = record
    return reads


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to the ids: one object of ``a`` is one object of ``b`` and back."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


# Pixels of the blocks that read the centre tile (cores 16..56), and their neighbours: an
# object with no pixel here has the same pixels before and after the tile came.
NEAR_CENTRE = (slice(15, 57), slice(15, 57))


def assert_kept_away_from(before: np.ndarray, after: np.ndarray, *boxes: Any) -> int:
    """Every object of ``before`` with no pixel in ``boxes`` is the same object with the
    same id in ``after``; returns how many there are."""
    near = np.zeros(before.shape, dtype=bool)
    for box in boxes:
        near[box] = True
    touching = set(np.unique(before[near]).tolist())
    count = 0
    for old_id in np.unique(before[before > 0]):
        if int(old_id) in touching:
            continue
        pixels = before == old_id
        np.testing.assert_array_equal(after == old_id, pixels)
        count += 1
    return count


def grown_scene(
    tmp_path: Path,
    pipeline: Any,
    cells: list[tuple[int, int]],
    shape: Any,
    output: str = "labels",
) -> Any:
    """Run the 3 x 3 scene without its centre tile, add ``cells``; return what the test
    needs: the image, the folder, the store, the first result and labels."""
    image = make_raster(shape, "uint8", 7)
    folder, store = tmp_path / "scene", tmp_path / "out.zarr"
    put_tiles(folder, image, [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)])
    first = segment(open_item(str(folder), mosaic=True), store, pipeline)
    assert first.status == "done", first.error
    before = labels_of(store, "scene", output)
    put_tiles(folder, image, cells)
    return image, folder, store, first, before


def fresh_labels(tmp_path: Path, folder: Path, pipeline: Any) -> np.ndarray:
    fresh = segment(open_item(str(folder), mosaic=True), tmp_path / "fresh.zarr", pipeline)
    assert fresh.status == "done", fresh.error
    return labels_of(tmp_path / "fresh.zarr", "scene")


def test_a_filled_hole_recomputes_only_the_blocks_that_read_it(tmp_path: Path) -> None:
    _, folder, store, _, before = grown_scene(tmp_path, FIXED, [(1, 1)], (72, 72))
    previous = read_commit(str(store), "scene")
    scene = open_item(str(folder), mosaic=True)
    reads = recording(scene)

    grown = segment(scene, store, FIXED)

    assert grown.status == "done", grown.error
    assert grown.warning is None
    grid = plan_blocks((72, 72), BLOCK, halo=HALO)
    centre = (slice(TILE, 2 * TILE), slice(TILE, 2 * TILE))
    expected = [b for b in grid.blocks() if all(
        o.start < c.stop and o.stop > c.start for o, c in zip(b.outer, centre, strict=True)
    )]  # fmt: skip
    assert len(expected) == 25  # the centre tile's 3 x 3 blocks and a ring that reads it
    # The region table reads every block's core for its intensities; the pipeline reads
    # the haloed windows of the blocks it runs on, and only those.
    cores = {tuple((s.start, s.stop) for s in b.core) for b in grid.blocks()}
    windows = [r for r in reads if r not in cores]
    assert sorted(windows) == sorted(tuple((s.start, s.stop) for s in b.outer) for b in expected)
    assert grown.n_reused == grid.n_blocks - len(expected) == 56
    after = labels_of(store, "scene")
    assert same_partition(after, fresh_labels(tmp_path, folder, FIXED))
    # Every object of the first version that is still the same pixels keeps its id; those
    # away from the new tile are such objects, new objects get ids above the old ones.
    kept = 0
    for old_id in np.unique(before[before > 0]):
        pixels = before == old_id
        now = np.unique(after[pixels])
        if len(now) == 1 and np.array_equal(after == now[0], pixels):
            assert now[0] == old_id
            kept += 1
    assert kept >= 0.8 * len(np.unique(before[before > 0])) and kept > 5
    assert assert_kept_away_from(before, after, NEAR_CENTRE) > 5
    new = np.unique(after[(before == 0) & (after > 0)])
    assert new.size and set(new[new > before.max()]) and before.max() < after.max()
    record = read_commit(str(store), "scene")
    assert record is not None and record["max_label"] == after.max()
    assert record["object_count"] == len(np.unique(after[after > 0]))
    assert previous is not None and record["version"] != previous["version"]
    assert list_versions(str(store), "scene") == [previous["version"], record["version"]]


def test_a_scene_that_grows_on_its_far_side_grows_too(tmp_path: Path) -> None:
    image, folder, store, _, before = grown_scene(tmp_path, FIXED, [], (72, 96))
    put_tiles(folder, image, [(1, 1), (0, 3), (1, 3), (2, 3)])  # the hole, a column right
    grown = segment(open_item(str(folder), mosaic=True), store, FIXED)
    assert grown.status == "done", grown.error
    after = labels_of(store, "scene")
    assert after.shape == (72, 96) and before.shape == (72, 72)
    assert 0 < grown.n_reused < grown.n_blocks
    assert same_partition(after, fresh_labels(tmp_path, folder, FIXED))
    # Blocks up to column 64 read only old tiles; the last old column's changed its window.
    assert assert_kept_away_from(before, after[:, :72], NEAR_CENTRE, np.s_[:, 63:]) > 3


def test_a_whole_scene_statistic_redoes_every_block_in_one_line(tmp_path: Path) -> None:
    _, folder, store, _, _ = grown_scene(tmp_path, PIPELINE, [(1, 1)], (72, 72))
    grown = segment(open_item(str(folder), mosaic=True), store, PIPELINE)
    assert grown.status == "done", grown.error
    assert grown.n_reused == 0
    assert grown.warning == (
        "scene 'scene': 1 tile(s) new, changed or gone since its last version; every block "
        "redone: its pipeline takes a whole-scene statistic (pipeline[2].otsu), which the "
        "new tiles change"
    )
    np.testing.assert_array_equal(
        labels_of(store, "scene"), fresh_labels(tmp_path, folder, PIPELINE)
    )


def test_a_grid_whose_origin_moves_is_redone_in_one_line(tmp_path: Path) -> None:
    image = make_raster((72, 72), "uint8", 3)
    folder, store = tmp_path / "scene", tmp_path / "out.zarr"
    put_tiles(folder, image, [(r, c) for r in (1, 2) for c in range(3)])
    assert segment(open_item(str(folder), mosaic=True), store, FIXED).status == "done"
    put_tiles(folder, image, [(0, 0)])  # a tile above: the origin moves up
    grown = segment(open_item(str(folder), mosaic=True), store, FIXED)
    assert grown.status == "done", grown.error
    assert grown.n_reused == 0
    assert grown.warning is not None and grown.warning.endswith(
        "every block redone: its grid moved (tiles added above or left of it move the "
        "origin; another pixel size or CRS)"
    )
    np.testing.assert_array_equal(labels_of(store, "scene"), fresh_labels(tmp_path, folder, FIXED))


@pytest.mark.parametrize("stream", [False, True])
def test_an_interrupted_growth_leaves_the_previous_version_and_resumes(
    tmp_path: Path, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segflow.engine import run as engine_run
    from segflow.engine.interrupt import clear_stop, request_stop

    if stream:  # every phase rereads its blocks (the mode of large scenes)
        monkeypatch.setattr(engine_run, "KEEP_LIMIT", 0)
    _, folder, store, _, before = grown_scene(tmp_path, FIXED, [(1, 1)], (72, 72))
    version = read_commit(str(store), "scene")

    def stop_halfway(label: str, done: int, total: int) -> None:
        if label.startswith("phase 2/2") and done >= total // 2:
            request_stop("test")  # as a Ctrl-C halfway through writing the grown scene

    try:
        cut = segment(open_item(str(folder), mosaic=True), store, FIXED, stop_halfway)
    finally:
        clear_stop()
    assert cut.status == "interrupted", cut.error
    assert read_commit(str(store), "scene") == version  # the previous version, whole
    np.testing.assert_array_equal(labels_of(store, "scene"), before)

    resumed = segment(open_item(str(folder), mosaic=True), store, FIXED)
    assert resumed.status == "done", resumed.error
    assert 0 < resumed.n_resumed < resumed.n_blocks and resumed.n_reused == 56
    after = labels_of(store, "scene")
    assert same_partition(after, fresh_labels(tmp_path, folder, FIXED))
    assert assert_kept_away_from(before, after, NEAR_CENTRE) > 5


def test_a_mask_pipeline_grows_and_equals_a_fresh_run(tmp_path: Path) -> None:
    mask_only = FIXED[:-1]  # no labels: the reused blocks' stored mask is their output
    _, folder, store, _, _ = grown_scene(tmp_path, mask_only, [], (72, 72), output="mask")
    put_tiles(folder, make_raster((72, 72), "uint8", 7), [(1, 1)])
    grown = segment(open_item(str(folder), mosaic=True), store, mask_only)
    assert grown.status == "done", grown.error
    assert grown.n_reused == 56 and grown.warning is None
    fresh = segment(open_item(str(folder), mosaic=True), tmp_path / "fresh.zarr", mask_only)
    assert fresh.status == "done", fresh.error
    np.testing.assert_array_equal(
        labels_of(store, "scene", "mask"), labels_of(tmp_path / "fresh.zarr", "scene", "mask")
    )
    assert grown.foreground_fraction == fresh.foreground_fraction


@pytest.fixture(scope="module")
def fixed_scale_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-level SegNet-style network on 16^2 tiles whose input scaling is fixed
    (0..255): no statistic of the scene, so a scene with it grows locally."""
    import torch

    from segflow.models.card import ModelCard
    from segflow.models.checkpoint import save_checkpoint
    from segflow.models.networks import build_network

    card = ModelCard.model_validate(
        {
            "name": "tiny-fixed",
            "architecture": {"name": "segnet", "params": {"features": [4, 8]}},
            "spatial_dims": 2,
            "channels": [
                {"name": "grey", "normalization": {"method": "fixed", "low": 0, "high": 255}}
            ],
            "head": "semantic",
            "classes": ["background", "object"],
            "tile": (16, 16),
            "overlap": 0.25,
        }
    )
    torch.set_num_threads(1)  # the test machine is shared; tiny tensors gain nothing from more
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-fixed"
    save_checkpoint(path, build_network(card.network_spec()).eval(), card)
    return path


def test_a_model_pipeline_grows_where_the_grid_stays_and_not_where_it_grows(
    tmp_path: Path, fixed_scale_model: Path
) -> None:
    from segflow.engine.api import segment as segment_array

    grey = {"op": "combine_bands", "weights": [0.5, 0.3, 0.2]}
    infer = {"op": "model", "path": str(fixed_scale_model), "device": "cpu"}
    # The random network's "object" probability, cut at its median over the raster: the
    # labels are then many objects (its classes alone are one object everywhere).
    raster = make_raster((72, 96), "uint8", 7)
    probabilities = segment_array(raster, [grey, {**infer, "output": "probabilities"}],
                                  channel_axis=0)  # fmt: skip
    cut = float(np.median(probabilities[1]))
    model = [
        grey,
        {**infer, "output": "probabilities"},
        {"op": "combine_bands", "weights": [0.0, 1.0]},
        {"op": "threshold", "value": cut},
        {"op": "label"},
    ]
    image, folder, store, _, before = grown_scene(tmp_path, model, [(1, 1)], (72, 96))
    grown = segment(open_item(str(folder), mosaic=True), store, model)
    assert grown.status == "done", grown.error
    assert 0 < grown.n_reused < grown.n_blocks and grown.warning is None
    after = labels_of(store, "scene")
    assert after.max() > 0 and same_partition(after, fresh_labels(tmp_path, folder, model))
    # The model's halo is 15 (16^2 tiles, overlap 4): blocks with cores 8..64 read the
    # new tile; objects with no pixel there nor next to them are the same objects.
    assert assert_kept_away_from(before, after, np.s_[7:65, 7:65]) > 2

    put_tiles(folder, image, [(0, 3), (1, 3), (2, 3)])  # the grid grows right
    wider = segment(open_item(str(folder), mosaic=True), store, model)
    assert wider.status == "done", wider.error
    assert wider.n_reused == 0 and wider.warning is not None
    assert wider.warning.endswith(
        "the scene's grid grew and a model step's tiles end flush with its edge"
    )
    np.testing.assert_array_equal(
        labels_of(store, "scene"), fresh_labels(tmp_path / "w", folder, model)
    )


GROW_IN_A_PROCESS = """
import sys
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import open_item
from test_scene_growth import BLOCK, FIXED
with LocalExecutor(2) as executor:
    segment_item(open_item(sys.argv[1], mosaic=True), FIXED, store=sys.argv[2],
                 block_shape=BLOCK, executor=executor, regions=True, ome=False, resumable=True)
"""


def test_a_growth_killed_mid_write_leaves_the_previous_version(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    _, folder, store, _, before = grown_scene(tmp_path, FIXED, [(1, 1)], (72, 72))
    version = read_commit(str(store), "scene")
    env = {**os.environ, "SEGFLOW_FAULT": "output-block-done@20"}  # SIGKILL mid output
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    killed = subprocess.run(
        [sys.executable, "-c", GROW_IN_A_PROCESS, str(folder), str(store)], env=env, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert read_commit(str(store), "scene") == version
    np.testing.assert_array_equal(labels_of(store, "scene"), before)

    resumed = segment(open_item(str(folder), mosaic=True), store, FIXED)
    assert resumed.status == "done", resumed.error
    assert resumed.n_resumed >= 10 and resumed.n_reused == 56
    assert same_partition(labels_of(store, "scene"), fresh_labels(tmp_path, folder, FIXED))


def bar_tiles(folder: Path, middle: str, columns: Sequence[int] = (0, 1, 2)) -> None:
    """Three 24^2 tiles in a row with a bar (rows 10..14) across; the ``middle`` tile is
    ``"bar"`` (the bar goes through), ``"cut"`` (background there) or ``"none"`` (a hole).
    Only the tiles of ``columns`` are written (a rewritten file is a changed tile)."""
    image = np.full((3, 24, 72), 10, dtype=np.uint8)
    image[:, 10:14, :] = 200
    image[:, 18:20, 60:70] = 200  # a small object in the last tile
    if middle == "cut":
        image[:, :, 24:48] = 10
    folder.mkdir(exist_ok=True)
    for c in columns:
        path = folder / f"t0{c}.tif"
        if c == 1 and middle == "none":
            path.unlink(missing_ok=True)
            continue
        write_tif(path, image[:, :, c * 24 : (c + 1) * 24], 0, c * 24, nodata=0)


@pytest.mark.parametrize(("start", "then", "expected"), [
    ("none", "bar", [1, 3]),  # two bars joined by the new tile: one object, the smaller id
    ("bar", "cut", [1, 2, 3]),  # a bar cut by a changed tile: its first part keeps the id,
                                # the other part is new (3, after the small object's 2)
])  # fmt: skip
def test_joined_objects_keep_the_smaller_id_and_a_cut_one_keeps_it_on_its_first_part(
    tmp_path: Path, start: str, then: str, expected: list[int]
) -> None:
    folder, store = tmp_path / "scene", tmp_path / "out.zarr"
    bar_tiles(folder, start)
    assert segment(open_item(str(folder), mosaic=True), store, FIXED).status == "done"
    before = labels_of(store, "scene")
    bar_tiles(folder, then, columns=[1])
    grown = segment(open_item(str(folder), mosaic=True), store, FIXED)
    assert grown.status == "done", grown.error
    assert grown.n_reused > 0
    after = labels_of(store, "scene")
    assert same_partition(after, fresh_labels(tmp_path, folder, FIXED))
    assert sorted(np.unique(after[after > 0]).tolist()) == expected
    assert after[12, 0] == before[12, 0] == 1  # the bar's first pixel: id 1 throughout
    assert after[19, 65] == before[19, 65]  # the small object: untouched
    assert after[12, 60] == (3 if then == "cut" else 1)
    assert read_commit(str(store), "scene")["max_label"] == max(expected)


# Issue 25's scene: 104 tiles (8 rows of 13), of which four, far apart, are missing at
# first and come later. 16^2 tiles, one 16^2 block each.
ROWS, COLS, SMALL = 8, 13, 16
LATE = [(1, 2), (2, 9), (5, 5), (6, 11)]


def _put_small(folder: Path, image: np.ndarray, cells: list[tuple[int, int]]) -> None:
    folder.mkdir(exist_ok=True)
    for r, c in cells:
        part = image[:, r * SMALL : (r + 1) * SMALL, c * SMALL : (c + 1) * SMALL]
        write_tif(folder / f"t{r:02d}{c:02d}.tif", part, r * SMALL, c * SMALL, nodata=0)


def _regions_by_pixels(store: Path, labels: np.ndarray) -> dict[tuple[int, ...], dict]:
    """Each region row keyed by its object's first pixel (ids aside): rows of two runs
    that found the same objects compare whatever ids they gave them."""
    import pyarrow.parquet as pq

    table = pq.read_table(store / "scene" / "regions.parquet").to_pylist()
    first = {}
    flat = labels.ravel()
    order = np.flatnonzero(flat)
    ids, where = np.unique(flat[order], return_index=True)
    for object_id, at in zip(ids.tolist(), order[where].tolist(), strict=True):
        first[object_id] = np.unravel_index(at, labels.shape)
    rows = {}
    for row in table:
        key = tuple(int(v) for v in first[int(row.pop("label"))])
        rows[key] = row
    return rows


def _median_cut_model(raster: np.ndarray, model: Path) -> list[dict[str, Any]]:
    """The random network's "object" probability cut at its median over ``raster``: many
    objects (its classes alone are one object everywhere)."""
    from segflow.engine.api import segment as segment_array

    grey = {"op": "combine_bands", "weights": [0.5, 0.3, 0.2]}
    infer = {"op": "model", "path": str(model), "device": "cpu", "output": "probabilities"}
    probabilities = segment_array(raster, [grey, infer], channel_axis=0)
    cut = float(np.median(probabilities[1]))
    return [grey, infer, {"op": "combine_bands", "weights": [0.0, 1.0]},
            {"op": "threshold", "value": cut}, {"op": "label"}]  # fmt: skip


@pytest.mark.parametrize("kind", ["fixed", "model"])
def test_a_100_tile_scene_grown_by_4_tiles_recomputes_only_their_blocks(
    tmp_path: Path, kind: str, fixed_scale_model: Path
) -> None:
    shape = (ROWS * SMALL, COLS * SMALL)
    image = make_raster(shape, "uint8", 11)
    pipeline = FIXED if kind == "fixed" else _median_cut_model(image, fixed_scale_model)
    halo = HALO if kind == "fixed" else 15  # the model: 16^2 tiles, overlap 4
    folder, store = tmp_path / "scene", tmp_path / "out.zarr"
    cells = [(r, c) for r in range(ROWS) for c in range(COLS)]
    _put_small(folder, image, [cell for cell in cells if cell not in LATE])
    first = segment(open_item(str(folder), mosaic=True), store, pipeline, block=SMALL)
    assert first.status == "done", first.error
    before = labels_of(store, "scene")
    assert len(list(folder.iterdir())) == 100

    _put_small(folder, image, LATE)
    scene = open_item(str(folder), mosaic=True)
    reads = recording(scene)
    grown = segment(scene, store, pipeline, block=SMALL)

    assert grown.status == "done", grown.error
    assert grown.warning is None
    grid = plan_blocks(shape, SMALL, halo=halo)
    late = [(slice(r * SMALL, (r + 1) * SMALL), slice(c * SMALL, (c + 1) * SMALL)) for r, c in LATE]
    expected = [b for b in grid.blocks() if any(all(
        o.start < t.stop and o.stop > t.start for o, t in zip(b.outer, tile, strict=True)
    ) for tile in late)]  # fmt: skip
    assert len(expected) == 4 * 9  # each late tile's block and the eight around it
    cores = {tuple((s.start, s.stop) for s in b.core) for b in grid.blocks()}
    windows = [r for r in reads if r not in cores]  # the region table reads every core
    assert sorted(windows) == sorted(tuple((s.start, s.stop) for s in b.outer) for b in expected)
    assert grown.n_reused == 104 - 36
    # The objects of a fresh run on all 104 tiles, and its region table row for row.
    after = labels_of(store, "scene")
    fresh = fresh_labels(tmp_path, folder, pipeline)
    assert after.max() > 0 and same_partition(after, fresh)
    assert _regions_by_pixels(store, after) == _regions_by_pixels(tmp_path / "fresh.zarr", fresh)
    # Objects away from the late tiles' blocks keep their pixels and their ids.
    near = [tuple(slice(max(s.start - SMALL - 1, 0), s.stop + SMALL + 1) for s in tile)
            for tile in late]  # fmt: skip
    assert assert_kept_away_from(before, after, *near) > 20

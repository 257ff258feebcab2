"""The store's own names are reserved: an image named like them gets an id of its own and
the store's index, vectors and evaluation table keep working; Unicode names keep their
letters; a store damaged by an earlier segflow is refused with what to do; segflow stores
inside the input folder are outputs, not items."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from segflow.config import parse_config
from segflow.engine.collection import keep_recorded_ids, plan_collection, run_item
from segflow.engine.executor import LocalExecutor
from segflow.errors import StoreError
from segflow.io import assign_item_ids, discover_items
from segflow.store.commit import check_store, prepare_store
from segflow.store.index import compact_index, read_index
from segflow.store.names import (
    EVALUATION_NAME,
    INDEX_NAME,
    VECTORS_NAME,
    ZARR_JSON,
    is_reserved_name,
    reserve_name,
    reserved_names,
    unreserved_id,
)
from segflow.store.vectors import compact_vectors, read_vectors

# Files named like what a store keeps at its root.
STORE_LIKE = ["index.parquet.tif", "vectors.parquet.tif", "evaluation.parquet.tif", "zarr.json.tif"]


def write_tiles(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        tifffile.imwrite(folder / name, (rng.random((40, 40)) * 60000).astype(np.uint16))


def config_for(tmp_path: Path, *, store: Path | None = None, **output: Any) -> Any:
    return parse_config(
        {
            "name": "tiles",
            "input": {"path": str(tmp_path / "in")},
            "output": {"store": str(store or tmp_path / "out.zarr"), "chunks": [32, 32], **output},
            "blocks": {"shape": [32, 32]},
            "pipeline": [{"op": "otsu"}, {"op": "label"}],
        }
    )


def run_collection(cfg: Any, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """One run as the flow does it, without Prefect: plan, items, records compacted."""
    check_store(cfg.output.store)
    plan = plan_collection(cfg, notes=notes)
    prepare_store(cfg.output.store)
    executor = LocalExecutor(1)
    try:
        rows = [run_item(cfg, item, executor=executor, run_id="r")[0] for item in plan.work()]
    finally:
        executor.close()
    compact_index(cfg.output.store)
    return rows


def test_reserved_names_cover_every_root_file_of_a_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from segflow.store import names

    monkeypatch.setattr(names, "_RESERVED", dict(names._RESERVED))  # restored afterwards
    assert set(reserved_names()) >= {
        ZARR_JSON,
        INDEX_NAME,
        VECTORS_NAME,
        EVALUATION_NAME,
        "stac",
        ".segflow",
    }
    # Any case (case-insensitive filesystems) and the files written aside before a rename.
    assert is_reserved_name("Index.Parquet") and is_reserved_name("zarr.json.segflow-tmp")
    assert not is_reserved_name("index_parquet") and not is_reserved_name("index")
    reserve_name("report.html", "its run report")  # a writer's own root file
    assert unreserved_id("report.html") == "report_html"
    with pytest.raises(ValueError, match=r"one path component, got 'a/b'"):
        reserve_name("a/b", "nothing")


def test_ids_avoid_the_store_names_with_a_stated_stable_rule() -> None:
    notes: list[str] = []
    paths = [f"d/{name}" for name in [*STORE_LIKE, "index_parquet.tif"]]
    ids = assign_item_ids(paths, notes=notes)
    assert ids == [
        "index_parquet",
        "vectors_parquet",
        "evaluation_parquet",
        "zarr_json",
        "index_parquet_2",  # a file already called so: unique ids, suffix in path order
    ]
    assert assign_item_ids(paths) == ids  # the same every run
    assert notes[0] == (
        "item 'd/index.parquet.tif': 'index.parquet' is where a store keeps its collection "
        "index, so its id is 'index_parquet'"
    )
    assert (
        "'zarr.json' is where a store keeps its Zarr metadata, so its id is 'zarr_json'" in notes[3]
    )
    assert len(notes) == 4


def test_unicode_names_keep_their_letters() -> None:
    ids = assign_item_ids(
        [
            "d/снимок.png",
            "d/память.png",
            "d/cafe\u0301 1.png",
            "d/画像.png",
            "d/a/b.png",
            "d/...png",
        ]
    )
    # NFC: macOS's decomposed "café" gives the id a composed name gives.
    assert ids == ["снимок", "память", "caf\u00e9_1", "画像", "b", "item.."]
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    for item_id in ids:  # each a valid Zarr v3 node name
        group.create_group(item_id)
    assert sorted(group.group_keys()) == sorted(ids)


def test_images_named_like_the_store_files_are_items_and_the_store_still_works(
    tmp_path: Path,
) -> None:
    write_tiles(tmp_path / "in", [*STORE_LIKE, "plain.tif"])
    cfg = config_for(tmp_path, vectors=True)
    notes: list[str] = []

    rows = run_collection(cfg, notes)

    store = Path(cfg.output.store)
    ids = ["evaluation_parquet", "index_parquet", "plain", "vectors_parquet", "zarr_json"]
    assert sorted((r["id"], r["status"]) for r in rows) == [(i, "done") for i in ids]
    assert sum("is where a store keeps" in note for note in notes) == 4
    for name in (INDEX_NAME, VECTORS_NAME, EVALUATION_NAME):  # no item group took them
        assert not (store / name / "zarr.json").exists()
    index = read_index(store)
    assert sorted(index["id"]) == ids and set(index["status"]) == {"done"}
    path, _ = compact_vectors(str(store))
    assert path is not None and (store / VECTORS_NAME).is_dir()
    assert set(read_vectors(str(store))["item"]) == set(ids)
    # The evaluation flow's table goes where it always does.
    pd.DataFrame({"id": ids}).to_parquet(store / EVALUATION_NAME)
    check_store(str(store))
    # The next run finds everything done under the same ids.
    plan = plan_collection(cfg)
    assert plan.todo == [] and sorted(r["id"] for r in plan.skipped) == ids


def test_a_store_an_image_broke_is_refused_with_what_to_do(tmp_path: Path) -> None:
    store = tmp_path / "out.zarr"
    prepare_store(str(store))
    # What an earlier segflow left: an item group where the index belongs.
    zarr.open_group(store / INDEX_NAME, mode="w", zarr_format=3)
    message = (
        rf"output.store '{store}': '{store}/index.parquet' is a folder \(an item group of an "
        r"image named 'index.parquet', from a segflow that did not reserve the name\) where "
        r"the store keeps its collection index: move that folder out of the store, and the "
        r"next run segments the image again as 'index_parquet'"
    )
    with pytest.raises(StoreError, match=message):
        check_store(str(store))
    # The index is never read as a traceback either (a flow plans before it checks).
    (store / ".segflow" / "records").mkdir(parents=True)
    with pytest.raises(StoreError, match=message):
        read_index(str(store))
    # The STAC view's folder (reserved since segflow writes it): an item named 'stac'.
    older = tmp_path / "older.zarr"
    prepare_store(str(older))
    zarr.open_group(older / "stac", mode="w", zarr_format=3)
    with pytest.raises(StoreError, match=r"keeps its STAC collection: .* again as 'stac_'"):
        check_store(str(older))


def test_a_recorded_reserved_id_is_not_kept() -> None:
    items = [{"id": "index_parquet", "path": "/d/index.parquet.tif", "fingerprint": "f"}]
    rows = [{"id": "index.parquet", "source": "/d/index.parquet.tif", "status": "done"}]
    kept, _ = keep_recorded_ids(items, [], rows)
    assert [i["id"] for i in kept] == ["index_parquet"]


def test_a_store_in_the_input_folder_is_not_an_item_on_the_next_run(tmp_path: Path) -> None:
    write_tiles(tmp_path / "in", ["a.tif"])
    zarr.create_array(tmp_path / "in" / "raw.zarr", data=np.zeros((40, 40), np.uint16))
    cfg = config_for(tmp_path, store=tmp_path / "in" / "out.zarr")
    first = run_collection(cfg)
    assert sorted((r["id"], r["status"]) for r in first) == [("a", "done"), ("raw", "done")]

    notes: list[str] = []
    plan = plan_collection(cfg, notes=notes)

    assert plan.todo == [] and plan.failed == []
    assert sorted(r["id"] for r in plan.skipped) == ["a", "raw"]  # the plain Zarr input stays
    assert notes == [
        f"collection '{tmp_path / 'in'}': left out 1 segflow store(s), outputs of segflow "
        f"runs and not inputs: '{tmp_path / 'in' / 'out.zarr'}'"
    ]


def test_segflow_stores_below_the_input_are_left_out_whatever_their_name(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data"
    write_tiles(root / "site", ["a.tif"])
    zarr.create_array(root / "site" / "raw.zarr", data=np.zeros((4, 4), np.uint8))
    zarr.open_group(root / "plain_group.zarr", mode="w", zarr_format=3)
    prepare_store(str(root / "site" / "run1.zarr"))
    prepare_store(str(root / "results"))  # no .zarr name: still a store by its marker
    tifffile.imwrite(root / "results" / "inside.tif", np.zeros((4, 4), np.uint8))

    for pattern in (str(root), f"{root}/**/*"):
        notes: list[str] = []
        readers, failures = discover_items(pattern, notes=notes)
        paths = sorted(os.path.relpath(r.info.path, root) for r in readers)
        assert paths == ["site/a.tif", "site/raw.zarr"]
        # A plain Zarr group is still tried as an item (and fails alone, as before).
        assert [os.path.relpath(p, root) for p, _ in failures] == ["plain_group.zarr"]
        [note] = notes
        assert "segflow store(s), outputs of segflow runs and not inputs" in note
        assert f"'{root / 'results'}'" in note
    # The run's own store is left out even before it carries the marker (a first run killed
    # after taking its lock).
    (root / "mine.zarr" / ".segflow").mkdir(parents=True)
    readers, _ = discover_items(str(root), store=str(root / "mine.zarr"))
    assert "mine.zarr" not in [os.path.basename(r.info.path) for r in readers]

"""Consolidated metadata per item: opening one item reads that item's metadata only, at any
number of items; older root-consolidated stores open and are migrated by their next run."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import warnings
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
from fsspec.implementations.local import LocalFileSystem

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader
from segflow.store.commit import STORE_FORMAT, prepare_store, read_commit
from segflow.store.metadata import is_migrated, migrate_store
from segflow.tasks.store import writing_store

PIPELINE = [{"op": "threshold", "value": 0.5}, {"op": "label"}]


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under ``counting://``, recording every file it reads."""

    protocol = ("counting",)
    reads: ClassVar[list[tuple[str, int]]] = []

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> bytes:
        data = super().cat_file(path, start, end, **kwargs)
        CountingFileSystem.reads.append((str(path), len(data)))
        return bytes(data)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = super()._open(path, mode, **kwargs)
        CountingFileSystem.reads.append((str(path), handle.size if "r" in mode else 0))
        return handle

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return str(LocalFileSystem._strip_protocol(str(path).removeprefix("counting://")))


def _store_of(tmp_path: pathlib.Path, n_items: int) -> pathlib.Path:
    """A store of ``n_items`` committed items (one segmented, the rest copies of it)."""
    store = tmp_path / f"out{n_items}.zarr"
    image = (np.random.default_rng(0).random((40, 50)) > 0.7).astype(np.float32)
    with LocalExecutor(1) as executor:
        result = segment_item(
            ArrayReader(image, "item0"), PIPELINE, store=str(store), block_shape=16,
            executor=executor, regions=True,
        )  # fmt: skip
    assert result.status == "done", result.error
    for i in range(1, n_items):
        shutil.copytree(store / "item0", store / f"item{i}")
    return store


def _metadata_read(open_item: Any) -> tuple[set[str], int]:
    """The metadata files (``zarr.json``) ``open_item()`` reads, and their bytes."""
    # Registered here, not at import: a module imported twice (under two names) would
    # otherwise leave the other copy's class registered.
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    CountingFileSystem.reads.clear()
    open_item()
    names = {p for p, _ in CountingFileSystem.reads if p.endswith("zarr.json")}
    return names, sum(n for p, n in CountingFileSystem.reads if p.endswith("zarr.json"))


def test_opening_one_item_reads_its_metadata_only_at_any_store_size(
    tmp_path: pathlib.Path,
) -> None:
    small, large = _store_of(tmp_path, 2), _store_of(tmp_path, 200)
    for store in (small, large):
        assert (store / "zarr.json").stat().st_size < 1000  # the root stays small
    by_path = {
        s: _metadata_read(lambda s=s: xr.open_zarr(f"counting://{s}/item1")) for s in (small, large)
    }
    names, size = by_path[large]
    assert names == {f"{large}/item1/zarr.json"}  # one file: the item's consolidated metadata
    assert size == by_path[small][1]  # the same bytes at 2 and 200 items

    def with_group(store: pathlib.Path) -> Any:
        # xarray's default (consolidated=None) first looks for consolidated metadata at the
        # root, finds none and says so; it then reads the item group's.
        with pytest.warns(RuntimeWarning, match="consolidated metadata"):
            return xr.open_zarr(f"counting://{store}", group="item1")

    names, size = _metadata_read(lambda: with_group(large))
    assert names == {f"{large}/zarr.json", f"{large}/item1/zarr.json"}
    assert size == _metadata_read(lambda: with_group(small))[1]
    ds = xr.open_zarr(f"{large}/item7")
    assert int(ds["labels"].max()) == int(xr.open_zarr(f"{large}/item0")["labels"].max()) > 0


def _make_legacy(store: pathlib.Path) -> None:
    """Turn ``store`` into what segflow wrote before: no per-item consolidated metadata, the
    whole store consolidated into the root, a marker without the layout."""
    for group in store.iterdir():
        node_file = group / "zarr.json"
        if group.is_dir() and not group.name.startswith(".") and node_file.exists():
            node = json.loads(node_file.read_text())
            node.pop("consolidated_metadata", None)
            node_file.write_text(json.dumps(node))
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["segflow"] = {"format": 1}
    (store / "zarr.json").write_text(json.dumps(root))
    with warnings.catch_warnings():  # zarr's notes on the Parquet files: not Zarr nodes
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store), zarr_format=3)


def _root(store: pathlib.Path) -> dict[str, Any]:
    return dict(json.loads((store / "zarr.json").read_text()))


def test_an_older_store_opens_and_is_migrated_only_when_asked(tmp_path: pathlib.Path) -> None:
    store = _store_of(tmp_path, 3)
    _make_legacy(store)
    before = _root(store)
    assert "item2" in before["consolidated_metadata"]["metadata"]
    assert not is_migrated(str(store))
    ds = xr.open_zarr(str(store), group="item2")  # as before: the root's copy, no warning
    assert "labels" in ds
    prepare_store(str(store))  # what every run does first: the marker's format moves up,
    after = _root(store)  # nothing else of the root changes
    assert after["attributes"].pop("segflow")["format"] == STORE_FORMAT
    before["attributes"].pop("segflow")
    assert after == before

    note = migrate_store(str(store))

    assert note is not None and "3 of 3 item group(s) consolidated" in note
    assert "consolidated_metadata" not in _root(store)
    assert is_migrated(str(store))
    for name in ("item0", "item1", "item2"):
        node = json.loads((store / name / "zarr.json").read_text())
        assert "labels" in node["consolidated_metadata"]["metadata"]
        assert read_commit(str(store), name) is not None  # the commit record is kept
    assert "labels" in xr.open_zarr(f"{store}/item2")
    assert migrate_store(str(store)) is None  # once


def test_a_new_store_starts_migrated(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "new.zarr"
    prepare_store(str(store))
    assert is_migrated(str(store))
    assert migrate_store(str(store)) is None


def test_a_direct_commit_into_an_older_store_drops_its_stale_root_copy(
    tmp_path: pathlib.Path,
) -> None:
    """segment_item called directly (no flow, so no migration) into a root-consolidated
    store: the root's copy, which would not list the new item, goes."""
    store = _store_of(tmp_path, 2)
    _make_legacy(store)
    image = (np.random.default_rng(1).random((40, 50)) > 0.7).astype(np.float32)
    with LocalExecutor(1) as executor:
        result = segment_item(
            ArrayReader(image, "late"), PIPELINE, store=str(store), block_shape=16,
            executor=executor,
        )  # fmt: skip
    assert result.status == "done", result.error
    assert "consolidated_metadata" not in _root(store)
    assert "labels" in xr.open_zarr(f"{store}/late")
    assert zarr.open_array(str(store), path="item1/labels", mode="r").shape == (40, 50)


def test_the_next_run_migrates_an_older_store_with_one_line(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store a run holds (``writing_store``): an older store is migrated by the run,
    and says so in its log, once."""
    store = _store_of(tmp_path, 2)
    _make_legacy(store)
    with caplog.at_level(logging.WARNING, logger="segflow"), writing_store(str(store), "run-1"):
        pass
    lines = [r.getMessage() for r in caplog.records if "consolidated per item" in r.getMessage()]
    assert len(lines) == 1 and "2 of 2 item group(s)" in lines[0]
    assert "consolidated_metadata" not in json.loads((store / "zarr.json").read_text())
    assert read_commit(str(store), "item1") is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segflow"), writing_store(str(store), "run-2"):
        pass
    assert not [r for r in caplog.records if "consolidated per item" in r.getMessage()]


def test_json_files_written_at_once_by_many_threads_all_land(tmp_path: pathlib.Path) -> None:
    """Items committing at once in one run write their run's run.json together (CI saw one
    rename the other's file aside away: FileNotFoundError); every write lands, whole."""
    from concurrent.futures import ThreadPoolExecutor

    from segflow.store.metadata import write_json

    target = tmp_path / "runs" / "r" / "run.json"

    def write(k: int) -> None:
        for _ in range(50):
            write_json(str(target), {"writer": k, "padding": "x" * 4000})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert json.loads(target.read_text())["writer"] in range(8)
    assert [p.name for p in target.parent.iterdir()] == ["run.json"]

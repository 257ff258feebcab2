"""Smoke tests of the segment flow: real Prefect (test harness), real Dask, real files."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray
from _geodata import N_BLOBS, blob_image, collection_config, write_geotiff

from segflow.flows.segment import ItemsFailedError, segment_collection
from segflow.store.index import read_index
from segflow.tasks.artifacts import output_hash

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(config: dict[str, object], **kwargs: object) -> tuple[str, dict[str, object]]:
    state = segment_collection(config, return_state=True, **kwargs)
    result = state.result(raise_on_failure=False)
    if isinstance(result, ItemsFailedError):
        return state.type.value, result.summary
    assert isinstance(result, dict), result
    return state.type.value, result


def artifacts_of(flow_run_id: object) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])  # type: ignore[list-item]
            )
        )


def test_bad_items_fail_alone_and_reruns_skip_done_items(
    collection: Path, tmp_path: Path, dask_address: str
) -> None:
    store = tmp_path / "out.zarr"
    config = collection_config(collection, store, dask_address)

    state, summary = run(config)

    # A corrupt file and an item the pipeline cannot take fail alone, named with the reason;
    # the flow run ends Failed so the UI shows red.
    assert state == "FAILED"
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 2, 0)
    errors = {f["id"]: f["error"] for f in summary["failures"]}  # type: ignore[attr-defined]
    assert set(errors) == {"broken", "rgb"}
    assert "broken.tif" in errors["broken"] and "not a readable GeoTIFF/TIFF" in errors["broken"]
    assert "'rgb'" in errors["rgb"] and "single-channel" in errors["rgb"]
    # The failed item's task run is red in the UI with the reason; the others are green.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort="START_TIME_DESC", limit=1)[0]
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    # The runs list says what ran: the config's name and the time, the config and the store.
    assert re.fullmatch(r"tiles-\d{4}-\d\d-\d\dT\d\d:\d\dZ", flow_run.name), flow_run.name
    assert {"segflow", "config:tiles", f"store:{store}"} <= set(flow_run.tags)
    # Progress: the run's progress artifact ends at 100 % with the items' outcome.
    artifacts = artifacts_of(flow_run.id)
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert progress.data == 100.0
    assert progress.description == "**4 of 4 items finished** (2 done, 2 failed)"
    # Keyed by config and store: another store of the same config never becomes "latest".
    digest = output_hash(str(store))
    assert {a.key for a in artifacts if a.key} == {
        f"segflow-tiles-{digest}-{suffix}" for suffix in ("items", "output", "progress")
    }
    states = {r.name: r.state for r in runs if r.name.startswith("segment-")}
    assert {name: s.type.value for name, s in states.items()} == {  # type: ignore[union-attr]
        "segment-broken": "FAILED", "segment-rgb": "FAILED",
        "segment-tile_a": "COMPLETED", "segment-tile_b": "COMPLETED",
    }  # fmt: skip
    assert "single-channel" in str(states["segment-rgb"].message)  # type: ignore[union-attr]
    # An unreadable file too, with the reason discovery found.
    assert str(states["segment-broken"].message) == errors["broken"]  # type: ignore[union-attr]

    ds = xarray.open_zarr(f"{store}/tile_a")
    assert ds["labels"].dims == ("y", "x")
    assert int(ds["labels"].max()) == N_BLOBS
    # Pixel centres in CRS metres: origin 500000 + half a 10 m pixel.
    np.testing.assert_allclose(ds["x"].values[:2], [500_005.0, 500_015.0])
    assert "spatial_ref" in ds.variables

    index = read_index(str(store)).set_index("id")
    assert index["status"].to_dict() == {
        "broken": "failed", "rgb": "failed", "tile_a": "done", "tile_b": "done"
    }  # fmt: skip
    assert index.loc["tile_a", "object_count"] == N_BLOBS

    # Rerun: done items are skipped (same fingerprint, config and code); failed ones retried.
    state, summary = run(config)
    assert state == "FAILED"
    assert (summary["done"], summary["failed"], summary["skipped"]) == (0, 2, 2)

    # A changed input is redone, the unchanged one still skipped.
    changed = blob_image()
    changed[0, :3, :3] = 200  # a fourth object in the corner
    write_geotiff(collection / "tile_b.tif", changed, x0=500_720.0)
    os.utime(collection / "tile_b.tif", ns=(0, 10**9))  # mtime differs from the first write
    (collection / "broken.tif").unlink()
    (collection / "rgb.tif").unlink()
    state, summary = run(config)
    assert state == "COMPLETED"
    rows = {r["id"]: r for r in summary["rows"]}  # type: ignore[attr-defined]
    assert rows["tile_a"]["status"] == "skipped"
    assert rows["tile_b"]["status"] == "done"
    assert rows["tile_b"]["object_count"] == N_BLOBS + 1


def test_a_batch_of_items_is_one_task_run_red_when_any_of_its_items_failed(
    collection: Path, tmp_path: Path, dask_address: str
) -> None:
    """With ``run.batch``, several items share a task run: it is named after its first and
    last item, ends Failed naming the items that failed, and every item still has its own
    row, record and progress."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    store = tmp_path / "out.zarr"
    config = {**collection_config(collection, store, dask_address), "run": {"batch": 3}}

    state, summary = run(config)

    assert state == "FAILED"
    assert (summary["done"], summary["failed"]) == (2, 2)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort="START_TIME_DESC", limit=1)[0]
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    states = {r.name: r.state for r in runs if r.name.startswith("segment-")}
    assert {name: s.type.value for name, s in states.items()} == {  # type: ignore[union-attr]
        "segment-broken..tile_a (3 items)": "FAILED", "segment-tile_b": "COMPLETED",
    }  # fmt: skip
    message = str(states["segment-broken..tile_a (3 items)"].message)  # type: ignore[union-attr]
    assert message.startswith("2 of 3 items failed: ")
    assert "not a readable GeoTIFF/TIFF" in message and "single-channel" in message
    [progress] = [a for a in artifacts_of(flow_run.id) if a.type == "progress"]
    assert progress.description == "**4 of 4 items finished** (2 done, 2 failed)"
    index = read_index(str(store)).set_index("id")
    assert index["status"].to_dict() == {
        "broken": "failed", "rgb": "failed", "tile_a": "done", "tile_b": "done"
    }  # fmt: skip
    assert int(xarray.open_zarr(f"{store}/tile_a")["labels"].max()) == N_BLOBS


def test_overwrite_and_item_filter_redo_only_matching_items(
    tmp_path: Path, dask_address: str
) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("north_1", "north_2", "south_1"):
        write_geotiff(folder / f"{name}.tif", blob_image())
    config = collection_config(folder, tmp_path / "out.zarr", dask_address)
    assert run(config)[1]["done"] == 3

    state, summary = run(config, overwrite=True, item_filter=["north_*"])

    assert state == "COMPLETED"
    assert [(r["id"], r["status"]) for r in summary["rows"]] == [  # type: ignore[attr-defined]
        ("north_1", "done"),
        ("north_2", "done"),
    ]
    assert summary["open"] == f"xarray.open_zarr({str(tmp_path / 'out.zarr' / 'north_1')!r})"


def test_sample_nuclei_config_runs_from_its_yaml(tmp_path: Path, dask_address: str) -> None:
    config = Path(__file__).parents[2] / "configs" / "nuclei.yaml"
    store = tmp_path / "nuclei.zarr"

    summary = segment_collection(
        str(config), [f"output.store={store}", f"cluster.address={dask_address}"]
    )

    assert (summary["done"], summary["failed"]) == (1, 0)
    labels = xarray.open_zarr(f"{store}/image")["labels"]
    assert labels.shape == (256, 256)
    assert int(labels.max()) == summary["rows"][0]["object_count"] > 10


def test_backfill_redoes_matching_items_of_a_config(tmp_path: Path, dask_address: str) -> None:
    from segflow.flows.backfill import backfill

    config = Path(__file__).parents[2] / "configs" / "nuclei.yaml"
    overrides = [f"output.store={tmp_path / 'n.zarr'}", f"cluster.address={dask_address}"]

    state = backfill(str(config), items=["ima*"], policy="missing", overrides=overrides,
                     return_state=True)  # fmt: skip
    first = state.result()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(state.state_details.flow_run_id)
    assert parent.name.startswith("nuclei-backfill-")
    assert {"backfill", "config:nuclei", f"store:{tmp_path / 'n.zarr'}"} <= set(parent.tags)
    redo = backfill(str(config), items=["image"], policy="overwrite", overrides=overrides)
    none = backfill(str(config), items=["no_such_*"], overrides=overrides)

    assert [(s["done"], s["skipped"]) for s in (first, redo, none)] == [(1, 0), (1, 0), (0, 0)]


def test_a_backfill_shows_its_child_summary_read_back_from_the_api(
    collection: Path, tmp_path: Path, dask_address: str
) -> None:
    """Results are persisted (JSON, local files): the API gives a finished run's summary,
    and the backfill's page has its child's summary, failures included."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    from segflow.flows.backfill import backfill

    config = tmp_path / "tiles.yaml"
    config.write_text(
        json.dumps(collection_config(collection, tmp_path / "out.zarr", dask_address))
    )
    state = backfill(str(config), items=["tile_*", "broken"], return_state=True)

    assert state.is_failed()  # as its child: the broken file failed
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(state.state_details.flow_run_id)  # type: ignore[arg-type]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent.id]))
        )
        [child] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])
            )
        )
    summary = child.state.result(raise_on_failure=False)  # type: ignore[union-attr]
    # Read back from JSON, the failure keeps its message (not the summary object).
    assert isinstance(summary, ItemsFailedError) and summary.summary is None
    assert f"1 item(s) of 'tiles' failed: item '{collection / 'broken.tif'}'" in str(summary)
    [note] = [a for a in artifacts_of(parent.id) if a.key and a.key.endswith("-summary")]
    assert f"run `{child.name}`" in str(note.data)
    assert child.name.startswith("tiles-backfill-")  # named for what it is, not as a nightly
    assert "2 done, 0 skipped (already done), 1 failed" in str(note.data)
    assert f"- `broken`: item '{collection / 'broken.tif'}'" in str(note.data)
    # Prefect links the child to the parent through a task run of the parent.
    assert [r.name for r in task_runs] == ["segment-collection-0"]

    # A completed run's summary comes back from the API whole, and is plain JSON.
    done = backfill(str(config), items=["tile_a"], return_state=True)
    with get_client(sync_client=True) as client:
        read_back = client.read_flow_run(done.state_details.flow_run_id).state.result()  # type: ignore[arg-type,union-attr]
    assert read_back == json.loads(json.dumps(done.result()))
    assert (read_back["done"], read_back["rows"][0]["id"]) == (1, "tile_a")


def test_runs_are_named_after_the_config_and_tagged_with_it(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from segflow.flows.backfill import backfill

    missing = tmp_path / "ct-nightly.yaml"  # no such file: the run fails, but is named
    state = segment_collection(str(missing), return_state=True)
    failed = backfill(str(missing), return_state=True)

    assert state.is_failed() and failed.is_failed()
    with get_client(sync_client=True) as client:
        named = {client.read_flow_run(s.state_details.flow_run_id).name for s in (state, failed)}
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\dZ"
    assert sorted(re.sub(stamp, "TIME", name) for name in named) == [
        "ct-nightly-TIME", "ct-nightly-backfill-TIME"
    ]  # fmt: skip


def test_ids_recorded_in_the_store_survive_new_files(tmp_path: Path, dask_address: str) -> None:
    """A scheduled run over a growing folder: a second tile.tif would make discovery call the
    first one a_tile; the store's id stays, so it is skipped, and the new one is added."""
    folder = tmp_path / "tiles"
    (folder / "a").mkdir(parents=True)
    write_geotiff(folder / "a" / "tile.tif", blob_image())
    config = collection_config(folder, tmp_path / "out.zarr", dask_address)
    assert [r["id"] for r in run(config)[1]["rows"]] == ["tile"]  # type: ignore[index]

    (folder / "b").mkdir()
    write_geotiff(folder / "b" / "tile.tif", blob_image())
    state, summary = run(config)

    assert state == "COMPLETED"
    rows = [(r["id"], r["status"]) for r in summary["rows"]]  # type: ignore[attr-defined]
    assert rows == [("b_tile", "done"), ("tile", "skipped")]
    index = read_index(str(tmp_path / "out.zarr")).set_index("id")
    assert index.loc["tile", "source"].endswith(os.path.join("a", "tile.tif"))


def test_keep_recorded_ids_never_reuses_an_id_for_another_source() -> None:
    from segflow.engine.collection import keep_recorded_ids

    index = [
        {"id": "tile", "source": "/t/a/tile.tif", "status": "done"},
        {"id": "old", "source": "/t/gone.tif", "status": "done"},  # its file was removed
    ]
    items = [
        {"id": "a_tile", "path": "/t/a/tile.tif", "fingerprint": "1"},
        {"id": "tile", "path": "/t/c/tile.tif", "fingerprint": "2"},  # cannot take "tile"
        {"id": "old", "path": "/t/x/old.tif", "fingerprint": "3"},  # nor "old"
    ]
    failed = [{"id": "bad", "source": "/t/bad.tif", "status": "failed"}]
    renamed, rows = keep_recorded_ids(items, failed, index)
    assert [i["id"] for i in renamed] == ["tile", "tile_2", "old_2"]
    assert [r["id"] for r in rows] == ["bad"]
    assert keep_recorded_ids(items, failed, []) == (items, failed)  # a new store: as found


def test_the_first_items_of_a_run_get_a_quick_look_beside_them_linked_from_an_artifact(
    tmp_path: Path, dask_address: str
) -> None:
    import imageio.v3 as iio
    from prefect.client.orchestration import get_client

    from segflow.store.quicklook import OUTLINE_RGB, QUICKLOOK_NAME

    folder = tmp_path / "tiles"
    folder.mkdir()
    for k in range(3):
        write_geotiff(folder / f"tile_{k}.tif", blob_image(), x0=500_000.0 + 720 * k)
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    config["run"] = {"quicklooks": 2, "quicklook_size": 32}  # of 3 items, 32 px

    state, summary = run(config)

    assert (state, summary["done"]) == ("COMPLETED", 3)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort="START_TIME_DESC", limit=1)[0]
    looks = [a for a in artifacts_of(flow_run.id) if "quick look" in str(a.description)]
    assert len(looks) == 2
    pictures = sorted(store.glob(f"*/{QUICKLOOK_NAME}"))
    assert [p.parent.name for p in pictures] == ["tile_0", "tile_1"]
    for look, path in zip(sorted(looks, key=lambda a: str(a.description)), pictures, strict=True):
        assert look.task_run_id is not None  # on its item's task run
        assert "base64" not in str(look.data) and len(str(look.data)) < 1000
        path = path.resolve()  # the committed version's own picture
        assert f"]({path.as_uri()})" in str(look.data) and f"`{path}`" in str(look.data)
        picture = iio.imread(path, extension=".png")
        assert max(picture.shape[:2]) <= 32 and picture.shape[2] == 3
        assert (picture == OUTLINE_RGB).all(axis=-1).any()  # the blobs' outlines
    # The store stays readable with the pictures in its item groups.
    assert xarray.open_zarr(f"{store}/tile_0")["labels"].shape == (64, 72)


def test_vectors_per_item_and_for_the_collection(tmp_path: Path, dask_address: str) -> None:
    import geopandas as gpd

    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "east.tif", blob_image())
    write_geotiff(folder / "west.tif", blob_image(), x0=499_280.0)
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    config["output"] = {**config["output"], "regions": True, "vectors": True}

    state, summary = run(config)

    assert state == "COMPLETED", summary
    east = gpd.read_parquet(store / "east" / "vectors.parquet")
    assert len(east) == N_BLOBS == summary["rows"][0]["object_count"]  # type: ignore[index]
    assert east.crs.to_epsg() == 32633
    collection = gpd.read_parquet(store / "vectors.parquet")
    assert collection.groupby("item").size().to_dict() == {"east": N_BLOBS, "west": N_BLOBS}
    np.testing.assert_allclose(collection.geometry.area, collection["area"] * 100.0)
    assert xarray.open_zarr(f"{store}/east")["labels"].shape == (64, 72)

    # Redone without vectors: no item has them any more, so neither has the collection.
    config["output"] = {**config["output"], "vectors": False}
    assert run(config, overwrite=True)[0] == "COMPLETED"
    assert not (store / "east" / "vectors.parquet").exists()
    assert not (store / "vectors.parquet").exists()


def test_a_stac_collection_follows_the_runs_of_a_georeferenced_store(
    tmp_path: Path, dask_address: str
) -> None:
    import pystac

    folder = tmp_path / "tiles"
    folder.mkdir()
    write_geotiff(folder / "east.tif", blob_image())
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    assert run(config)[0] == "COMPLETED"
    stac = store / "stac"
    collection = pystac.Collection.from_file(str(stac / "collection.json"))
    [east] = collection.get_items(recursive=True)
    assert east.id == "east" and east.properties["proj:code"] == "EPSG:32633"
    assert xarray.open_zarr(east.assets["zarr"].get_absolute_href())["labels"].max() == N_BLOBS

    def mtimes() -> dict[str, int]:
        return {str(p.relative_to(stac)): p.stat().st_mtime_ns for p in stac.rglob("*.json")}

    before = mtimes()
    state, summary = run(config)  # nothing to do: every item skipped, nothing written
    assert (state, summary["skipped"]) == ("COMPLETED", 1)
    assert mtimes() == before

    write_geotiff(folder / "west.tif", blob_image(), x0=499_280.0)
    state, summary = run(config)
    assert (state, summary["done"], summary["skipped"]) == ("COMPLETED", 1, 1)
    after = mtimes()
    assert after["items/east.json"] == before["items/east.json"]  # not rewritten
    assert after["collection.json"] != before["collection.json"]
    collection = pystac.Collection.from_file(str(stac / "collection.json"))
    items = {i.id: i for i in collection.get_items(recursive=True)}
    assert sorted(items) == ["east", "west"]
    [extent] = collection.extent.spatial.bboxes
    assert extent[0] == items["west"].bbox[0] < east.bbox[0]
    assert extent[2] == east.bbox[2]


def test_dicom_seg_from_a_dicom_series_through_the_flow(tmp_path: Path, dask_address: str) -> None:
    import importlib.util

    import pydicom

    # The DICOM writer of the engine tests (tests/engine is not on this folder's path).
    spec = importlib.util.spec_from_file_location(
        "_dicom", Path(__file__).parents[1] / "engine" / "_dicom.py"
    )
    assert spec is not None and spec.loader is not None
    dicom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dicom)
    hu = np.full((5, 40, 50), -900.0)
    hu[1:4, 10:30, 12:40] = 400.0
    dicom.write_series(tmp_path / "export", hu, spacing=(2.0, 0.8, 0.8), origin=(0, 0, 0))
    store = tmp_path / "out.zarr"
    config = collection_config(tmp_path / "export", store, dask_address)
    config["output"] = {"store": str(store), "chunks": [4, 32, 32], "dicom_seg": True}
    config["blocks"] = {"shape": [4, 32, 32]}

    state, summary = run(config)

    assert state == "COMPLETED", summary
    seg = pydicom.dcmread(store / "3_CT_CHEST" / "seg.dcm")
    assert seg.Modality == "SEG" and int(seg.NumberOfFrames) == 5
    assert int(seg.pixel_array.sum()) == 3 * 20 * 28  # the block of bone, every voxel
    # The file beside the arrays leaves the consolidated store readable without warnings.
    assert xarray.open_zarr(f"{store}/3_CT_CHEST")["labels"].shape == (5, 40, 50)


def test_a_deployment_run_of_another_config_is_refused_with_one_line(
    tmp_path: Path, dask_address: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Runs that do not start from `segflow run` (a deployment, a backfill) plan in the flow:
    a store another config made ends the flow Failed with the store's line, nothing written."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(folder / "tile.tif", blob_image())
    store = tmp_path / "out.zarr"
    config = collection_config(folder, store, dask_address)
    assert run(config)[0] == "COMPLETED"
    index_before = _index_bytes(store)

    capfd.readouterr()
    state = segment_collection({**config, "name": "edges"}, return_state=True)

    logged = "".join(capfd.readouterr())
    # the refusal is the flow's one line; the planning task logs no failure or traceback
    assert "Traceback" not in logged and "Task run failed" not in logged, logged
    assert state.is_failed()
    assert state.message == (
        f"edges: store '{store}' holds 1 item made by config 'tiles'; config 'edges' would "
        f"replace or mix with them: choose another output.store, or --set "
        f"output.allow_other_configs=true to let both write into it"
    )
    assert _index_bytes(store) == index_before


def _index_bytes(store: Path) -> dict[str, bytes]:
    """Every part of the store's index, by name."""
    return {p.name: p.read_bytes() for p in sorted((store / "index.parquet").glob("part-*"))}

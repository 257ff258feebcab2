"""The task helpers that need no flow run: progress fan-out, artifact keys, index rows."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from segflow.engine.collection import open_line
from segflow.store import write_index
from segflow.tasks.artifacts import artifact_key, publish_progress
from segflow.tasks.progress import ItemsProgress, listen_progress, report_progress
from segflow.tasks.store import read_index_task


def test_progress_reaches_listeners_only_while_listening() -> None:
    seen: list[tuple[str, str, int, int]] = []

    def broken(*report: object) -> None:
        raise RuntimeError("a display bug")

    with listen_progress(lambda *report: seen.append(report)), listen_progress(broken):
        report_progress("tile_a", "phase 1/2", 3, 12)  # the broken listener must not raise
    report_progress("tile_a", "phase 2/2", 12, 12)

    assert seen == [("tile_a", "phase 1/2", 3, 12)]


def test_artifact_keys_are_valid_prefect_keys_unique_per_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only

    store = str(tmp_path / "out.zarr")
    keys = [
        artifact_key("Aerial tiles_2024", store, "items"),
        artifact_key("___", store, "output"),
        artifact_key("x" * 300, "s3://bucket/out.zarr/", "items"),
    ]
    for key in keys:
        assert raise_on_name_alphanumeric_dashes_only(key) == key
    assert re.fullmatch(r"segflow-aerial-tiles-2024-[0-9a-f]{8}-items", keys[0])
    assert keys[1].startswith("segflow-segment-") and len(keys[2]) < 70

    # One store, one key, however it is written; another store, another key.
    monkeypatch.chdir(tmp_path)
    assert artifact_key("aerial", "out.zarr", "items") == artifact_key("aerial", store, "items")
    assert artifact_key("aerial", f"file://{store}/", "items") == artifact_key(
        "aerial", store, "items"
    )
    assert artifact_key("aerial", store + "2", "items") != artifact_key("aerial", store, "items")
    assert artifact_key("aerial", "s3://b/out.zarr", "items") != artifact_key(
        "aerial", "s3://c/out.zarr", "items"
    )


def test_open_line_is_python_that_names_store_and_group() -> None:
    assert open_line("/data/out.zarr", "tile_1") == "xarray.open_zarr('/data/out.zarr/tile_1')"
    # An object store without plain copies (output.plain_copy: false) opens through segflow;
    # a local store links its items, whatever the setting.
    s3 = "segflow.open_store('s3://b/out.zarr')['tile_1']"
    assert open_line("s3://b/out.zarr/", "tile_1", plain_copy=False) == s3
    assert open_line("s3://b/out.zarr", "tile_1") == "xarray.open_zarr('s3://b/out.zarr/tile_1')"
    local = open_line("/data/out.zarr", "tile_1", plain_copy=False)
    assert local == "xarray.open_zarr('/data/out.zarr/tile_1')"


def test_the_item_log_line_names_where_its_output_is_read() -> None:
    from segflow.tasks.items import _output_at

    row = {"id": "tile_1", "output": "labels"}
    assert _output_at("s3://b/out.zarr", row, True) == "s3://b/out.zarr/tile_1/labels"
    assert _output_at("/data/out.zarr", row, False) == "/data/out.zarr/tile_1/labels"
    expected = "segflow.open_store('s3://b/out.zarr')['tile_1']['labels']"
    assert _output_at("s3://b/out.zarr", row, False) == expected


def test_read_index_task_gives_plain_rows_with_none_for_missing(tmp_path: Path) -> None:
    store = tmp_path / "out.zarr"
    assert read_index_task.fn(str(store)) == []
    write_index(store, [{"id": "a", "status": "done", "fingerprint": "f1"}])

    [row] = read_index_task.fn(str(store))

    assert (row["id"], row["status"], row["fingerprint"]) == ("a", "done", "f1")
    assert row["error"] is None and row["object_count"] is None


def test_items_progress_counts_phases_blocks_and_final_states() -> None:
    progress = ItemsProgress(["a", "b", "c"])

    assert progress.update("a", "phase 1/2", 1, 4)
    assert not progress.update("a", "phase 1/2", 1, 8)  # a second pass never goes back
    assert progress.update("a", "phase 2/2", 2, 4)  # (1 + 0.5) / 2 of item a
    assert not progress.update("other", "done", 1, 1)  # not an item of this run
    assert progress.percent() == 25.0  # 0.75 of 3 items
    assert progress.update("b", "failed", 1, 1) and progress.update("a", "done", 1, 1)
    assert not progress.update("a", "phase 2/2", 4, 4)  # finished stays finished

    assert progress.percent() == round(200 / 3, 1)
    assert progress.queued() == ["c"]
    assert progress.describe() == "**2 of 3 items finished** (1 done, 1 failed) · 1 queued: `c`"


def test_items_progress_of_a_stopped_run_stays_where_it_stopped() -> None:
    progress = ItemsProgress(["a", "b", "c", "d"])
    progress.update("a", "done", 1, 1)
    progress.update("b", "phase 1/2", 1, 2)  # a quarter of b
    assert progress.percent() == 31.2  # (1 + 0.25) / 4, rounded

    for item in ("b", "c", "d"):  # stopped: b midway, c and d not started
        assert progress.update(item, "interrupted", 1, 1)

    assert progress.percent() == 31.2  # b keeps what it had reached; nothing is 100 %
    assert progress.describe() == "**1 of 4 items finished** (1 done) · 3 interrupted"
    nearly = ItemsProgress([str(k) for k in range(2000)])
    for k in range(1999):
        nearly.update(str(k), "done", 1, 1)
    nearly.update("1999", "phase 1/1", 99, 100)
    nearly.update("1999", "interrupted", 1, 1)
    assert nearly.percent() == 99.9  # not rounded up to 100 with an item unfinished


def test_items_progress_names_only_the_first_queued_items() -> None:
    progress = ItemsProgress([f"tile_{k}" for k in range(8)])
    assert progress.describe(names=2) == (
        "**0 of 8 items finished** · 8 queued: `tile_0`, `tile_1`, … (6 more)"
    )


def test_progress_artifact_follows_the_reports_while_the_run_goes_on(
    prefect_harness: None,
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.runtime import flow_run

    def artifacts(run_id: str) -> list[Any]:
        with get_client(sync_client=True) as client:
            return client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )

    def progress_when(run_id: str, percent: float) -> str:
        """The progress artifact's description once it shows ``percent`` (within 10 s)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            [artifact] = [a for a in artifacts(run_id) if a.type == "progress"]
            if artifact.data == percent:
                return str(artifact.description)
            time.sleep(0.05)
        raise AssertionError(f"progress never reached {percent}: {artifact.data}")

    @flow
    def two_items() -> tuple[str, list[str]]:
        items = [{"id": "a", "path": "/in/a.tif"}, {"id": "b", "path": "/in/b.tif"}]
        seen = []
        with publish_progress("unit", "/out/unit.zarr", items, interval=0.05):
            seen.append(progress_when(flow_run.id, 0.0))
            report_progress("a", "phase 1/2", 2, 2)
            seen.append(progress_when(flow_run.id, 25.0))
            report_progress("a", "done", 1, 1)
            seen.append(progress_when(flow_run.id, 50.0))
            report_progress("b", "failed", 1, 1)
        return flow_run.id, seen

    run_id, seen = two_items()

    assert seen == [
        "**0 of 2 items finished** · 2 queued: `a`, `b`",
        "**0 of 2 items finished** · 1 running: `a` 50 % · 1 queued: `b`",
        "**1 of 2 items finished** (1 done) · 1 queued: `b`",
    ]
    assert progress_when(run_id, 100.0) == "**2 of 2 items finished** (1 done, 1 failed)"
    [table] = [a for a in artifacts(run_id) if a.type == "table"]
    assert "/in/b.tif" in str(table.data)


def test_items_table_lists_failed_items_first_and_at_most_table_rows(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from segflow.engine.collection import run_summary
    from segflow.tasks import artifacts

    monkeypatch.setattr(artifacts, "TABLE_ROWS", 3)
    rows = [{"id": f"t{i}", "status": "done", "error": None} for i in range(5)]
    rows[3] = {"id": "t3", "status": "failed", "error": "item 't3': damaged"}
    summary = run_summary("unit", "/out/table-unit.zarr", rows)

    flow(artifacts.report_items_task.fn)(summary, rows)

    key = artifacts.artifact_key("unit", "/out/table-unit.zarr", "items")
    with get_client(sync_client=True) as client:
        [table] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["id"] for row in data] == ["t3", "t0", "t1"]
    assert "the first 3 of 5, failed first" in str(table.description)

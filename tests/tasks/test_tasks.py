"""The task helpers that need no flow run: progress fan-out, artifact keys, index rows."""

from __future__ import annotations

from pathlib import Path

from segflow.store import write_index
from tasks.artifacts import artifact_key, open_line
from tasks.progress import listen_progress, report_progress
from tasks.store import read_index_task


def test_progress_reaches_listeners_only_while_listening() -> None:
    seen: list[tuple[str, str, int, int]] = []

    def broken(*report: object) -> None:
        raise RuntimeError("a display bug")

    with listen_progress(lambda *report: seen.append(report)), listen_progress(broken):
        report_progress("tile_a", "phase 1/2", 3, 12)  # the broken listener must not raise
    report_progress("tile_a", "phase 2/2", 12, 12)

    assert seen == [("tile_a", "phase 1/2", 3, 12)]


def test_artifact_keys_are_valid_prefect_keys() -> None:
    assert artifact_key("Aerial tiles_2024", "items") == "segflow-aerial-tiles-2024-items"
    assert artifact_key("___", "output") == "segflow-segment-output"


def test_open_line_is_python_that_names_store_and_group() -> None:
    assert (
        open_line("/data/out.zarr", "tile_1")
        == "xarray.open_zarr('/data/out.zarr', group='tile_1')"
    )


def test_read_index_task_gives_plain_rows_with_none_for_missing(tmp_path: Path) -> None:
    store = tmp_path / "out.zarr"
    assert read_index_task.fn(str(store)) == []
    write_index(store, [{"id": "a", "status": "done", "fingerprint": "f1"}])

    [row] = read_index_task.fn(str(store))

    assert (row["id"], row["status"], row["fingerprint"]) == ("a", "done", "f1")
    assert row["error"] is None and row["object_count"] is None

"""The store a run holds: an older store is migrated by the run, and says so in its log."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest

from segflow.store.commit import read_commit
from segflow.tasks.store import writing_store
from tests.engine.test_metadata import _make_legacy, _store_of


def test_the_next_run_migrates_an_older_store_with_one_line(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
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

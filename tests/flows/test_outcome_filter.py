"""The filter that keeps Prefect from logging segflow's expected outcomes as crashes, on its
own: only the runs marked with ``expected`` lose Prefect's echo and traceback; a bug keeps
them."""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any

import pytest

from segflow.flows import _outcomes
from segflow.flows._outcomes import ExpectedOutcomeFilter
from segflow.flows.segment import ItemsFailedError, RunInterrupted

SUMMARY = {"name": "tiles", "done": 6, "failed": 1, "interrupted": 44, "failures": []}


def record(message: str, level: int = logging.ERROR, error: BaseException | None = None,
           **extra: str) -> logging.LogRecord:  # fmt: skip
    exc_info: Any = None
    if error is not None:
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
    made = logging.LogRecord("prefect.flow_runs", level, __file__, 1, message, (), exc_info)
    made.__dict__.update(extra)
    return made


@pytest.fixture
def marked(monkeypatch: pytest.MonkeyPatch) -> str:
    run_id = str(uuid.uuid4())
    monkeypatch.setattr(_outcomes, "_expected", {run_id})
    return run_id


def test_the_engine_traceback_of_an_expected_outcome_is_dropped(marked: str) -> None:
    keep = ExpectedOutcomeFilter().filter
    exit_line = "Engine execution exited with unexpected exception"

    assert not keep(record(exit_line, error=ItemsFailedError(SUMMARY), flow_run_id=marked))
    assert not keep(record(exit_line, error=RunInterrupted(SUMMARY), flow_run_id=marked))
    # A bug in the same run, or the same line of another run, is kept as it is.
    assert keep(record(exit_line, error=ValueError("a bug"), flow_run_id=marked))
    other = str(uuid.uuid4())
    assert keep(record(exit_line, error=ItemsFailedError(SUMMARY), flow_run_id=other))


def test_an_expected_task_state_is_told_once_at_warning(marked: str) -> None:
    keep = ExpectedOutcomeFilter().filter
    echo = record(
        "Task run failed with state: Failed(message='x', result=[{...}])", task_run_id=marked
    )
    finished = record("Finished in state Failed('x')", task_run_id=marked)
    other = record("Finished in state Failed('x')", task_run_id=str(uuid.uuid4()))

    assert not keep(echo)
    assert keep(finished) and finished.levelno == logging.WARNING
    assert finished.levelname == "WARNING"
    assert keep(other) and other.levelno == logging.ERROR


def test_outcomes_keep_their_summary_in_process_and_their_message_from_json() -> None:
    interrupted = RunInterrupted(SUMMARY)
    assert interrupted.summary == SUMMARY
    assert str(interrupted) == "tiles: interrupted: 6 done, 44 interrupted or not started"
    read_back = RunInterrupted(str(interrupted))  # what Prefect's JSON serializer rebuilds
    assert read_back.summary is None and str(read_back) == str(interrupted)

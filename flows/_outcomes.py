"""Expected outcomes are states, not crashes: what a run that failed on bad items, or was
stopped, leaves in Prefect's logs.

A segflow flow or task run that ends *Failed* or *Cancelled* on purpose (a damaged tile, a
cancel, a store that refuses the run) returns that state with one line as its message. Prefect
then logs it as if it were a crash: ``Task run failed with state: Failed(... result=[{the
whole row}])`` and ``Finished in state Failed(...)`` at ERROR for the item's task run, and,
where a process worker runs the flow (``python -m prefect.engine``), ``Engine execution
exited with unexpected exception`` at ERROR with a traceback, because the engine reads the
flow's result and a Failed state's result raises. Alerting on ERROR would page someone for
every bad tile.

A run that ends so calls :func:`expected` with its state; :class:`ExpectedOutcomeFilter`
(on Prefect's ``prefect.flow_runs`` and ``prefect.task_runs`` loggers, installed by
:func:`install_outcome_filter`) then drops Prefect's echo of the state and its traceback and
keeps its ``Finished in state ...`` line at WARNING. Nothing else changes: a task or flow
that *raises* (a bug) still logs its traceback at ERROR.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, TypeVar

from prefect.states import State

S = TypeVar("S", bound=State[Any])

_lock = threading.Lock()
# Ids of the flow and task runs of this process that ended Failed/Cancelled on purpose.
_expected: set[str] = set()


class RunOutcome(RuntimeError):
    """The data of a run's expected *Failed* or *Cancelled* state: its message, and the
    run's ``summary`` (:func:`segflow.engine.collection.run_summary`) where there is one.

    Read back from a persisted (JSON) flow result, the error has its message only and
    ``summary`` is None.
    """

    def __init__(self, summary: dict[str, Any] | str) -> None:
        if isinstance(summary, str):
            self.summary: dict[str, Any] | None = None
            super().__init__(summary)
            return
        self.summary = summary
        super().__init__(self.describe(summary))

    def describe(self, summary: dict[str, Any]) -> str:
        return str(summary.get("name"))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.summary if self.summary is not None else str(self),))


def expected(state: S) -> S:
    """``state``, marked as the expected end of the current flow or task run (see the
    module's docstring); call it on the state a run returns."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_run = TaskRunContext.get()
    flow_run = FlowRunContext.get()
    run = task_run.task_run if task_run else (flow_run.flow_run if flow_run else None)
    if run is not None:
        with _lock:
            _expected.add(str(run.id))
    install_outcome_filter()
    return state


def is_expected(run_id: Any) -> bool:
    with _lock:
        return str(run_id) in _expected


# Prefect's lines for a run's end (prefect.flow_engine, prefect.task_engine).
_ECHO = "Task run failed with state:"
_FINISHED = "Finished in state "
_ENGINE_EXIT = "Engine execution exited with unexpected exception"


class ExpectedOutcomeFilter(logging.Filter):
    """Prefect's records of a run marked with :func:`expected`: its state echoed with the
    state's data (``Task run failed with state: ...``) and the engine's traceback of the
    flow's expected result are dropped; ``Finished in state ...`` is kept at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_id = getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None)
        if run_id is None or not is_expected(run_id):
            return True
        message = str(record.msg)
        if message.startswith(_ECHO):
            return False
        if message.startswith(_ENGINE_EXIT):
            error = record.exc_info[1] if record.exc_info else None
            return not _is_outcome(error)
        if message.startswith(_FINISHED) and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _is_outcome(error: BaseException | None) -> bool:
    """Whether ``error`` is what a Failed/Cancelled state of segflow's raises when read: its
    :class:`RunOutcome`, a store's refusal, or Prefect's wrapper of the state's message."""
    from prefect.exceptions import CancelledRun, FailedRun

    from segflow.errors import StoreError

    return isinstance(error, RunOutcome | StoreError | CancelledRun | FailedRun)


_FILTER = ExpectedOutcomeFilter()
LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def install_outcome_filter() -> None:
    """Put :class:`ExpectedOutcomeFilter` on Prefect's run loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

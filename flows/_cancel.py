"""A cancel that always lands: the flow run watches its own state and stops as SIGTERM does.

Prefect delivers ``prefect flow-run cancel`` (or the UI's Cancel) through the worker that
started the run: it watches for *Cancelling* runs and signals their processes. After a
Prefect server restart that watcher may give up ("Cancellation observer failed. Flow run
cancellation disabled."), and a run started without a worker (``segflow run``, a script)
has no watcher at all: the run then stays *Cancelling* while it runs to its end.

:func:`stop_on_cancel` closes that gap from inside the run: a thread reads the flow run's
state every :data:`POLL_SECONDS` and, once it is *Cancelling* (or *Cancelled*), asks the
run to stop (:func:`segflow.engine.interrupt.request_stop`, as the first SIGTERM does): the
items stop, what finished is recorded, and the run ends *Cancelled* with segflow's summary
as its message. An API that does not answer (a server restarting) is asked again at the
next poll; only the run's state decides.
"""

from __future__ import annotations

import contextvars
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from segflow.engine.interrupt import request_stop, stop_requested

POLL_SECONDS = 2.0
REASON = "cancelled"


@contextmanager
def stop_on_cancel(poll: float = POLL_SECONDS) -> Iterator[None]:
    """Stop this flow run (as SIGTERM does) within ``poll`` seconds of its cancellation.

    Outside a flow run, nothing is watched.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    finished = threading.Event()
    # Prefect's settings (the API URL) live in context variables: the thread gets a copy.
    watch = contextvars.copy_context().run
    thread = threading.Thread(
        target=watch,
        args=(_watch_state, context.flow_run.id, finished, poll),
        name="segflow-cancel-watch",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join(timeout=1.0)


def _watch_state(run_id: uuid.UUID, finished: threading.Event, poll: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    stopping = {StateType.CANCELLING, StateType.CANCELLED}
    with get_client(sync_client=True) as client:
        while not finished.wait(poll):
            try:
                state = client.read_flow_run(run_id).state
            except Exception:  # the API restarting or unreachable: ask again
                continue
            if state is not None and state.type in stopping:
                if stop_requested() is None:
                    request_stop(REASON)
                return

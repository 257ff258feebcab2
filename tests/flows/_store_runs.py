"""Flow runs of their own processes against a real Prefect server, for the queue and
cancel tests (PREFECT_API_URL in the environment).

``python _store_runs.py hold STORE READY GATE``: a flow run ``hold-store`` that takes
STORE's queue slot and lock as a segmenting run does, creates READY, and holds both until
GATE exists. ``python _store_runs.py segment CONFIG [KEY=VALUE ...]``: a
``segment-collection`` run; its final state's type and message are the last line printed
(JSON).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger


@flow(name="hold-store")
def hold_store(store: str, ready: str, gate: str) -> None:
    from segflow.flows.store_queue import store_queue
    from segflow.tasks.store import current_run_id, writing_store

    with (
        store_queue(store, timeout=None, logger=get_run_logger()),
        writing_store(store, current_run_id()),
    ):
        Path(ready).touch()
        while not Path(gate).exists():
            time.sleep(0.2)


def main(role: str, *args: str) -> None:
    if role == "hold":
        hold_store(*args)
        return
    from segflow.flows.segment import segment_collection

    state = segment_collection(args[0], list(args[1:]), return_state=True)
    print(json.dumps({"type": state.type.value, "message": state.message}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

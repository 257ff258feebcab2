"""Fault injection for segflow's crash tests: ``SEGFLOW_FAULT=NAME[@N]`` in the environment
kills this process with SIGKILL the Nth time (default: the first) it reaches point NAME.

The points sit where a crash is most likely to leave a store half written: ``item-staged``
(data written and checked, not yet swapped in), ``item-swap`` (between the two renames of
the swap), ``item-committed`` (swapped in, not yet recorded), ``record-written``,
``index-compact`` (index.parquet parts written, records not yet removed), ``regions-joined``
(an item's region table written, its parts not yet removed), ``vectors-joined`` (the
same for its vector table), ``block-done`` (each time a block task finishes, seen from the
client), ``output-block-done`` (each time a block of an item's output phase finishes, seen
from the client) and ``block-write`` (in a
Dask worker, before a block's output is written: kills that worker). Without the variable
a point costs one dictionary lookup. With ``SEGFLOW_FAULT_ONCE=PATH`` only the process
that creates ``PATH`` first is killed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Kill this process here when ``SEGFLOW_FAULT`` names this point (and this hit)."""
    wanted = os.environ.get("SEGFLOW_FAULT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] != int(nth or 1):
        return
    once = os.environ.get("SEGFLOW_FAULT_ONCE")
    if once:  # one kill among all processes (Dask workers, restarted ones too)
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)

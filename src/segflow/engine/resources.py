"""Per-worker resources: what an operation builds once per process (a loaded model).

An operation with ``setup(params)`` gets the result in ``ctx.resource``. The result is built
the first time a block of that process needs it and cached under the operation's
``setup_key(params)`` (for a model: its path, weights hash and device), so it is never
pickled into a task or rebuilt per block: a step travels as its operation's name and
parameters (:class:`~segflow.engine.pipeline.Step`), and each Dask worker process or the
local thread pool loads its own copy once. Threads of one process that ask at the same time
wait for one build.

Resource *annotations* are separate: ``resources(params)`` (``{"GPU": 1}``) tells the
executor which tasks hold a scarce device; see :meth:`segflow.engine.executor.Executor.map`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from segflow.ops.registry import Operation, OpParams

#: Resources kept per process; the least recently used goes first (a worker that serves
#: several configs one after another keeps the last few models, not all of them).
MAX_CACHED = 4

_cache: OrderedDict[Hashable, Any] = OrderedDict()
_building: dict[Hashable, threading.Lock] = {}
_lock = threading.Lock()
_builds = 0  # how many times a resource was built in this process (for tests and logs)


def resource_key(op: Operation[Any], params: OpParams) -> Hashable:
    """The cache key of ``op``'s resource for ``params``."""
    if op.setup_key is not None:
        return (op.name, op.setup_key(params))
    return (op.name, params.model_dump_json())


def get_resource(op: Operation[Any], params: OpParams) -> Any:
    """``op.setup(params)``, built once per process and key (see the module docstring)."""
    global _builds
    if op.setup is None:
        return None
    key = resource_key(op, params)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        building = _building.setdefault(key, threading.Lock())
    with building:
        with _lock:
            if key in _cache:
                return _cache[key]
        value = op.setup(params)
        with _lock:
            _builds += 1
            _cache[key] = value
            _building.pop(key, None)
            while len(_cache) > MAX_CACHED:
                _cache.popitem(last=False)
    return value


def builds() -> int:
    """How many resources this process has built so far."""
    return _builds


def clear_resources() -> None:
    """Forget every cached resource of this process."""
    with _lock:
        _cache.clear()


def merge_resources(wanted: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """One task's resources from its steps': the largest amount of each.

    Examples
    --------
    >>> merge_resources([{"GPU": 1}, {}, {"GPU": 1, "MEMORY": 2e9}])
    {'GPU': 1, 'MEMORY': 2000000000.0}
    """
    merged: dict[str, float] = {}
    for resources in wanted:
        for name, amount in resources.items():
            merged[name] = max(merged.get(name, 0), amount)
    return merged

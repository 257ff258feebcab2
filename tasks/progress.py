"""Block progress from the engine to whoever listens in this process (the CLI's progress
bar, the run's Prefect progress artifact).

The engine reports ``progress(phase, done, total)`` per item; tasks forward it here with the
item id. Listeners are process-local callables, never Prefect parameters: nothing is sent to
the Prefect API per block (the progress artifact is updated at most every few seconds, see
:func:`segflow.tasks.artifacts.publish_progress`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# listener(item_id, phase, done, total); phase is "phase k/n" or "done"/"failed"/"skipped".
ProgressListener = Callable[[str, str, int, int], None]

_lock = threading.Lock()
_listeners: list[ProgressListener] = []


@contextmanager
def listen_progress(listener: ProgressListener) -> Iterator[None]:
    """Call ``listener`` for every progress report made while the block is active."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def report_progress(item_id: str, phase: str, done: int, total: int) -> None:
    """Send one report to every listener; a failing listener never stops the work."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(item_id, phase, done, total)
        except Exception:  # a display problem must not fail a segmentation
            pass


class ItemsProgress:
    """Where the items of one run stand, from the progress reports (no Prefect here).

    An item is *queued* until its first report, *running* with the fraction of its work
    done (the phases of its pipeline weigh the same; blocks within a phase), *finished* at
    a final report (``done``, ``failed``) and *interrupted* when the run was stopped before
    it finished (``interrupted``): an interrupted item keeps the fraction it had reached
    (its staged blocks resume in the next run), so a run stopped at 12 % stays at 12 %, and
    only a run whose every item finished reaches 100 %. Reports of items that are not this
    run's are ignored.
    """

    FINAL = ("done", "failed", "interrupted")
    COMPLETE = ("done", "failed")  # the ends that count as the item's whole work

    def __init__(self, item_ids: list[str]) -> None:
        self.item_ids = list(item_ids)  # submission order, for the queued list
        self._known = set(self.item_ids)  # membership per report: O(1), not O(items)
        self.running: dict[str, float] = {}
        self.finished: dict[str, str] = {}
        self.stopped_at: dict[str, float] = {}  # interrupted items: the fraction reached
        self._lock = threading.Lock()

    def update(self, item_id: str, phase: str, done: int, total: int) -> bool:
        """Take one report (a :data:`ProgressListener`); True when anything changed."""
        with self._lock:
            if item_id not in self._known or item_id in self.finished:
                return False
            if phase in self.FINAL:
                reached = self.running.pop(item_id, 0.0)
                if phase == "interrupted":
                    self.stopped_at[item_id] = reached
                self.finished[item_id] = phase
                return True
            fraction = _phase_fraction(phase, done, total)
            # A phase may make several passes (a range, then a histogram): never go back.
            if fraction <= self.running.get(item_id, -1.0):
                return False
            self.running[item_id] = fraction
            return True

    def percent(self) -> float:
        """Work done in per cent: finished items, plus the fractions of the running items
        and of the interrupted ones; 100 only when every item finished."""
        with self._lock:
            if not self.item_ids:
                return 100.0
            complete = sum(s in self.COMPLETE for s in self.finished.values())
            work = complete + sum(self.running.values()) + sum(self.stopped_at.values())
            value = round(100.0 * work / len(self.item_ids), 1)
            return value if complete == len(self.item_ids) else min(value, 99.9)

    def describe(self, *, names: int = 5) -> str:
        """One markdown line: finished by status, interrupted, running with their share,
        queued.

        Examples
        --------
        >>> progress = ItemsProgress(["a", "b", "c", "d"])
        >>> progress.update("a", "done", 1, 1), progress.update("b", "phase 2/2", 1, 4)
        (True, True)
        >>> progress.describe()
        '**1 of 4 items finished** (1 done) · 1 running: `b` 62 % · 2 queued: `c`, `d`'
        >>> progress.update("b", "interrupted", 1, 1), progress.update("c", "interrupted", 1, 1)
        (True, True)
        >>> progress.describe()
        '**1 of 4 items finished** (1 done) · 2 interrupted · 1 queued: `d`'
        """
        with self._lock:
            finished = self.finished
            counts = [
                f"{n} {s}" for s in self.COMPLETE if (n := sum(v == s for v in finished.values()))
            ]
            complete = sum(v in self.COMPLETE for v in finished.values())
            interrupted = len(finished) - complete
            running = [f"`{i}` {f:.0%}".replace("%", " %") for i, f in self.running.items()]
            queued = [i for i in self.item_ids if i not in finished and i not in self.running]
        parts = [f"**{complete} of {len(self.item_ids)} items finished**"]
        parts[0] += f" ({', '.join(counts)})" if counts else ""
        if interrupted:
            parts.append(f"{interrupted} interrupted")
        if running:
            parts.append(f"{len(running)} running: {_first(running, names)}")
        if queued:
            parts.append(f"{len(queued)} queued: {_first([f'`{i}`' for i in queued], names)}")
        return " · ".join(parts)

    def queued(self) -> list[str]:
        """Ids of the items with no report yet, in submission order."""
        with self._lock:
            return [i for i in self.item_ids if i not in self.finished and i not in self.running]


def _phase_fraction(phase: str, done: int, total: int) -> float:
    """``"phase 2/3"`` with 5 of 10 blocks done: (1 + 0.5) / 3."""
    within = done / total if total else 0.0
    try:
        number, count = (int(n) for n in phase.removeprefix("phase ").split("/"))
    except ValueError:  # an unknown label: count the blocks alone
        return min(within, 0.99)
    return min(((number - 1) + within) / count, 0.99)  # 1.0 only once the item is finished


def _first(names: list[str], n: int) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")

"""Which items of a collection a run segments and which it skips: the store's skip rule.

An item is skipped only when its index row says ``done`` *and* its group's commit record
says the same input fingerprint, config hash and code version (:func:`select_items`). The
``segment`` flow and the ``segflow run`` command decide with the same functions; the
command decides before it starts Prefect or Dask, so a run with nothing to do costs no
server or cluster start.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.engine.item import ItemResult, code_version
from segflow.io import Reader, assign_item_ids, unused_id
from segflow.store.commit import read_commit
from segflow.store.lock import has_stale_lock


def item_references(
    readers: Sequence[Reader], failures: Sequence[tuple[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """``{"id", "path", "fingerprint"}`` for each readable item, and an index row (status
    ``failed``) for each file that could not be opened, with the id discovery would give it.
    """
    items = [
        {"id": r.info.id, "path": r.info.path, "fingerprint": r.info.fingerprint} for r in readers
    ]
    paths = sorted([r.info.path for r in readers] + [path for path, _ in failures])
    ids = dict(zip(paths, assign_item_ids(paths), strict=True))
    rows = [
        ItemResult(id=ids[path], source=path, status="failed", error=message).as_row()
        for path, message in failures
    ]
    return items, rows


def index_rows(store: str) -> list[dict[str, Any]]:
    """The rows of ``STORE/index.parquet`` and its pending records (none for a new store),
    as plain dicts (missing values as None)."""
    import pandas as pd
    from pandas.api.types import is_scalar

    from segflow.store.index import read_index

    return [
        {
            str(key): (None if is_scalar(value) and pd.isna(value) else value)
            for key, value in row.items()
        }
        for row in read_index(store).to_dict(orient="records")
    ]


def read_commits(store: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """The commit record of each item's group (None where there is none)."""
    if not Path(store).exists() and "://" not in store:
        return dict.fromkeys(item_ids)
    return {item_id: read_commit(store, item_id) for item_id in item_ids}


def keep_recorded_ids(
    items: list[dict[str, str]],
    failed_rows: list[dict[str, Any]],
    index_rows: list[dict[str, Any]],
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Give every item the id the store's index recorded for its source.

    Discovery names items by file stem, prefixed with folders only where stems collide, so a
    file joining the collection can rename others (``a/tile.tif`` is ``tile`` until
    ``b/tile.tif`` appears, then ``a_tile``): on the next scheduled run its output would be
    redone under a new name. Here an id in the store stays with its source, and is never
    given to another one (a new item whose id is taken gets ``_2``, ``_3``, ...).
    """
    recorded = {row["source"]: row["id"] for row in index_rows if row.get("source")}
    taken = {row["id"] for row in index_rows}

    def renamed(entry: dict[str, Any], source: str) -> dict[str, Any]:
        return {**entry, "id": recorded.get(source) or unused_id(entry["id"], taken)}

    return (
        [renamed(item, item["path"]) for item in items],
        [renamed(row, row["source"]) for row in failed_rows],
    )


def select_items(
    items: list[dict[str, str]],
    index_rows: list[dict[str, Any]],
    *,
    config_hash: str,
    overwrite: bool,
    commits: Mapping[str, Mapping[str, Any] | None],
    item_filter: Sequence[str] | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Split ``items`` into those to segment and the index rows of those to skip.

    An item is skipped when its index row says ``done`` with the same (non-empty)
    fingerprint, config hash and code version, and its group's commit record (``commits``,
    by id: :func:`segflow.store.commit.read_commit`) says the same: a ``done`` row over a
    group that was never committed, was interrupted or is gone is redone. Never skipped
    with ``overwrite``. With ``item_filter`` (glob patterns on ids), items that match none
    are left out altogether.
    """
    if item_filter:
        items = [i for i in items if any(fnmatch.fnmatchcase(i["id"], p) for p in item_filter)]
    done = {row["id"]: row for row in index_rows if row.get("status") == "done"}
    version = code_version()
    todo, skipped = [], []
    for item in items:
        row = done.get(item["id"])
        commit = commits.get(item["id"]) or {}
        if (
            not overwrite
            and row is not None
            and item["fingerprint"]  # no fingerprint (some URLs): always redo
            and row.get("fingerprint") == item["fingerprint"] == commit.get("fingerprint")
            and row.get("config_hash") == config_hash == commit.get("config_hash")
            and row.get("code_version") == version == commit.get("code_version")
        ):
            skipped.append({**row, "status": "skipped"})
        else:
            todo.append(item)
    return todo, skipped


@dataclass(frozen=True)
class ItemPlan:
    """What a run of one collection would do: segment ``todo``, record ``failed`` (files
    that cannot be opened), skip ``skipped`` (their index rows); ``stale_lock`` when a dead
    run's lock is to be taken over (its records compacted)."""

    todo: list[dict[str, str]]
    skipped: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    stale_lock: bool

    @property
    def nothing_to_do(self) -> bool:
        return not (self.todo or self.failed or self.stale_lock)


def plan_items(
    readers: Sequence[Reader],
    failures: Sequence[tuple[str, str]],
    store: str,
    *,
    config_hash: str,
    overwrite: bool,
) -> ItemPlan:
    """Apply the skip rule to a discovered collection (``readers``, unreadable ``failures``)
    against ``store``, reading only its index, commit records and lock.

    Examples
    --------
    >>> plan = plan_items([], [], "no_such_store.zarr", config_hash="h", overwrite=False)
    >>> plan.nothing_to_do
    True
    """
    items, failed = item_references(readers, failures)
    rows = index_rows(store)
    items, failed = keep_recorded_ids(items, failed, rows)
    done_ids = [r["id"] for r in rows if r.get("status") == "done"]
    commits = read_commits(store, done_ids) if done_ids else {}
    todo, skipped = select_items(
        items, rows, config_hash=config_hash, overwrite=overwrite, commits=commits
    )
    return ItemPlan(todo, skipped, failed, has_stale_lock(store))


def open_line(store: str, item_id: str) -> str:
    """The Python expression that opens one item of the output."""
    return f"xarray.open_zarr({store!r}, group={item_id!r})"


# Rows and failures a run's summary lists at most (the rest are in the store's index), so
# the persisted flow result stays small whatever the collection's size.
SUMMARY_ROWS = 1000


def run_summary(name: str, store: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The small, JSON-serialisable summary a run returns (and the command prints), from its
    index ``rows``.

    ``rows`` and ``failures`` list at most :data:`SUMMARY_ROWS` items each (in id order);
    ``rows_omitted`` and ``failures_omitted`` count the others, which the store's index has.
    ``made`` says what the done items hold, over all of them (:func:`made_line`).
    """
    statuses = ("done", "failed", "skipped", "interrupted")
    counts = {s: sum(r["status"] == s for r in rows) for s in statuses}
    opened = [r["id"] for r in rows if r["status"] in ("done", "skipped")]
    failures = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    return {
        "name": name,
        "store": store,
        "index": f"{str(store).rstrip('/')}/index.parquet",
        **counts,
        "failures": failures[:SUMMARY_ROWS],
        "failures_omitted": max(len(failures) - SUMMARY_ROWS, 0),
        "made": made_line(rows),
        "open": open_line(store, opened[0]) if opened else None,
        "rows": [_plain(row) for row in rows[:SUMMARY_ROWS]],
        "rows_omitted": max(len(rows) - SUMMARY_ROWS, 0),
    }


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with numpy scalars as Python numbers (JSON has no numpy types)."""
    return {
        key: value.item() if isinstance(value, np.generic) else value for key, value in row.items()
    }


def made_line(rows: Sequence[dict[str, Any]]) -> str:
    """What the done (or already done) items hold: their objects, or for masks and class
    maps the share of foreground pixels (the mean over items); "" when nothing is done."""
    from segflow.engine.item import describe_output

    rows = [r for r in rows if r["status"] in ("done", "skipped")]
    if not rows:
        return ""
    if len(rows) == 1:
        return describe_output(rows[0].get("object_count"), rows[0].get("foreground_fraction"))
    counts = [int(r["object_count"]) for r in rows if r.get("object_count") is not None]
    fractions = [
        float(r["foreground_fraction"]) for r in rows if r.get("foreground_fraction") is not None
    ]
    if len(counts) == len(rows):
        return f"{describe_output(sum(counts), None)} in {len(rows)} items"
    if len(fractions) == len(rows):
        return f"{describe_output(None, sum(fractions) / len(rows))} (mean of {len(rows)} items)"
    return ""

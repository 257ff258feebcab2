"""Prefect artifacts of a run: its progress, a table of the items and a note on where the
output is."""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from segflow.engine.rows import IndexRows, first_by_id
from segflow.io._common import is_url, strip_file_scheme
from segflow.store.fs import fresh_fs
from segflow.store.quicklook import QUICKLOOK_NAME
from segflow.store.versions import resolve_item
from segflow.tasks.progress import ItemsProgress, listen_progress

# Seconds between two updates of a run's progress artifact (one API call each).
PROGRESS_INTERVAL = 2.0
# Rows of the queued-items table: a 100,000-item run lists the first ones and says so.
QUEUED_ROWS = 500
# Rows of the items table: a 100,000-item run shows its failed items, then the first others
# by id, and says so (the store's index has them all).
TABLE_ROWS = 1000
TABLE_COLUMNS = ("id", "status", "object_count", "seconds", "n_blocks", "shape", "error", "source")


def artifact_key(name: str, output: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one config writing to
    one output: ``segflow-NAME-HASH-SUFFIX``.

    ``HASH`` is the first 8 hex digits of the SHA-256 of the output's absolute path or URL,
    so a benchmark or test that runs the aerial config into a throw-away store never
    becomes the "latest" items table of the real one, and a store keeps its key whatever
    the working directory.

    Examples
    --------
    >>> artifact_key("Aerial tiles_2024", "s3://bucket/aerial.zarr", "items")
    'segflow-aerial-tiles-2024-ab56ed8b-items'
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-") or "segment"
    return f"segflow-{slug}-{output_hash(output)}-{suffix}"


def publish_quicklook(store: str, row: dict[str, Any]) -> None:
    """Link the quick look of the done item ``row`` of ``store`` from a markdown artifact of
    the current task run: the picture its commit holds (``quicklook.png`` in the version
    ``STORE/ITEM`` links to, written before the commit by
    :func:`segflow.engine.item.segment_item`). Nothing when the item has none (drawing it
    failed: its row's warning says why).

    The artifact holds the picture's address, never the picture: a ``file://`` link for a
    local store (a browser may refuse to open one from the UI's page: the path is shown to
    copy), the object's URL for an object store. Some 300 bytes in Prefect's database
    whatever the picture's size.
    """
    item = resolve_item(store, row["id"])
    location = os.path.abspath(item) if not is_url(item) else item
    location = f"{location.rstrip('/')}/{QUICKLOOK_NAME}"
    fs, path = fresh_fs(location)
    if not fs.exists(path):
        return
    nbytes = int(fs.size(path))
    link = location if is_url(location) else Path(location).as_uri()
    markdown = (
        f"**{row['id']}**: {row['object_count']} objects, {row['output']} outlined in yellow: "
        f"[quick look]({link}) (PNG, {nbytes / 1024:.1f} KiB)\n\n`{location}`"
    )
    create_markdown_artifact(
        markdown=markdown, description=f"quick look of {row['id']} ({row['source']})"
    )


def output_hash(output: str) -> str:
    """8 hex digits of the SHA-256 of ``output``'s absolute path (a local path, relative
    or ``file://``) or URL (``s3://…``), without a trailing slash."""
    output = strip_file_scheme(str(output))
    absolute = output if is_url(output) else os.path.abspath(output)
    return hashlib.sha256(absolute.rstrip("/").encode()).hexdigest()[:8]


@task(name="report-items", retries=0, cache_policy=NO_CACHE)
def report_items_task(
    summary: dict[str, Any], rows: list[dict[str, Any]], skipped: IndexRows | None = None
) -> None:
    """Publish the items table (failed items first, at most :data:`TABLE_ROWS` rows) and a
    markdown note of the run's ``summary`` (:func:`segflow.engine.collection.run_summary`)
    with the output location. ``rows`` in id order; ``skipped``: the rows of the items the
    run skipped, in id order, as columns (the same table as with them among ``rows``)."""
    name, store = summary["name"], summary["store"]
    more = skipped if skipped is not None else IndexRows()
    failed = [row for row in rows if row["status"] == "failed"]
    others = [row for row in rows if row["status"] != "failed"]
    # As a stable sort of all rows by "failed first" orders them: ids stay sorted.
    ordered = failed[:TABLE_ROWS] + first_by_id(others, more, max(TABLE_ROWS - len(failed), 0))
    total = len(rows) + len(more)
    table = [
        {
            column: round(row[column], 2)
            if column == "seconds" and row.get(column)
            else row.get(column)
            for column in TABLE_COLUMNS
        }
        for row in ordered[:TABLE_ROWS]
    ]
    shown = f" (the first {TABLE_ROWS} of {total}, failed first)" if total > TABLE_ROWS else ""
    create_table_artifact(
        table=table,
        key=artifact_key(name, store, "items"),
        description=f"segflow items of {name!r} in {store}{shown}",
    )
    lines = [f"# segflow: {name}", "", *summary_lines(summary)]
    if summary["open"]:
        module = summary["open"].split(".", 1)[0]  # xarray, or segflow (no plain copy)
        lines += ["", "Open an item in Python:", "", "```python", f"import {module}"]
        lines += [f"ds = {summary['open']}", "```"]
    create_markdown_artifact(
        markdown="\n".join(lines),
        key=artifact_key(name, store, "output"),
        description=f"where the output of {name!r} is",
    )


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Markdown lines of a run's summary: its counts, store and index, its failed items."""
    lines = [
        f"**Items:** {summary['done']} done, {summary['skipped']} skipped (already done), "
        f"{summary['failed']} failed"
        + (f", {summary['interrupted']} interrupted" if summary["interrupted"] else "")
        + "  ",
        f"**Store:** `{summary['store']}`  ",
        f"**Index:** `{summary['index']}`",
    ]
    if summary["failures"]:
        lines += ["", "## Failed items", ""]
        lines += [f"- `{f['id']}`: {f['error']}" for f in summary["failures"]]
        if summary.get("failures_omitted"):
            lines.append(f"- … and {summary['failures_omitted']} more (see the index)")
    return lines


@contextmanager
def publish_progress(
    name: str, store: str, items: list[dict[str, str]], *, interval: float = PROGRESS_INTERVAL
) -> Iterator[ItemsProgress]:
    """Show the run's progress in Prefect while the block runs.

    Creates a progress artifact (per cent of the items' work done; its description says
    how many items finished, which are running and which are queued) and a table of the
    queued items, then updates the progress from the engine's reports at most every
    ``interval`` seconds from a thread of its own (the items' threads never wait for the
    API), and once more at the end. A Prefect API that refuses an artifact costs the run
    its progress display, never its work.
    """
    logger = get_run_logger()
    progress = ItemsProgress([item["id"] for item in items])
    try:
        artifact_id = cast(
            UUID,
            create_progress_artifact(
                progress.percent(),
                key=artifact_key(name, store, "progress"),
                description=progress.describe(),
            ),
        )
        create_table_artifact(
            table=[{"id": i["id"], "source": i["path"]} for i in items[:QUEUED_ROWS]],
            description=f"{name}: the {len(items)} items of this run, in the order they are "
            "submitted" + (f" (the first {QUEUED_ROWS} shown)" if len(items) > QUEUED_ROWS else ""),
        )
    except Exception as error:
        logger.warning("no progress artifact for this run: %s", error)
        yield progress
        return

    changed = threading.Event()
    stopped = threading.Event()

    def listen(item_id: str, phase: str, done: int, total: int) -> None:
        if progress.update(item_id, phase, done, total):
            changed.set()

    def publish() -> None:
        try:
            update_progress_artifact(artifact_id, progress.percent(), progress.describe())
        except Exception as error:  # the next update may get through
            logger.debug("progress artifact not updated: %s", error)

    def publish_changes() -> None:
        while not stopped.wait(interval):
            if changed.is_set():
                changed.clear()
                publish()

    # The thread runs in a copy of this context: the flow run and the API settings.
    thread = threading.Thread(
        target=contextvars.copy_context().run,
        args=(publish_changes,),
        name="segflow-progress-artifact",
        daemon=True,
    )
    thread.start()
    try:
        with listen_progress(listen):
            yield progress
    finally:
        stopped.set()
        thread.join()
        publish()


def publish_summary(name: str, store: str, summary: dict[str, Any], *, run: str) -> None:
    """A markdown artifact with the summary of the flow run ``run`` (a parent run, such as
    a backfill, shows its child's outcome on its own page)."""
    create_markdown_artifact(
        markdown="\n".join([f"# {summary['name']}: run `{run}`", "", *summary_lines(summary)]),
        key=artifact_key(name, store, "summary"),
        description=f"the outcome of {run}",
    )

"""Prefect artifacts of a run: a table of the items and a note on where the output is."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from segflow.store.select import open_line

TABLE_COLUMNS = ("id", "status", "object_count", "seconds", "n_blocks", "shape", "error", "source")


def artifact_key(name: str, suffix: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from a run name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "segment"
    return f"segflow-{slug}-{suffix}"


@task(name="report-items", retries=0, cache_policy=NO_CACHE)
def report_items_task(name: str, store: str, rows: list[dict[str, Any]]) -> None:
    """Publish the items table and a markdown note with the output location."""
    table = [
        {
            column: round(row[column], 2)
            if column == "seconds" and row.get(column)
            else row.get(column)
            for column in TABLE_COLUMNS
        }
        for row in rows
    ]
    create_table_artifact(
        table=table, key=artifact_key(name, "items"), description=f"segflow items of {name!r}"
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    done = [r["id"] for r in rows if r["status"] in ("done", "skipped")]
    lines = [
        f"# segflow: {name}",
        "",
        f"**Store:** `{store}`  ",
        f"**Items:** {counts['done']} done, {counts['skipped']} skipped (already done), "
        f"{counts['failed']} failed  ",
        f"**Index:** `{store}/index.parquet`",
        "",
    ]
    if done:
        lines += [
            "Open an item in Python:",
            "",
            "```python",
            "import xarray",
            f"ds = {open_line(store, done[0])}",
            "```",
            "",
        ]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed items", ""] + [f"- `{r['id']}`: {r['error']}" for r in failed]
    create_markdown_artifact(
        markdown="\n".join(lines),
        key=artifact_key(name, "output"),
        description=f"where the output of {name!r} is",
    )

"""Prefect tasks: thin adapters over the segflow engine that pass references, not arrays."""

from segflow.tasks.artifacts import report_items_task
from segflow.tasks.items import discover_items_task, segment_item_task
from segflow.tasks.store import (
    read_commits_task,
    read_index_task,
    record_items_task,
    write_index_task,
)

__all__ = [
    "discover_items_task",
    "read_commits_task",
    "read_index_task",
    "record_items_task",
    "report_items_task",
    "segment_item_task",
    "write_index_task",
]

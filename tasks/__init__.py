"""Prefect tasks: thin adapters over the segflow engine that pass references, not arrays."""

from tasks.artifacts import report_items_task
from tasks.items import discover_items_task, segment_item_task
from tasks.store import (
    consolidate_store_task,
    prepare_store_task,
    read_index_task,
    write_index_task,
)

__all__ = [
    "consolidate_store_task",
    "discover_items_task",
    "prepare_store_task",
    "read_index_task",
    "report_items_task",
    "segment_item_task",
    "write_index_task",
]

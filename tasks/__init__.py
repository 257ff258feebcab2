"""Prefect tasks: thin adapters over the segflow engine that pass references, not arrays."""

from segflow.tasks.artifacts import report_items_task
from segflow.tasks.items import plan_items_task, segment_items_task
from segflow.tasks.store import read_index_task, write_index_task

__all__ = [
    "plan_items_task",
    "read_index_task",
    "report_items_task",
    "segment_items_task",
    "write_index_task",
]

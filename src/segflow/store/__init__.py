"""Output store: per-item Zarr v3 groups readable by xarray/rioxarray, and the Parquet index.

The index helpers import pandas, which workers never need: they load on first use.
"""

from typing import Any

from segflow.store.cf import GRID_MAPPING
from segflow.store.layout import (
    ArraySpec,
    ZarrRegionWriter,
    consolidate_store,
    create_item_group,
    create_output_array,
    storage_unit,
)

__all__ = [
    "GRID_MAPPING",
    "INDEX_COLUMNS",
    "STATUSES",
    "ArraySpec",
    "ZarrRegionWriter",
    "consolidate_store",
    "create_item_group",
    "create_output_array",
    "read_index",
    "storage_unit",
    "write_index",
]


_INDEX_NAMES = {"INDEX_COLUMNS", "STATUSES", "read_index", "write_index"}


def __getattr__(name: str) -> Any:
    if name in _INDEX_NAMES:
        from segflow.store import index

        return getattr(index, name)
    raise AttributeError(f"module 'segflow.store' has no attribute {name!r}")

"""Output store: per-item Zarr v3 groups readable by xarray/rioxarray, and the Parquet index."""

from segflow.store.index import INDEX_COLUMNS, STATUSES, read_index, write_index
from segflow.store.layout import (
    GRID_MAPPING,
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

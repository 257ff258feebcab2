"""Tasks that record results in the output store: the Parquet index and consolidation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from pandas.api.types import is_scalar
from prefect import task
from prefect.cache_policies import NO_CACHE

from segflow.store import consolidate_store, read_index, write_index


@task(name="read-index", retries=0, cache_policy=NO_CACHE)
def read_index_task(store: str) -> list[dict[str, Any]]:
    """The rows of ``STORE/index.parquet`` (none when the store is new), as plain dicts."""
    frame = read_index(store)
    return [
        {
            key: (None if is_scalar(value) and pd.isna(value) else value)
            for key, value in row.items()
        }
        for row in frame.to_dict(orient="records")
    ]


@task(name="write-index", retries=0, cache_policy=NO_CACHE)
def write_index_task(store: str, rows: list[dict[str, Any]]) -> str:
    """Merge ``rows`` into ``STORE/index.parquet`` (keyed by item id); return its path."""
    return str(write_index(store, rows))


@task(name="prepare-store", retries=0, cache_policy=NO_CACHE)
def prepare_store_task(store: str) -> None:
    """Create the store's root group if missing and drop its consolidated metadata.

    Done once before items run concurrently: otherwise every item's first write races to
    create (or rewrite) the same root document. ``consolidate_store_task`` restores the
    consolidated metadata at the end of the run.
    """
    import zarr

    root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
    root.update_attributes({})  # rewrites the root document without consolidated metadata


@task(name="consolidate-store", retries=0, cache_policy=NO_CACHE)
def consolidate_store_task(store: str) -> bool:
    """Consolidate the Zarr metadata of ``store``; False when no Zarr group exists yet."""
    if not (Path(store) / "zarr.json").exists():
        return False
    consolidate_store(store)  # it knows the Parquet tables beside the groups are not nodes
    return True

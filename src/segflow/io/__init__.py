"""Readers: one item of a collection as metadata plus windowed reads, channels first.

The reader classes load their libraries (rasterio, nibabel, zarr, ...) when first asked
for, so ``import segflow.io`` (and a CLI that only checks what is to do) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from segflow.io.base import Format, ItemInfo, Reader
from segflow.io.discover import (
    assign_item_ids,
    discover_items,
    open_item,
    unused_id,
)
from segflow.io.registry import (
    ReaderBackend,
    backend_for,
    backends,
    describe_formats,
    register_reader,
)

if TYPE_CHECKING:
    from segflow.io.geotiff import GeoTIFFReader
    from segflow.io.image import ImageReader
    from segflow.io.nifti import NiftiReader
    from segflow.io.zarr import ArrayReader, ZarrReader

_LAZY = {
    "ArrayReader": "segflow.io.zarr",
    "ZarrReader": "segflow.io.zarr",
    "GeoTIFFReader": "segflow.io.geotiff",
    "ImageReader": "segflow.io.image",
    "NiftiReader": "segflow.io.nifti",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segflow.io' has no attribute {name!r}")


__all__ = [
    "ArrayReader",
    "Format",
    "GeoTIFFReader",
    "ImageReader",
    "ItemInfo",
    "NiftiReader",
    "Reader",
    "ReaderBackend",
    "ZarrReader",
    "assign_item_ids",
    "backend_for",
    "backends",
    "describe_formats",
    "register_reader",
    "unused_id",
    "discover_items",
    "open_item",
]

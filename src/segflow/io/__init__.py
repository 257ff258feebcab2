"""Readers: one item of a collection as metadata plus windowed reads, channels first."""

from segflow.io.base import Format, ItemInfo, Reader
from segflow.io.discover import (
    assign_item_ids,
    discover_items,
    open_item,
    unused_id,
)
from segflow.io.geotiff import GeoTIFFReader
from segflow.io.image import ImageReader
from segflow.io.nifti import NiftiReader
from segflow.io.registry import (
    ReaderBackend,
    backend_for,
    backends,
    describe_formats,
    register_reader,
)
from segflow.io.zarr import ArrayReader, ZarrReader

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

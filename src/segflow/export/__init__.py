"""Out of the store into the formats other tools open: COG rasters for GIS tools, COCO JSON
and GeoJSON polygons for annotation tools (``segflow export``)."""

from segflow.export.stored import StoredItem, stored_items

__all__ = ["StoredItem", "stored_items"]

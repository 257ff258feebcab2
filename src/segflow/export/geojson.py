"""A store's instances as one GeoJSON FeatureCollection.

One feature per object, properties ``item`` and ``label`` (the object's id in the store);
geometries keep their holes, simplified to a tolerance in pixels. Coordinates are pixel
corners (``x`` the column, ``y`` the row, from the item's top-left corner) or, with
``crs``, the item's CRS (its physical coordinates when it has none); the file then names
the CRS in the ``crs`` member that GDAL and QGIS read (GeoJSON's RFC 7946 knows only
longitude/latitude).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from segflow.errors import StoreError
from segflow.export.polygons import ItemPolygons, simplify


def geojson_document(
    items: Sequence[ItemPolygons], *, tolerance: float = 0.0, crs: bool = False
) -> dict[str, Any]:
    """The FeatureCollection of the objects of ``items``.

    Raises
    ------
    StoreError
        With ``crs``, when the items have different CRSs (one file has one CRS).
    """
    import shapely

    from segflow.store.vectors import to_world

    features = []
    for polygons in items:
        shapes = [simplify(g, tolerance) for g in polygons.geometries]
        if crs:
            shapes = list(to_world(shapes, polygons.item.transform))
        for label, shape in zip(polygons.labels.tolist(), shapes, strict=True):
            features.append(
                {
                    "type": "Feature",
                    "properties": {"item": polygons.item.id, "label": label},
                    "geometry": shapely.geometry.mapping(shape),
                }
            )
    document: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if crs and (name := _crs_name(items)):
        document["crs"] = {"type": "name", "properties": {"name": name}}
    return document


def _crs_name(items: Sequence[ItemPolygons]) -> str | None:
    """The items' one CRS as ``urn:ogc:def:crs:EPSG::CODE`` (None without a CRS or code)."""
    from rasterio.crs import CRS

    wkts = {p.item.crs_wkt for p in items}
    if len(wkts) > 1:
        ids = ", ".join(sorted(p.item.id for p in items)[:5])
        raise StoreError(
            f"--crs: the items ({ids}) have {len(wkts)} different CRSs; one GeoJSON file has "
            "one: export them one at a time with --item"
        )
    wkt = next(iter(wkts), None)
    code = CRS.from_wkt(wkt).to_epsg() if wkt else None
    return f"urn:ogc:def:crs:EPSG::{code}" if code else None

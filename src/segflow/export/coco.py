"""A store's instances as COCO JSON, the structure CVAT and Label Studio import.

``images`` (one per item: ``file_name`` is the item's source file name, with as many of
its folders as tell the items apart; ``width``, ``height``; ``segflow_item``, the item id),
``annotations`` (one per object: ``segmentation``, ``bbox`` ``[x, y, width, height]``,
``area``, ``category_id``, ``iscrowd`` 0; ``segflow_label``, the object's id in the store)
and ``categories`` (one, or each object's majority class in a class map of the item).
Coordinates are COCO's pixel-corner coordinates: pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``.

A COCO polygon cannot have a hole (every ring of a segmentation is filled), so an object
with a hole is written as an uncompressed RLE mask (exact, whatever the tolerance); every
other object as its polygon(s), simplified to ``tolerance`` pixels (0: exact, the pixel
outline without collinear vertices).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from segflow.export.polygons import ItemPolygons, ObjectClasses, object_mask, simplify
from segflow.export.stored import StoredItem


def coco_document(
    items: Sequence[ItemPolygons],
    *,
    tolerance: float = 0.0,
    category: str = "object",
    classes: Sequence[ObjectClasses] | None = None,
) -> dict[str, Any]:
    """The COCO JSON document of the objects of ``items``: one category (``category``, id
    1), or with ``classes`` (one per item) each object's class as its category (the class
    id, named as the class map names it)."""
    names = file_names([p.item for p in items])
    per_item = list(classes) if classes is not None else [None] * len(items)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (polygons, name, found) in enumerate(
        zip(items, names, per_item, strict=True), start=1
    ):
        height, width = polygons.item.shape
        images.append(
            {"id": image_id, "file_name": name, "width": width, "height": height,
             "segflow_item": polygons.item.id}
        )  # fmt: skip
        for label, geometry in zip(polygons.labels.tolist(), polygons.geometries, strict=True):
            annotation = coco_annotation(geometry, tolerance=tolerance, size=(height, width))
            category_id = found.classes.get(label, 0) if found is not None else 1
            annotation.update(
                id=len(annotations) + 1,
                image_id=image_id,
                category_id=category_id,
                segflow_label=label,
            )
            annotations.append(annotation)
    return {
        "info": {"description": "segflow export", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(annotations, classes)
        or [{"id": 1, "name": category, "supercategory": ""}],
    }


def _categories(
    annotations: Sequence[dict[str, Any]], classes: Sequence[ObjectClasses] | None
) -> list[dict[str, Any]]:
    """The classes the objects have, named as their class maps name them."""
    if classes is None:
        return []
    names: dict[int, str] = {}
    for found in classes:
        names.update(found.names)
    used = sorted({int(a["category_id"]) for a in annotations})
    return [{"id": c, "name": names.get(c, str(c)), "supercategory": ""} for c in used]


def coco_annotation(geometry: Any, *, tolerance: float, size: tuple[int, int]) -> dict[str, Any]:
    """``segmentation``, ``bbox``, ``area`` and ``iscrowd`` of one object (a (Multi)Polygon
    in pixel-corner coordinates): its polygons, or an RLE mask when it has a hole.

    Examples
    --------
    >>> import shapely
    >>> coco_annotation(shapely.box(1, 2, 4, 3), tolerance=0, size=(5, 5))["segmentation"]
    [[4.0, 2.0, 4.0, 3.0, 1.0, 3.0, 1.0, 2.0]]
    """
    import shapely

    parts = list(getattr(geometry, "geoms", [geometry]))
    if any(len(p.interiors) for p in parts):
        segmentation: Any = {"size": list(size), "counts": _rle(geometry, size)}
        area = float(geometry.area)  # pixel corners: the area is the pixel count
    else:
        geometry = simplify(geometry, tolerance)
        parts = list(getattr(geometry, "geoms", [geometry]))
        segmentation = [np.asarray(p.exterior.coords)[:-1].ravel().tolist() for p in parts]
        area = float(geometry.area)
    x0, y0, x1, y1 = shapely.bounds(geometry).tolist()
    return {"segmentation": segmentation, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area,
            "iscrowd": 0}  # fmt: skip


def _rle(geometry: Any, size: tuple[int, int]) -> list[int]:
    """RLE counts of a pixel-corner geometry: its pixels burned in its bounding box."""
    from segflow.io.coco import encode_rle

    mask, corner = object_mask(geometry)
    return encode_rle(mask, corner, size)


def file_names(items: Sequence[StoredItem]) -> list[str]:
    """Each item's source file name, with the folders below the sources' common folder
    when two names would be the same (``a/image.png``, ``b/image.png``).

    Examples
    --------
    >>> from segflow.export.stored import StoredItem
    >>> def item(source):
    ...     return StoredItem("s", source, source, (1, 1), None, (1, 0, 0, 0, 1, 0), {})
    >>> file_names([item("/d/a/image.png"), item("/d/b/image.png")])
    ['a/image.png', 'b/image.png']
    >>> file_names([item("/d/a/x.tif"), item("/e/y.tif")])
    ['x.tif', 'y.tif']
    """
    paths = [PurePosixPath(i.source.replace("\\", "/") or i.id) for i in items]
    if len({p.name for p in paths}) == len(paths):
        return [p.name for p in paths]
    common = os.path.commonpath([str(p.parent) for p in paths]) if paths else ""
    return [str(p.relative_to(common)) if common else str(p) for p in paths]

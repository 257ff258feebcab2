"""A store's instances as CVAT for images 1.1 XML, the file CVAT imports as "CVAT 1.1".

``<annotations>``: ``<version>1.1</version>``, ``<meta>`` (one task: its name, size, mode
``annotation`` and the labels used, each of type ``any``), then one ``<image id name width
height>`` per item (``name`` as the COCO export names it: the source file name, with as
many folders as tell the items apart) holding its objects in the order of their ids:

* an object without a hole as ``<polygon label occluded="0" points="x1,y1;x2,y2;..."
  z_order="0"/>``, one per part, in pixel-corner coordinates (pixel ``(row, col)`` covers
  ``[col, col + 1) x [row, row + 1)``, as COCO's), simplified to ``tolerance`` pixels; the
  polygons of an object in several parts share a ``group_id`` (CVAT's group: one object);
* an object with a hole (a CVAT polygon is one filled ring) as ``<mask label occluded="0"
  rle left top width height z_order="0"/>``: CVAT's run-length encoding of the object's
  bounding box (``left``, ``top``: its first column and row; ``width``, ``height`` in
  pixels) read row by row, the runs alternating from background (a first run of 0 when its
  first pixel is in), as CVAT writes and reads them; exact whatever the tolerance.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np

from segflow.export.coco import file_names
from segflow.export.polygons import ItemPolygons, ObjectClasses, object_mask, simplify


def cvat_document(
    items: Sequence[ItemPolygons],
    *,
    tolerance: float = 0.0,
    category: str = "object",
    classes: Sequence[ObjectClasses] | None = None,
    task: str = "segflow export",
) -> str:
    """The CVAT 1.1 XML of the objects of ``items``: every object labelled ``category``,
    or with ``classes`` (one per item) by its class's name in the item's class map."""
    names = file_names([p.item for p in items])
    per_item = list(classes) if classes is not None else [None] * len(items)
    images: list[ET.Element] = []
    used: dict[str, None] = {}
    groups = 0
    for image_id, (polygons, name, found) in enumerate(zip(items, names, per_item, strict=True)):
        height, width = polygons.item.shape
        image = ET.Element(
            "image", id=str(image_id), name=name, width=str(width), height=str(height)
        )
        for label, geometry in zip(polygons.labels.tolist(), polygons.geometries, strict=True):
            text = _label_name(label, found, category)
            used[text] = None
            groups = add_object(image, geometry, text, tolerance=tolerance, groups=groups)
        images.append(image)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    root.append(_meta(task, len(items), list(used) or [category]))
    root.extend(images)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def _label_name(label: int, found: ObjectClasses | None, category: str) -> str:
    if found is None:
        return category
    class_id = found.classes.get(label, 0)
    return found.names.get(class_id, str(class_id))


def _meta(task: str, size: int, labels: list[str]) -> ET.Element:
    meta = ET.Element("meta")
    node = ET.SubElement(meta, "task")
    for key, value in (("name", task), ("size", str(size)), ("mode", "annotation")):
        ET.SubElement(node, key).text = value
    spec = ET.SubElement(node, "labels")
    for name in labels:
        label = ET.SubElement(spec, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = "any"
        ET.SubElement(label, "attributes")
    return meta


def add_object(
    image: ET.Element, geometry: Any, label: str, *, tolerance: float, groups: int
) -> int:
    """Append one object (a (Multi)Polygon in pixel-corner coordinates) to ``image``: a
    mask if it has a hole, else a polygon per part (grouped when several); returns the
    number of groups used so far."""
    shared = {"label": label, "occluded": "0"}
    parts = list(getattr(geometry, "geoms", [geometry]))
    if any(len(p.interiors) for p in parts):
        mask, (top, left) = object_mask(geometry)
        ET.SubElement(image, "mask", {
            **shared, "rle": ", ".join(str(r) for r in cvat_rle(mask)), "left": str(left),
            "top": str(top), "width": str(mask.shape[1]), "height": str(mask.shape[0]),
            "z_order": "0",
        })  # fmt: skip
        return groups
    simple = simplify(geometry, tolerance)
    parts = list(getattr(simple, "geoms", [simple]))
    group = {"group_id": str(groups + 1)} if len(parts) > 1 else {}
    for part in parts:
        corners = np.asarray(part.exterior.coords)[:-1].tolist()
        points = ";".join(f"{x:.2f},{y:.2f}" for x, y in corners)
        ET.SubElement(image, "polygon", {**shared, "points": points, "z_order": "0", **group})
    return groups + bool(group)


def cvat_rle(mask: np.ndarray) -> list[int]:
    """CVAT's RLE of a 2-D mask: the lengths of its runs read row by row, alternating from
    a run of background (0 when the first pixel is in); they add up to the mask's size.

    Examples
    --------
    >>> cvat_rle(np.array([[1, 1, 0], [0, 1, 1]], bool)), cvat_rle(np.zeros((2, 2), bool))
    ([0, 2, 2, 2], [4])
    """
    flat = np.asarray(mask, bool).ravel()
    if not flat.size:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs

"""Bounding boxes from the files detectors and annotation tools write, matched to items.

Three layouts are read:

* CSV with the columns ``image_path, xmin, ymin, xmax, ymax`` and optionally ``label`` (the
  layout DeepForest and most detectors write);
* GeoJSON: a FeatureCollection of polygons (rectangles; their bounds are the box), each with
  an ``image_path`` property and optionally a ``label``;
* COCO JSON: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
  (``image_id``, ``bbox`` as ``[x, y, width, height]``, ``category_id``) and
  ``categories`` (``id``, ``name``).

A row belongs to an item when its image path equals the item's id, the item's path, or the
end of the item's path after a ``/`` (``"tile_7.tif"`` matches ``"data/tile_7.tif"``). Box
coordinates are ``x`` (columns) and ``y`` (rows); in pixels an edge lies between pixels, so
``xmin = 0, xmax = 3`` covers columns 0, 1 and 2. CRS coordinates (GeoJSON of a
georeferenced item) go through the item's affine transform.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The columns a boxes CSV must have (``label`` is optional: ``"object"`` by default).
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax")
DEFAULT_LABEL = "object"


@dataclass(frozen=True)
class BoxTable:
    """Every box of a file: ``coords`` rows are ``(xmin, ymin, xmax, ymax)``; ``rows`` is
    each box's row in the file (the CSV's data row, the feature's or annotation's index);
    ``sizes`` the image sizes a COCO file states, ``(height, width)`` by file name."""

    path: str
    images: tuple[str, ...]
    coords: np.ndarray
    labels: tuple[str, ...]
    rows: tuple[int, ...]
    sizes: tuple[tuple[str, tuple[int, int]], ...] = ()
    kind: str = "csv"  # "csv", "geojson" or "coco"

    @functools.cached_property
    def rows_by_image(self) -> dict[str, list[int]]:
        """The boxes' indices by image path (``\\`` read as ``/``)."""
        out: dict[str, list[int]] = {}
        for k, name in enumerate(self.images):
            out.setdefault(name.replace("\\", "/"), []).append(k)
        return out

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        """The distinct labels, sorted: class ``i + 1`` is ``classes[i]``."""
        return tuple(sorted(set(self.labels)))


@dataclass(frozen=True)
class ItemBoxes:
    """The boxes of one item in pixels: ``boxes`` rows ``(y0, x0, y1, x1)``, ends exclusive,
    clipped to the item; ``rows`` their rows in the file; ``classes`` their class values
    (``1 +`` the label's place among the file's sorted labels)."""

    boxes: np.ndarray
    rows: tuple[int, ...]
    labels: tuple[str, ...]
    classes: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.boxes)

    def extent(self) -> tuple[int, int]:
        """The largest box's height and width in pixels (0 without boxes)."""
        if not len(self.boxes):
            return (0, 0)
        sizes = self.boxes[:, 2:] - self.boxes[:, :2]
        return (int(sizes[:, 0].max()), int(sizes[:, 1].max()))


def read_boxes(path: str) -> BoxTable:
    """Read a boxes file (CSV, GeoJSON or COCO JSON, by content); cached per file version.

    Raises
    ------
    ValueError
        One line naming the file and the problem (a missing column, a zero-area box, ...).
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise ValueError(f"boxes file {path!r} cannot be read: {error.strerror}") from None
    return _read_boxes(path, stat.st_mtime_ns, stat.st_size)


def file_hash(path: str) -> str:
    """SHA-256 of a boxes file's bytes, read afresh (a file rewritten within the file
    system's time resolution keeps its size and mtime); ``""`` when unreadable: the step
    names that problem itself."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _read_boxes(path: str, mtime_ns: int, size: int) -> BoxTable:
    if path.lower().endswith(".csv"):
        table = _read_csv(path)
    else:
        with open(path, encoding="utf-8") as file:
            try:
                data = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"boxes file {path!r} is neither CSV nor JSON: {error}") from None
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            table = _from_coco(path, data)
        elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
            table = _from_geojson(path, data)
        else:
            raise ValueError(
                f"boxes file {path!r}: JSON that is neither COCO (images, annotations) nor a "
                "GeoJSON FeatureCollection"
            )
    _check_areas(table)
    return table


def _read_csv(path: str) -> BoxTable:
    import pandas as pd

    frame = pd.read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"boxes file {path!r} lacks the column(s) {', '.join(missing)}; a boxes CSV needs "
            f"{', '.join(CSV_COLUMNS)} (and optionally label), it has {', '.join(frame.columns)}"
        )
    coords = np.zeros((len(frame), 4), dtype=np.float64)
    for k, name in enumerate(("xmin", "ymin", "xmax", "ymax")):
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            row = int(bad[0])
            raise ValueError(
                f"boxes file {path!r} row {row} (line {row + 2}): {name} "
                f"{frame[name].iloc[row]!r} is not a number"
            )
        coords[:, k] = values.to_numpy(dtype=np.float64)
    labels = frame["label"].astype(str) if "label" in frame.columns else None
    return BoxTable(
        path,
        tuple(frame["image_path"].astype(str)),
        coords,
        tuple(labels) if labels is not None else (DEFAULT_LABEL,) * len(frame),
        tuple(range(len(frame))),
    )


def _from_geojson(path: str, data: dict) -> BoxTable:
    images, coords, labels = [], [], []
    for k, feature in enumerate(data.get("features", [])):
        properties = feature.get("properties") or {}
        if "image_path" not in properties:
            raise ValueError(f"boxes file {path!r} feature {k}: no `image_path` property")
        points = np.asarray(_polygon_points(feature.get("geometry"), path, k), dtype=np.float64)
        coords.append([points[:, 0].min(), points[:, 1].min(), *points.max(axis=0)[:2]])
        images.append(str(properties["image_path"]))
        labels.append(str(properties.get("label", DEFAULT_LABEL)))
    array = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    rows = tuple(range(len(images)))
    return BoxTable(path, tuple(images), array, tuple(labels), rows, kind="geojson")


def _polygon_points(geometry: dict | None, path: str, k: int) -> list[list[float]]:
    if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
        kind = None if not geometry else geometry.get("type")
        raise ValueError(f"boxes file {path!r} feature {k}: a Polygon is needed, got {kind}")
    rings = geometry["coordinates"]
    if geometry["type"] == "MultiPolygon":
        rings = [ring for polygon in rings for ring in polygon]
    return [list(point[:2]) for ring in rings for point in ring]


def _from_coco(path: str, data: dict) -> BoxTable:
    files = {image["id"]: image for image in data["images"]}
    names = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    images, coords, labels, rows = [], [], [], []
    for k, annotation in enumerate(data["annotations"]):
        if "bbox" not in annotation:
            continue  # a polygon or RLE annotation without a box
        image = files.get(annotation.get("image_id"))
        if image is None:
            raise ValueError(
                f"boxes file {path!r} annotation {k}: image_id "
                f"{annotation.get('image_id')!r} is not among its images"
            )
        x, y, width, height = (float(v) for v in annotation["bbox"])
        images.append(str(image["file_name"]))
        coords.append([x, y, x + width, y + height])
        labels.append(names.get(annotation.get("category_id"), DEFAULT_LABEL))
        rows.append(k)
    sizes = tuple(
        (str(i["file_name"]), (int(i["height"]), int(i["width"])))
        for i in data["images"]
        if "height" in i and "width" in i
    )
    array = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    return BoxTable(path, tuple(images), array, tuple(labels), tuple(rows), sizes, kind="coco")


def _check_areas(table: BoxTable) -> None:
    """Refuse a zero-area (or inverted) box: it names no pixel."""
    width = table.coords[:, 2] - table.coords[:, 0]
    height = table.coords[:, 3] - table.coords[:, 1]
    bad = np.flatnonzero(~((width > 0) & (height > 0)))
    if len(bad):
        k = int(bad[0])
        xmin, ymin, xmax, ymax = (float(v) for v in table.coords[k])
        raise ValueError(
            f"boxes file {table.path!r} row {table.rows[k]}: zero-area box (xmin {xmin:g}, "
            f"xmax {xmax:g}, ymin {ymin:g}, ymax {ymax:g}); xmax must exceed xmin and ymax ymin"
        )


def item_keys(item_id: str, item_path: str) -> set[str]:
    """Every image path that names the item: its id, its path, and each end of its path
    after a ``/`` (``"b/c.tif"`` and ``"c.tif"`` for ``"a/b/c.tif"``).

    Examples
    --------
    >>> sorted(item_keys("c", "a/b/c.tif"))
    ['a/b/c.tif', 'b/c.tif', 'c', 'c.tif']
    """
    path = item_path.replace("\\", "/")
    parts = path.split("/")
    ends = {"/".join(parts[i:]) for i in range(1, len(parts))}
    return {item_id, path} | {end for end in ends if end}


def matches(image_path: str, item_id: str, item_path: str) -> bool:
    """Whether a row's image path names the item (:func:`item_keys`).

    Examples
    --------
    >>> matches("tile_7.tif", "tile_7", "data/tile_7.tif")
    True
    >>> matches("7.tif", "tile_7", "data/tile_7.tif")
    False
    """
    return image_path.replace("\\", "/") in item_keys(item_id, item_path)


def item_boxes(
    table: BoxTable,
    *,
    item_id: str,
    item_path: str,
    shape: tuple[int, int],
    transform: Sequence[float] | None = None,
) -> ItemBoxes:
    """The table's boxes of one item, in pixels, clipped to the item's ``shape``.

    With ``transform`` (rasterio order ``a, b, c, d, e, f``) the coordinates are CRS
    coordinates. A box that does not overlap the item is refused in one line.
    """
    rows = table.rows_by_image
    picked = sorted(k for key in item_keys(item_id, item_path) for k in rows.get(key, ()))
    _check_size(table, picked, item_id, shape)
    coords = table.coords[picked]
    if transform is not None:
        coords = _to_pixels(coords, transform, item_id)
    boxes = np.empty((len(picked), 4), dtype=np.int64)
    boxes[:, 0] = np.floor(coords[:, 1] + 1e-9)
    boxes[:, 1] = np.floor(coords[:, 0] + 1e-9)
    boxes[:, 2] = np.ceil(coords[:, 3] - 1e-9)
    boxes[:, 3] = np.ceil(coords[:, 2] - 1e-9)
    limit = np.array([shape[0], shape[1], shape[0], shape[1]])
    clipped = np.clip(boxes, 0, limit)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        xmin, ymin, xmax, ymax = (float(v) for v in table.coords[picked[k]])
        raise ValueError(
            f"item {item_id!r}: box at row {table.rows[picked[k]]} of {table.path!r} "
            f"(xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g}) lies outside "
            f"the image ({shape[1]} x {shape[0]} pixels)"
        )
    index = {name: i + 1 for i, name in enumerate(table.classes)}
    labels = tuple(table.labels[k] for k in picked)
    return ItemBoxes(
        clipped,
        tuple(table.rows[k] for k in picked),
        labels,
        tuple(index[label] for label in labels),
        table.classes,
    )


def _check_size(table: BoxTable, picked: list[int], item_id: str, shape: tuple[int, int]) -> None:
    """A COCO file's stated image size must be the item's."""
    sizes = dict(table.sizes)
    for name in {table.images[k] for k in picked}:
        if name in sizes and sizes[name] != tuple(shape):
            height, width = sizes[name]
            raise ValueError(
                f"item {item_id!r}: {table.path!r} gives {name!r} as {width} x {height} "
                f"pixels, the image is {shape[1]} x {shape[0]}"
            )


def _to_pixels(coords: np.ndarray, transform: Sequence[float], item_id: str) -> np.ndarray:
    """CRS ``(xmin, ymin, xmax, ymax)`` to pixel ``(xmin, ymin, xmax, ymax)`` (a north-up or
    south-up grid; a rotated one is refused)."""
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    if b != 0 or d != 0 or a == 0 or e == 0:
        raise ValueError(f"item {item_id!r}: CRS boxes need an unrotated grid, got {transform}")
    cols = (coords[:, [0, 2]] - c) / a
    rows = (coords[:, [1, 3]] - f) / e
    return np.stack(
        [cols.min(axis=1), rows.min(axis=1), cols.max(axis=1), rows.max(axis=1)], axis=1
    )


def unmatched_rows(table: BoxTable, items: Sequence[tuple[str, str]]) -> list[str]:
    """The image paths of ``table`` that name no item of ``items`` (``(id, path)`` each), or
    more than one, one line each (at most 20, then a count)."""
    named: dict[str, set[int]] = {}
    for index, (item_id, path) in enumerate(items):
        for key in item_keys(item_id, path):
            named.setdefault(key, set()).add(index)
    problems = []
    for name, rows in sorted(table.rows_by_image.items()):
        count = len(named.get(name, ()))
        if count != 1:
            what = "no item of the collection" if count == 0 else f"{count} items"
            problems.append(f"{table.path!r}: {len(rows)} box(es) for {name!r} match {what}")
    if len(problems) > 20:
        problems = [*problems[:20], f"... and {len(problems) - 20} more image paths"]
    return problems


__all__ = [
    "CSV_COLUMNS",
    "BoxTable",
    "ItemBoxes",
    "item_boxes",
    "item_keys",
    "matches",
    "read_boxes",
    "unmatched_rows",
]

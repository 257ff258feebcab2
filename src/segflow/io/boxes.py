"""Bounding boxes from the files detectors and annotation tools write, matched to items.

Three layouts are read:

* CSV with the columns ``image_path, xmin, ymin, xmax, ymax`` and optionally ``label`` (the
  layout DeepForest and most detectors write); with ``zmin, zmax`` columns besides, the
  boxes are 3-D (``image_path,xmin,ymin,zmin,xmax,ymax,zmax[,label]``; voxel coordinates,
  ``z`` the first of the item's three axes ``(z, y, x)``), for 3-D items only;
* GeoJSON: a FeatureCollection of polygons (rectangles; their bounds are the box), each with
  optionally an ``image_path`` property and a ``label``; a feature without ``image_path``
  belongs to every georeferenced item it overlaps (matched by location);
* COCO JSON: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
  (``image_id``, ``bbox`` as ``[x, y, width, height]``, ``category_id``) and
  ``categories`` (``id``, ``name``).

A row belongs to an item when its image path equals the item's id, the item's path, or the
end of the item's path after a ``/`` (``"tile_7.tif"`` matches ``"data/tile_7.tif"``). Box
coordinates are ``x`` (columns) and ``y`` (rows); in pixels an edge lies between pixels, so
``xmin = 0, xmax = 3`` covers columns 0, 1 and 2. CRS coordinates (GeoJSON of a
georeferenced item) go through the item's affine transform. They are in the boxes' CRS: the
step's ``crs``, else the GeoJSON's ``crs`` member (as GDAL, QGIS and geopandas write it for
a projected layer), else the item's own CRS; boxes in another CRS than the item's are
reprojected (each edge densified, the box is the bounds of the result).

A 2-D boxes file on a 3-D item, and a 3-D one on a 2-D item, is refused in one line
(GeoJSON and COCO boxes are 2-D).

A box matched by location is clipped to each item it overlaps: a box across two tiles gives
one object in each (a scene, ``input.mosaic``, is one item and gives one).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The columns a boxes CSV must have (``label`` is optional: ``"object"`` by default).
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax")
#: The columns that make a boxes CSV's boxes 3-D (both or neither).
DEPTH_COLUMNS = ("zmin", "zmax")
DEFAULT_LABEL = "object"
#: The image path of a GeoJSON feature without one: matched to items by location.
BY_LOCATION = ""
#: Points per box edge when a box is reprojected.
DENSIFY = 21


@dataclass(frozen=True)
class BoxTable:
    """Every box of a file: ``coords`` rows are ``(xmin, ymin, xmax, ymax)``; ``rows`` is
    each box's row in the file (the CSV's data row, the feature's or annotation's index);
    ``sizes`` the image sizes a COCO file states, ``(height, width)`` by file name; ``crs``
    the CRS a GeoJSON's ``crs`` member names (``None``: not stated); ``z`` the 3-D boxes'
    ``(zmin, zmax)`` rows (``None``: 2-D boxes)."""

    path: str
    images: tuple[str, ...]
    coords: np.ndarray
    labels: tuple[str, ...]
    rows: tuple[int, ...]
    sizes: tuple[tuple[str, tuple[int, int]], ...] = ()
    kind: str = "csv"  # "csv", "geojson" or "coco"
    crs: str | None = None
    z: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        """2 for boxes ``(x, y)``, 3 for boxes with ``zmin, zmax``."""
        return 2 if self.z is None else 3

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

    @functools.cached_property
    def by_location(self) -> np.ndarray:
        """The indices of the boxes matched to items by location, in file order."""
        return np.array(self.rows_by_image.get(BY_LOCATION, []), dtype=np.int64)


@dataclass(frozen=True)
class ItemBoxes:
    """The boxes of one item in pixels: ``boxes`` rows ``(y0, x0, y1, x1)`` (3-D items:
    ``(z0, y0, x0, z1, y1, x1)``), ends exclusive, clipped to the item; ``rows`` their rows
    in the file; ``classes`` their class values (``1 +`` the label's place among the file's
    sorted labels)."""

    boxes: np.ndarray
    rows: tuple[int, ...]
    labels: tuple[str, ...]
    classes: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.boxes)

    def extent(self) -> tuple[int, ...]:
        """The largest box's size per axis in pixels, ``(z), y, x`` (0s without boxes)."""
        n = self.boxes.shape[1] // 2
        if not len(self.boxes):
            return (0,) * n
        sizes = self.boxes[:, n:] - self.boxes[:, :n]
        return tuple(int(v) for v in sizes.max(axis=0))


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
    depth = [c for c in DEPTH_COLUMNS if c in frame.columns]
    if len(depth) == 1:
        other = next(c for c in DEPTH_COLUMNS if c not in depth)
        raise ValueError(
            f"boxes file {path!r} has the column {depth[0]} but not {other}; 3-D boxes need "
            "both zmin and zmax, 2-D boxes neither"
        )
    coords = _numbers(frame, path, ("xmin", "ymin", "xmax", "ymax"))
    z = _numbers(frame, path, DEPTH_COLUMNS) if depth else None
    labels = frame["label"].astype(str) if "label" in frame.columns else None
    return BoxTable(
        path,
        tuple(frame["image_path"].astype(str)),
        coords,
        tuple(labels) if labels is not None else (DEFAULT_LABEL,) * len(frame),
        tuple(range(len(frame))),
        z=z,
    )


def _numbers(frame: Any, path: str, names: Sequence[str]) -> np.ndarray:
    """The columns ``names`` of a CSV as floats, a cell that is not a number refused."""
    import pandas as pd

    out = np.zeros((len(frame), len(names)), dtype=np.float64)
    for k, name in enumerate(names):
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            row = int(bad[0])
            raise ValueError(
                f"boxes file {path!r} row {row} (line {row + 2}): {name} "
                f"{frame[name].iloc[row]!r} is not a number"
            )
        out[:, k] = values.to_numpy(dtype=np.float64)
    return out


def _from_geojson(path: str, data: dict) -> BoxTable:
    images, coords, labels = [], [], []
    for k, feature in enumerate(data.get("features", [])):
        properties = feature.get("properties") or {}
        points = np.asarray(_polygon_points(feature.get("geometry"), path, k), dtype=np.float64)
        coords.append([points[:, 0].min(), points[:, 1].min(), *points.max(axis=0)[:2]])
        images.append(str(properties.get("image_path", BY_LOCATION)))
        labels.append(str(properties.get("label", DEFAULT_LABEL)))
    array = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    rows = tuple(range(len(images)))
    crs = _geojson_crs(data, path)
    return BoxTable(path, tuple(images), array, tuple(labels), rows, kind="geojson", crs=crs)


def _geojson_crs(data: dict, path: str) -> str | None:
    """The CRS a GeoJSON's (pre-RFC 7946) ``crs`` member names, e.g.
    ``urn:ogc:def:crs:EPSG::32618``; ``None`` without one."""
    member = data.get("crs")
    if member is None:
        return None
    name = (member.get("properties") or {}).get("name") if isinstance(member, dict) else None
    if not isinstance(name, str):
        raise ValueError(
            f"boxes file {path!r}: its `crs` member {member!r} names no CRS (expected "
            '{"type": "name", "properties": {"name": "EPSG:..."}})'
        )
    return name


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
    good = (width > 0) & (height > 0)
    if table.z is not None:
        good &= table.z[:, 1] - table.z[:, 0] > 0
    bad = np.flatnonzero(~good)
    if len(bad) and table.z is not None:
        k = int(bad[0])
        raise ValueError(
            f"boxes file {table.path!r} row {table.rows[k]}: zero-volume box "
            f"({_describe(table, k)}); xmax must exceed xmin, ymax ymin and zmax zmin"
        )
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
    shape: tuple[int, ...],
    transform: Sequence[float] | None = None,
    crs: str | None = None,
    item_crs: str | None = None,
) -> ItemBoxes:
    """The table's boxes of one item, in pixels, clipped to the item's ``shape`` (``(y, x)``,
    or ``(z, y, x)`` for 3-D boxes), in file order.

    With ``transform`` (rasterio order ``a, b, c, d, e, f``) the coordinates are CRS
    coordinates, in ``crs`` (``None``: the item's own, ``item_crs``), and the boxes without
    an image path that overlap the item are its boxes too. A box named for the item that
    does not overlap it is refused in one line, and so are 2-D boxes for a 3-D item and 3-D
    boxes for a 2-D one.
    """
    _check_dims(table, item_id, shape)
    rows = table.rows_by_image
    named = sorted(k for key in item_keys(item_id, item_path) for k in rows.get(key, ()))
    _check_size(table, named, item_id, shape)
    coords = table.coords[named]
    located = np.zeros(0, dtype=np.int64)
    if transform is not None:
        coords = _to_pixels(_to_item_crs(coords, crs, item_crs, item_id), transform, item_id)
        plane = (shape[0], shape[1])  # CRS boxes are 2-D (_check_dims)
        located, spots = _located(table, plane, transform, crs, item_crs, item_id)
    boxes = _pixel_boxes(coords)
    if table.z is not None:
        boxes = _with_depth(boxes, table.z[named])
    _check_inside(table, named, boxes, item_id, shape)
    every = np.concatenate([np.asarray(named, dtype=np.int64), located])
    order = np.argsort(every, kind="stable")
    picked = [int(k) for k in every[order]]
    if len(located):
        boxes = np.concatenate([boxes, _pixel_boxes(spots)])[order]
    clipped = np.clip(boxes, 0, [*shape, *shape])
    index = {name: i + 1 for i, name in enumerate(table.classes)}
    labels = tuple(table.labels[k] for k in picked)
    return ItemBoxes(
        clipped,
        tuple(table.rows[k] for k in picked),
        labels,
        tuple(index[label] for label in labels),
        table.classes,
    )


def _pixel_boxes(coords: np.ndarray) -> np.ndarray:
    """Pixel ``(xmin, ymin, xmax, ymax)`` to the pixels a box covers, ``(y0, x0, y1, x1)``."""
    boxes = np.empty((len(coords), 4), dtype=np.int64)
    boxes[:, 0] = np.floor(coords[:, 1] + 1e-9)
    boxes[:, 1] = np.floor(coords[:, 0] + 1e-9)
    boxes[:, 2] = np.ceil(coords[:, 3] - 1e-9)
    boxes[:, 3] = np.ceil(coords[:, 2] - 1e-9)
    return boxes


def _with_depth(boxes: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Pixel boxes ``(y0, x0, y1, x1)`` and ``(zmin, zmax)`` to ``(z0, y0, x0, z1, y1, x1)``
    (edges between voxels, as ``x`` and ``y``)."""
    z0 = np.floor(z[:, 0] + 1e-9).astype(np.int64)
    z1 = np.ceil(z[:, 1] - 1e-9).astype(np.int64)
    return np.column_stack([z0, boxes[:, :2], z1, boxes[:, 2:]])


def _check_dims(table: BoxTable, item_id: str, shape: tuple[int, ...]) -> None:
    """Refuse 2-D boxes for a 3-D item and 3-D boxes (``zmin, zmax``) for a 2-D one."""
    if len(shape) == table.ndim:
        return
    if len(shape) == 3:
        raise ValueError(
            f"item {item_id!r} is 3-D ({_size(shape)}) but {table.path!r} has 2-D boxes: "
            "a 3-D item needs zmin and zmax for each box (CSV columns or inline keys)"
        )
    if len(shape) == 2:
        raise ValueError(
            f"item {item_id!r} is 2-D ({_size(shape)}) but {table.path!r} has 3-D boxes "
            "(zmin, zmax): a 2-D item needs boxes without them"
        )
    raise ValueError(f"from_boxes works on 2-D and 3-D items, item {item_id!r} is {len(shape)}-D")


def _size(shape: tuple[int, ...]) -> str:
    """``"30 x 20 pixels"`` (width x height) or ``"30 x 20 x 5 voxels"`` (x, y, z)."""
    unit = "pixels" if len(shape) == 2 else "voxels"
    return " x ".join(str(n) for n in shape[::-1]) + f" {unit}"


def _describe(table: BoxTable, k: int) -> str:
    """Box ``k`` as the file gives it: ``"xmin 40, ymin 2, xmax 50, ymax 8"`` (3-D: with
    ``zmin`` and ``zmax``)."""
    xmin, ymin, xmax, ymax = (float(v) for v in table.coords[k])
    if table.z is None:
        return f"xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g}"
    zmin, zmax = (float(v) for v in table.z[k])
    return (
        f"xmin {xmin:g}, ymin {ymin:g}, zmin {zmin:g}, xmax {xmax:g}, ymax {ymax:g}, zmax {zmax:g}"
    )


def _check_inside(
    table: BoxTable, picked: list[int], boxes: np.ndarray, item_id: str, shape: tuple[int, ...]
) -> None:
    """Refuse a box named for the item that does not overlap it."""
    n = len(shape)
    clipped = np.clip(boxes, 0, [*shape, *shape])
    outside = np.any(clipped[:, n:] <= clipped[:, :n], axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"item {item_id!r}: box at row {table.rows[picked[k]]} of {table.path!r} "
            f"({_describe(table, picked[k])}) lies outside the image ({_size(shape)})"
        )


def _located(
    table: BoxTable,
    shape: tuple[int, int],
    transform: Sequence[float],
    crs: str | None,
    item_crs: str | None,
    item_id: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The boxes without an image path that overlap the item (indices into ``table``) and
    their pixel coordinates ``(xmin, ymin, xmax, ymax)``."""
    candidates = table.by_location
    if not len(candidates):
        return candidates, np.zeros((0, 4))
    if _differ(crs, item_crs):
        # Narrow down in the boxes' CRS first: only the candidates are reprojected.
        bounds = _footprint(shape, transform)
        (left, bottom, right, top) = _reproject(np.array([bounds]), item_crs, crs, item_id)[0]
        near = table.coords[candidates]
        keep = (near[:, 0] < right) & (near[:, 2] > left)
        keep &= (near[:, 1] < top) & (near[:, 3] > bottom)
        candidates = candidates[keep]
    pixels = _to_pixels(
        _to_item_crs(table.coords[candidates], crs, item_crs, item_id), transform, item_id
    )
    boxes = np.clip(_pixel_boxes(pixels), 0, [shape[0], shape[1], shape[0], shape[1]])
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return candidates[inside], pixels[inside]


def _footprint(shape: tuple[int, int], transform: Sequence[float]) -> tuple[float, ...]:
    """The item's bounds ``(xmin, ymin, xmax, ymax)`` in its CRS."""
    a, _, c, _, e, f = (float(v) for v in transform[:6])
    xs, ys = (c, c + a * shape[1]), (f, f + e * shape[0])
    return (min(xs), min(ys), max(xs), max(ys))


def _differ(crs: str | None, item_crs: str | None) -> bool:
    """Whether boxes in ``crs`` need reprojecting to ``item_crs``."""
    if crs is None or item_crs is None:
        return False
    return _crs(crs) != _crs(item_crs)


@functools.lru_cache(maxsize=64)
def _crs(text: str) -> object:
    from rasterio.crs import CRS

    return CRS.from_user_input(text)


def _to_item_crs(
    coords: np.ndarray, crs: str | None, item_crs: str | None, item_id: str
) -> np.ndarray:
    if not len(coords) or not _differ(crs, item_crs):
        return coords
    return _reproject(coords, crs, item_crs, item_id)


def _reproject(coords: np.ndarray, src: str | None, dst: str | None, item_id: str) -> np.ndarray:
    """Boxes ``(xmin, ymin, xmax, ymax)`` in ``src`` to the bounds of their reprojection in
    ``dst``, each edge densified to :data:`DENSIFY` points."""
    from rasterio.warp import transform as warp

    t = np.linspace(0.0, 1.0, DENSIFY)
    x0, y0, x1, y1 = (coords[:, k, None] for k in range(4))
    ones = np.ones_like(t)
    xs = np.concatenate([x0 + (x1 - x0) * t, x1 * ones, x1 - (x1 - x0) * t, x0 * ones], axis=1)
    ys = np.concatenate([y0 * ones, y0 + (y1 - y0) * t, y1 * ones, y1 - (y1 - y0) * t], axis=1)
    out_x, out_y = warp(_crs(str(src)), _crs(str(dst)), xs.ravel(), ys.ravel())
    px = np.asarray(out_x, dtype=np.float64).reshape(xs.shape)
    py = np.asarray(out_y, dtype=np.float64).reshape(ys.shape)
    bad = ~(np.isfinite(px).all(axis=1) & np.isfinite(py).all(axis=1))
    if bad.any():
        xmin, ymin, xmax, ymax = (float(v) for v in coords[int(np.flatnonzero(bad)[0])])
        raise ValueError(
            f"item {item_id!r}: the box (xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, "
            f"ymax {ymax:g}) in {src} has no place in the item's CRS"
        )
    return np.stack([px.min(axis=1), py.min(axis=1), px.max(axis=1), py.max(axis=1)], axis=1)


def _check_size(table: BoxTable, picked: list[int], item_id: str, shape: tuple[int, ...]) -> None:
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
        if name == BY_LOCATION:
            continue  # matched by location: :func:`unlocated_rows`
        count = len(named.get(name, ()))
        if count != 1:
            what = "no item of the collection" if count == 0 else f"{count} items"
            problems.append(f"{table.path!r}: {len(rows)} box(es) for {name!r} match {what}")
    if len(problems) > 20:
        problems = [*problems[:20], f"... and {len(problems) - 20} more image paths"]
    return problems


def unlocated_rows(table: BoxTable, infos: Sequence[Any], crs: str | None) -> list[str]:
    """One line when boxes without an image path overlap none of the georeferenced items
    ``infos`` (:class:`~segflow.io.base.ItemInfo`), naming the first such rows; ``[]``
    otherwise. ``crs`` as in :func:`item_boxes`."""
    remaining = set(table.by_location.tolist())
    for info in infos:
        if not remaining:
            break
        if info.transform is None or len(info.spatial_shape) != 2:
            continue
        shape = (int(info.spatial_shape[0]), int(info.spatial_shape[1]))
        found, _ = _located(table, shape, info.transform, crs, info.crs_wkt, str(info.id))
        remaining.difference_update(found.tolist())
    if not remaining:
        return []
    first = ", ".join(str(table.rows[k]) for k in sorted(remaining)[:5])
    more = "" if len(remaining) <= 5 else ", ..."
    stated = crs or "each item's own CRS"
    return [
        f"{table.path!r}: {len(remaining)} box(es) without an image_path (rows {first}{more}) "
        f"overlap no georeferenced item of the collection (coordinates read in {stated}; "
        "a GeoJSON in longitude/latitude without a `crs` member needs `crs: EPSG:4326`)"
    ]


__all__ = [
    "CSV_COLUMNS",
    "DEPTH_COLUMNS",
    "BoxTable",
    "ItemBoxes",
    "item_boxes",
    "item_keys",
    "matches",
    "read_boxes",
    "unlocated_rows",
    "unmatched_rows",
]

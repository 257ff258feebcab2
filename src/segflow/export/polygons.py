"""Every object of an item's label array as one polygon, read from the store block by block.

Each block polygonises its own core in pixel-corner coordinates (``(col, row)`` of the
item: integers, exact in float64) with :func:`segflow.store.vectors.polygonize_block`,
and the pieces of objects cut by block faces are united per label
(:func:`segflow.store.vectors.merge_pieces`), as the ``output.vectors`` writer does: the
result is the same point set as polygonising the whole label image at once, with its
holes. Only one block of labels is in memory at a time; the polygons are kept (what an
annotation file holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow.errors import StoreError
from segflow.export.cog import windows
from segflow.export.stored import StoredItem, open_integer_array

# Rows and columns of labels read at once.
BLOCK = 2048


@dataclass(frozen=True)
class ItemPolygons:
    """The objects of one item: ``labels`` (ascending) and their ``geometries``
    (Polygon or MultiPolygon, pixel-corner coordinates, unsimplified)."""

    item: StoredItem
    labels: np.ndarray
    geometries: list[Any]


def item_polygons(item: StoredItem, array: str = "labels", *, block: int = BLOCK) -> ItemPolygons:
    """Polygonise ``item``'s 2-D ``array`` (instance labels, 0 background), ``block`` x
    ``block`` at a time.

    Raises
    ------
    StoreError
        When the item has no such array, or it is not a 2-D integer array.
    """
    from segflow.store.vectors import merge_pieces, polygonize_block

    source = open_integer_array(
        item, array, "polygons and classes are read from 2-D integer arrays"
    )
    height, width = source.shape
    done: list[tuple[np.ndarray, list[Any]]] = []
    cut: list[tuple[np.ndarray, list[Any]]] = []
    for rows, cols in windows((height, width), (block, block)):
        finished, shapes, crossing, pieces = polygonize_block(
            np.asarray(source[rows, cols]),
            offset=(rows.start, cols.start),
            inner_faces=(rows.start > 0, rows.stop < height, cols.start > 0, cols.stop < width),
        )
        done.append((finished, shapes))
        cut.append((crossing, pieces))
    cut_labels = np.concatenate([c[0] for c in cut]) if cut else np.zeros(0, np.int64)
    if len(cut_labels):
        done.append(merge_pieces(cut_labels, [p for c in cut for p in c[1]]))
    labels = np.concatenate([d[0] for d in done]).astype(np.int64) if done else np.zeros(0)
    geometries = [g for d in done for g in d[1]]
    order = np.argsort(labels, kind="stable")
    return ItemPolygons(item, labels[order], [geometries[i] for i in order])


def simplify(geometry: Any, tolerance: float) -> Any:
    """``geometry`` simplified to ``tolerance`` pixels (Douglas-Peucker, topology kept:
    rings stay valid and holes stay inside); 0 only drops collinear vertices."""
    import shapely

    return shapely.simplify(geometry, float(tolerance), preserve_topology=True)


def object_mask(geometry: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels of a pixel-corner geometry (a pixel is in when its centre is), in its
    bounding box, and the box's top-left pixel ``(row, col)``.

    Examples
    --------
    >>> import shapely
    >>> mask, corner = object_mask(shapely.box(1, 2, 4, 3))
    >>> mask.astype(int).tolist(), corner
    ([[1, 1, 1]], (2, 1))
    """
    from affine import Affine
    from rasterio.features import rasterize

    x0, y0, x1, y1 = (round(v) for v in geometry.bounds)
    mask = rasterize(
        [(geometry, 1)], out_shape=(y1 - y0, x1 - x0), transform=Affine.translation(x0, y0),
        dtype="uint8",
    )  # fmt: skip
    return mask.astype(bool), (y0, x0)


@dataclass(frozen=True)
class ObjectClasses:
    """Each object's class: ``classes[label]`` is the class id most of its pixels have in a
    class map (the smaller id on a tie); ``names`` maps class ids to names."""

    classes: dict[int, int]
    names: dict[int, str]


def object_classes(
    item: StoredItem, labels: str, classes: str, *, block: int = BLOCK
) -> ObjectClasses:
    """The majority class of every object of ``labels`` in the class map ``classes``,
    counted ``block`` x ``block`` at a time.

    Raises
    ------
    StoreError
        When an array is missing or not 2-D integer, or their shapes differ.
    """
    arrays = [
        open_integer_array(item, name, "polygons and classes are read from 2-D integer arrays")
        for name in (labels, classes)
    ]
    if arrays[0].shape != arrays[1].shape:
        raise StoreError(
            f"item {item.id!r}: class map {classes!r} {arrays[1].shape} and {labels!r} "
            f"{arrays[0].shape} differ in shape"
        )
    parts = [np.zeros((0, 3), np.int64)]
    for rows, cols in windows(arrays[0].shape, (block, block)):
        ids, values = (np.asarray(a[rows, cols]).ravel().astype(np.int64) for a in arrays)
        keep = ids != 0
        if keep.any():
            pairs, counts = np.unique(np.stack([ids[keep], values[keep]], 1), axis=0,
                                      return_counts=True)  # fmt: skip
            parts.append(np.column_stack([pairs, counts]))
    found = np.concatenate(parts)
    pairs, inverse = np.unique(found[:, :2], axis=0, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=found[:, 2])
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # label, most pixels, smaller id
    first = np.unique(pairs[order, 0], return_index=True)[1]
    chosen = pairs[order][first]
    attrs: dict[str, Any] = dict(arrays[1].attrs)  # a classify step's names, if any
    names = zip(attrs.get("flag_values") or [], attrs.get("class_names") or [], strict=False)
    return ObjectClasses(
        {int(k): int(v) for k, v in chosen.tolist()}, {int(k): str(v) for k, v in names}
    )

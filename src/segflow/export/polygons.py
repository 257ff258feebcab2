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
from segflow.export.stored import StoredItem

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
    import zarr

    from segflow.store.vectors import merge_pieces, polygonize_block

    if array not in item.arrays:
        raise StoreError(
            f"item {item.id!r}: no array {array!r} to export (it has {sorted(item.arrays)})"
        )
    source = zarr.open_array(item.store, path=item.array_path(array), mode="r")
    if source.ndim != 2 or not np.issubdtype(source.dtype, np.integer):
        raise StoreError(
            f"item {item.id!r}: array {array!r} is {source.ndim}-D {source.dtype}; polygons "
            "are made from 2-D label arrays"
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

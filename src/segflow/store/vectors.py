"""Object outlines beside the labels: ``STORE/ITEM_ID/vectors.parquet`` (GeoParquet).

One row per object of a 2-D labels item: ``label``, ``geometry`` (a Polygon or
MultiPolygon with its holes, in the item's CRS, or in its physical coordinates when it has
none) and, when the item has a region table, that table's columns.

Each block polygonises only its own core (``rasterio.features.shapes``) in *pixel-corner*
coordinates of the item: integers, exact in float64. Objects that touch no inner face of
the block are finished on the worker and written to a part; the pieces of the objects that
cross block faces (few: they live on faces) come back to the client, which unions them per
label. Pieces share their edges exactly (same integers on both sides of a face), so the
union has no seam and no sliver, and the result is the same point set as polygonising the
whole stitched label image at once; the collinear vertices a seam leaves are dropped
(``shapely.simplify`` with tolerance 0). Only then is the item's affine transform applied.
Memory per block stays that of its core, whatever the size of an object.

As for regions, parts are streamed into the single file, one row group per part, and the
parts removed. The file carries GeoParquet 1.1 ``geo`` metadata (WKB encoding, the CRS as
PROJJSON, or ``null`` without a CRS), so ``geopandas.read_parquet`` and QGIS open it.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.errors import PlanError
from segflow.faults import fault_point
from segflow.store.fs import fresh_fs

# The collection's folder lives in vector_dataset; its names stay importable from here.
from segflow.store.vector_dataset import COLLECTION_NAME, compact_vectors  # noqa: F401

if TYPE_CHECKING:
    import geopandas as gpd
    import pyarrow as pa

    from segflow.io.base import ItemInfo

VECTORS_NAME = "vectors.parquet"
PARTS_NAME = "vectors.parts"  # scratch folder, removed once the parts are joined
GEOPARQUET_VERSION = "1.1.0"
# Pixels of one object connected only through a corner are separate polygons (GDAL's
# 4-connected polygonisation): a polygon touching itself at a vertex would be invalid.
CONNECTIVITY = 4


def check_vectors(info: ItemInfo, out_kind: str) -> None:
    """Refuse ``output.vectors`` for an item it cannot apply to (callers name the item).

    Raises
    ------
    PlanError
        When the pipeline does not end in labels, or the item is not 2-D.
    """
    if out_kind != "labels":
        raise PlanError(
            f"`output.vectors` (true) needs a pipeline that ends in labels, this one gives "
            f"{out_kind}: set output.vectors: false or end the pipeline with a label step"
        )
    axes = info.spatial_axes
    if len(axes) != 2:
        raise PlanError(
            f"`output.vectors` (true) needs a 2-D item (y, x), this one has {len(axes)} "
            f"spatial axes {axes}: set output.vectors: false for volumes"
        )


def item_transform(info: ItemInfo) -> tuple[float, float, float, float, float, float]:
    """The item's pixel-corner to world affine in rasterio order ``(a, b, c, d, e, f)``.

    The georeferencing transform when the item has one, else the one its ``spacing`` and
    ``origin`` (the centre of the first pixel) describe; identity for plain pixel images.

    Examples
    --------
    >>> from segflow.io.base import ItemInfo
    >>> info = ItemInfo("a", "a.png", "png", (4, 6), "uint8", ("y", "x"), (2.0, 0.5), (1.0, 0.25))
    >>> item_transform(info)
    (0.5, 0.0, 0.0, 0.0, 2.0, 0.0)
    """
    if info.transform is not None:
        a, b, c, d, e, f = (float(v) for v in info.transform[:6])
        return (a, b, c, d, e, f)
    sy, sx = (float(s) for s in (info.spacing or (1.0, 1.0)))
    oy, ox = (float(o) for o in (info.origin or (0.0, 0.0)))
    return (sx, 0.0, ox - sx / 2, 0.0, sy, oy - sy / 2)


def crs_projjson(crs_wkt: str | None) -> dict[str, Any] | None:
    """The CRS as a PROJJSON object (GeoParquet's encoding), ``None`` without one."""
    if not crs_wkt:
        return None
    from rasterio.crs import CRS

    return dict(CRS.from_wkt(crs_wkt).to_dict(projjson=True))


class ParquetVectorsSink:
    """Writes parts of one item's vector table and joins them; picklable (paths, numbers)."""

    def __init__(
        self,
        store: str,
        item_id: str,
        *,
        transform: Sequence[float],
        crs_wkt: str | None,
    ) -> None:
        group = f"{str(store).rstrip('/')}/{item_id}"
        self.item_id = item_id
        self.path = f"{group}/{VECTORS_NAME}"
        self.parts = f"{group}/{PARTS_NAME}"
        self.transform = tuple(float(v) for v in transform)
        self.crs_wkt = crs_wkt

    def write(self, name: str, labels: np.ndarray, geometries: Sequence[Any]) -> None:
        """Write finished objects (pixel-corner coordinates) as part ``name``."""
        import fsspec
        import pyarrow.parquet as pq
        import shapely

        world = to_world(np.asarray(geometries, dtype=object), self.transform)
        types = sorted(set(shapely.get_type_id(world).tolist()))
        table = _table(labels, shapely.to_wkb(world)).replace_schema_metadata(
            {"segflow.geometry_types": json.dumps([_TYPE_NAMES[t] for t in types])}
        )
        with fsspec.open(f"{self.parts}/{name}.parquet", "wb", auto_mkdir=True) as handle:
            pq.write_table(table, handle)

    def join(self, *, regions: str | None = None) -> None:
        """Stream every part into ``vectors.parquet``, with the columns of the region table
        ``regions`` (a path) joined by label, and drop the parts (on the client)."""
        import fsspec
        import pyarrow.parquet as pq

        fs, parts = fresh_fs(self.parts)
        names = sorted(fs.glob(f"{parts}/*.parquet")) if fs.exists(parts) else []
        types: set[str] = set()
        for name in names:
            with fs.open(name, "rb") as part:
                metadata = pq.ParquetFile(part).schema_arrow.metadata or {}
            types.update(json.loads(metadata.get(b"segflow.geometry_types", b"[]")))
        properties = None
        if regions is not None:
            with fsspec.open(regions, "rb") as handle:
                properties = pq.ParquetFile(handle).read()
        try:
            with fsspec.open(self.path, "wb", auto_mkdir=True) as handle:
                writer = None
                tables = (_read_part(fs, name) for name in names)
                for table in tables if names else [_table(np.zeros(0, np.int64), [])]:
                    table = _join_properties(table, properties)
                    if writer is None:
                        schema = table.schema.with_metadata(self._metadata(sorted(types)))
                        writer = pq.ParquetWriter(handle, schema)
                    writer.write_table(table.cast(writer.schema))
                assert writer is not None
                writer.close()
            fault_point("vectors-joined")  # the table written, its parts not yet removed
        finally:
            if fs.exists(parts):
                fs.rm(parts, recursive=True)

    def _metadata(self, geometry_types: list[str]) -> dict[str, str]:
        geo = {
            "version": GEOPARQUET_VERSION,
            "primary_column": "geometry",
            "columns": {
                "geometry": {
                    "encoding": "WKB",
                    "geometry_types": geometry_types,
                    # An explicit null says "CRS unknown" (absent would mean OGC:CRS84).
                    "crs": crs_projjson(self.crs_wkt),
                }
            },
        }
        return {"geo": json.dumps(geo), "segflow.transform": json.dumps(self.transform)}

    def clear(self) -> None:
        """Remove an earlier run's table and parts (the item is being rewritten)."""

        for target in (self.path, self.parts):
            fs, path = fresh_fs(target)
            if fs.exists(path):
                fs.rm(path, recursive=True)


_SHAPES_LOCK = threading.Lock()
_TYPE_NAMES = {3: "Polygon", 6: "MultiPolygon", 7: "GeometryCollection"}


def _table(labels: np.ndarray, wkb: Iterable[bytes]) -> pa.Table:
    import pyarrow as pa

    return pa.table(
        {
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            "geometry": pa.array(list(wkb), type=pa.binary()),
        }
    )


def _read_part(fs: Any, name: str) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(name, "rb") as part:
        return pq.ParquetFile(part).read().replace_schema_metadata(None)


def _join_properties(table: pa.Table, properties: pa.Table | None) -> pa.Table:
    """``label, geometry`` then the region columns of the same labels, in label order."""
    if properties is not None:
        table = table.join(properties.replace_schema_metadata(None), "label", join_type="inner")
    return table.sort_by("label")


def to_world(geometries: Any, transform: Sequence[float]) -> Any:
    """Apply a rasterio-order affine ``(a, b, c, d, e, f)`` to pixel-corner geometries."""
    import shapely

    a, b, c, d, e, f = transform[:6]
    matrix = np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy @ matrix[:2, :2].T + matrix[:2, 2])

    return shapely.transform(geometries, apply)


def polygonize_block(
    labels: np.ndarray,
    *,
    offset: Sequence[int],
    inner_faces: Sequence[bool],
) -> tuple[np.ndarray, list[Any], np.ndarray, list[Any]]:
    """Polygonise the objects of one block's core, in item pixel-corner coordinates.

    Parameters
    ----------
    labels : ndarray
        The block's core of the stitched labels, ``(y, x)``; 0 is background.
    offset : (int, int)
        The core's first row and column in the item.
    inner_faces : (bool, bool, bool, bool)
        Whether the top, bottom, left and right faces of the core are inside the item (a
        neighbouring block is there).

    Returns
    -------
    tuple
        ``(labels, geometries)`` of the objects complete in the core, then ``(labels,
        pieces)`` of those that touch an inner face (to be united with their other pieces).

    Examples
    --------
    >>> block = np.array([[1, 1, 0], [0, 0, 2]])
    >>> done, shapes, cut, pieces = polygonize_block(block, offset=(0, 3),
    ...                                              inner_faces=(False, False, True, False))
    >>> done.tolist(), shapes[0].wkt
    ([2], 'POLYGON ((5 1, 5 2, 6 2, 6 1, 5 1))')
    >>> cut.tolist(), pieces[0].bounds
    ([1], (3.0, 0.0, 5.0, 1.0))
    """
    import shapely
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import shapes
    from rasterio.transform import Affine

    ids, local = np.unique(labels, return_inverse=True)
    local = local.reshape(labels.shape).astype(np.int32)  # shapes() takes int32, not int64
    parts: dict[int, list[Any]] = {}
    with _SHAPES_LOCK, warnings.catch_warnings():
        # shapes() wraps the array in an in-memory dataset, and with two threads calling it
        # at once (the local executor) that dataset's NotGeoreferencedWarning escaped now
        # and then, failing tests that turn warnings into errors. Warning filters are
        # process-wide, not per thread, so calls take turns and ignore that warning (the
        # transform applied is the one passed here).
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for geometry, value in shapes(
            local,
            mask=labels != 0,
            connectivity=CONNECTIVITY,
            transform=Affine.translation(float(offset[1]), float(offset[0])),
        ):
            parts.setdefault(int(value), []).append(shapely.geometry.shape(geometry))
    found = np.array(sorted(parts), dtype=np.int64)
    objects = ids[found].astype(np.int64)
    geometries = [_merge(parts[int(k)]) for k in found]
    edges = [labels[0], labels[-1], labels[:, 0], labels[:, -1]]  # top, bottom, left, right
    inner = [e for e, is_inner in zip(edges, inner_faces, strict=True) if is_inner]
    crossing = np.unique(np.concatenate(inner)) if inner else np.zeros(0, labels.dtype)
    cut = np.isin(objects, crossing)
    return (
        objects[~cut],
        [g for g, c in zip(geometries, cut, strict=True) if not c],
        objects[cut],
        [g for g, c in zip(geometries, cut, strict=True) if c],
    )


def _merge(parts: Sequence[Any]) -> Any:
    """One (Multi)Polygon from the polygons of one object (touching at most at edges)."""
    import shapely

    if len(parts) == 1:
        return parts[0]
    # Pixel-corner coordinates are integers: the union is exact; simplify(0) drops the
    # collinear vertices left where pieces met.
    return shapely.simplify(shapely.union_all(parts), 0.0)


def merge_pieces(labels: np.ndarray, pieces: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Unite the pieces of each object cut by block faces: one geometry per label."""
    order = np.argsort(labels, kind="stable")
    labels = np.asarray(labels)[order]
    ordered = [pieces[i] for i in order]
    unique, starts = np.unique(labels, return_index=True)
    bounds = [*starts.tolist(), len(labels)]
    return unique.astype(np.int64), [
        _merge(ordered[bounds[i] : bounds[i + 1]]) for i in range(len(unique))
    ]


def write_vectors(
    labels: Any,
    shape: Sequence[int],
    *,
    block_shape: Sequence[int],
    executor: Any,
    sink: ParquetVectorsSink,
    regions: str | None = None,
    progress: Any = None,
) -> None:
    """Polygonise a written 2-D label array blockwise into ``sink`` (see the module note).

    ``labels`` reads the stitched labels (a :class:`~segflow.store.layout.ZarrRegionWriter`,
    anything with ``read(region)``), ``executor`` runs one task per block of
    ``block_shape``; ``regions`` is the item's region table to join, if it has one.
    """
    import shapely

    sink.clear()  # a killed run's parts: this pass is never resumed halfway
    height, width = (int(n) for n in shape)
    step_y, step_x = (int(b) for b in block_shape)
    cores = [
        (slice(y, min(y + step_y, height)), slice(x, min(x + step_x, width)))
        for y in range(0, height, step_y)
        for x in range(0, width, step_x)
    ]
    handles = executor.map(vectorize_block, [labels] * len(cores), cores, shape=shape, sink=sink)
    results = executor.gather(handles, label="vectors", progress=progress)
    cut = [r for r in results if len(r[0])]
    if cut:
        objects, pieces = merge_pieces(
            np.concatenate([r[0] for r in cut]),
            shapely.from_wkb([w for r in cut for w in r[1]]).tolist(),
        )
        sink.write("faces", objects, pieces)
    sink.join(regions=regions)


def vectorize_block(
    labels: Any, core: tuple[slice, slice], *, shape: Sequence[int], sink: ParquetVectorsSink
) -> tuple[np.ndarray, list[bytes]]:
    """One block's task: write its complete objects, return the pieces of the cut ones
    (labels and WKB, pixel-corner coordinates)."""
    import shapely

    rows, cols = core
    block = np.asarray(labels.read(core))
    block = block.reshape(block.shape[-2:])
    done, geometries, cut, pieces = polygonize_block(
        block,
        offset=(rows.start, cols.start),
        inner_faces=(rows.start > 0, rows.stop < shape[0], cols.start > 0, cols.stop < shape[1]),
    )
    if len(done):
        sink.write(f"{rows.start}_{cols.start}", done, geometries)
    return cut, [bytes(w) for w in shapely.to_wkb(pieces)] if pieces else []


def read_vectors(store: str, item_ids: Sequence[str] | None = None) -> gpd.GeoDataFrame:
    """Vectors of one or more items of ``store`` as one GeoDataFrame (``item`` column first).

    ``item_ids`` default to every committed item that has a vector table. Items of different
    CRSs cannot share a frame: read them one at a time (``geopandas.read_parquet``).
    """
    import geopandas as gpd
    import pandas as pd

    from segflow.store.commit import read_commit
    from segflow.store.versions import resolve_item

    root = str(store).rstrip("/")
    fs, _ = fresh_fs(root)
    if item_ids is None:
        from segflow.store.metadata import item_groups

        # Item groups by name (a committed item is a link to its version: a glob of
        # STORE/*/vectors.parquet would not follow it), read in their latest versions.
        names = [i for i in item_groups(root) if read_commit(root, i)]  # not half-written
        paths = {i: resolve_item(root, i) for i in names}
        item_ids = [i for i in names if fs.exists(f"{paths[i]}/{VECTORS_NAME}")]
    frames = []
    for item_id in item_ids:
        frame = gpd.read_parquet(f"{resolve_item(root, item_id)}/{VECTORS_NAME}")
        frames.append(frame.assign(item=item_id)[["item", *frame.columns]])
    if not frames:
        return gpd.GeoDataFrame({"item": [], "label": []}, geometry=gpd.GeoSeries([]))
    crss = {str(f.crs) for f in frames}
    if len(crss) > 1:
        raise ValueError(
            f"items of {root!r} have {len(crss)} CRSs ({', '.join(sorted(crss))}): read them "
            "one CRS at a time with `item_ids`"
        )
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)

"""The collection catalogue: ``STORE/catalogue.parquet/``, one GeoParquet row per item.

A dataset directory of :data:`BUCKETS` part files (``part-XX.parquet``, an item's part from a
hash of its id), read whole by ``geopandas.read_parquet(STORE + "/catalogue.parquet")``,
``pandas.read_parquet`` or ``pyarrow.dataset``. Each row holds the item's index row (status,
error, fingerprint, config and model hashes, code version, object count, seconds), the
path of its group (``ITEM``, relative to the store; none while nothing is committed), when
it was committed and the version that commit made (:mod:`segflow.store.versions`), its
extent in its own units (``minx`` ... ``maxz``: CRS units for a georeferenced item,
physical units for a volume) and, for georeferenced items, its
footprint in longitude/latitude (``geometry``, OGC:CRS84, with GeoParquet's ``bbox``
covering column), so ``geopandas.read_parquet(..., bbox=(west, south, east, north))``
reads the items of a region only.

The catalogue is written when a run's records are compacted, for the items those records
name only: each touched part is read, its rows for those items replaced, and written aside
and renamed into place (one PUT on an object store). A run that touches one item rewrites
one part (1/256 of the rows), never the whole catalogue. Rows are derived from the index
and the committed groups; the index stays the record of truth. The STAC view of the
georeferenced items (``STORE/stac/``, :mod:`segflow.store.stac`) is written from the same
rows and parts, after them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from segflow.store.fs import fresh_fs
from segflow.store.names import CATALOGUE_NAME
from segflow.store.parts import BUCKETS, bucket_of, part_name, read_part_map, write_parts

__all__ = ["BUCKETS", "bucket_of", "part_name", "read_catalogue", "update_catalogue"]

GEOMETRY_CRS = "OGC:CRS84"  # longitude, latitude on WGS 84
# GeoParquet's names of shapely's geometry type ids (+8: with z), as geopandas writes them.
_TYPE_NAMES: tuple[str, ...] = ("Point", "LineString", "LineString", "Polygon", "MultiPoint")
_TYPE_NAMES += ("MultiLineString", "MultiPolygon", "GeometryCollection")
_GEOMETRY_TYPES = [*_TYPE_NAMES, *(f"{name} Z" for name in _TYPE_NAMES)]
_FLOAT = pd.Float64Dtype()
# Columns beside the index's core columns, with their dtypes.
EXTRA_COLUMNS: dict[str, Any] = {
    "path": pd.StringDtype(),
    "committed": pd.StringDtype(),
    "version": pd.StringDtype(),
    "crs": pd.StringDtype(),
    **{f"{side}{axis}": _FLOAT for axis in "xyz" for side in ("min", "max")},
}


def update_catalogue(store: str, rows: Iterable[Mapping[str, Any]], *, stac: Any = None) -> int:
    """Replace the catalogue rows of the items ``rows`` (index rows, one per item) name,
    reading each one's committed group for its path and extent; returns the parts written.
    Call while holding the store's lock.

    The new rows are encoded once (GeoParquet, with the ``bbox`` column); each touched part
    is then merged as Arrow tables, so a part costs its own rows only. ``stac``: the
    :class:`~segflow.store.stac.StacUpdate` of a compaction that folds its rows in chunks
    (this call writes its parts' STAC catalogues; the caller finishes it once, after the
    last chunk); without it the STAC view is finished here."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from segflow.store.metadata import read_node
    from segflow.store.stac import StacUpdate
    from segflow.store.versions import resolve_item

    rows = list(rows)
    if not rows:
        return 0
    own = stac is None
    stac, extents = StacUpdate(store) if own else stac, {}  # item id -> item_extent
    for row in rows:  # each group read once, for its catalogue row and its STAC Item
        item_id = str(row["id"])
        node = read_node(resolve_item(store, item_id))
        extents[item_id] = item_extent(store, item_id, node=node)
        stac.write_item(item_id, node, extents[item_id])
    buffer = io.BytesIO()
    frame = catalogue_frame(store, rows, extents=extents)
    frame.to_parquet(buffer, index=False, write_covering_bbox=True)
    fresh = pq.read_table(io.BytesIO(buffer.getvalue()))
    buckets = pa.array([bucket_of(str(i)) for i in fresh.column("id").to_pylist()], pa.int32())
    touched = sorted(set(buckets.to_pylist()))
    merged = {}
    for bucket, old in read_part_map(store, CATALOGUE_NAME, touched).items():
        part = fresh.filter(pc.equal(buckets, bucket))
        if old is not None:
            keep = old.filter(pc.invert(pc.is_in(old.column("id"), value_set=part.column("id"))))
            part = pa.concat_tables([part, keep], promote_options="permissive")
        merged[bucket] = with_part_geo(part.sort_by("id"))
    write_parts(store, CATALOGUE_NAME, merged)
    stac.add_parts(merged)  # the parts' STAC catalogues, after the parts
    if own:
        stac.finish({})  # the Collection
    return len(touched)


def with_part_geo(part: Any) -> Any:
    """``part`` (a catalogue part as a ``pyarrow.Table``) with GeoParquet's ``bbox`` and
    ``geometry_types`` of its own rows in its ``geo`` metadata (as geopandas writes them
    for a frame of those rows), whichever compaction brought each row."""
    import json

    import numpy as np
    import pyarrow.compute as pc
    import shapely

    meta = dict(part.schema.metadata or {})
    if b"geo" not in meta:
        return part
    geo = json.loads(meta[b"geo"])
    column = geo["columns"]["geometry"]
    shapes = shapely.from_wkb(part.column("geometry").to_numpy(zero_copy_only=False))
    kinds = shapely.get_type_id(shapes) + 8 * shapely.has_z(shapes)
    own: dict[str, Any] = {"geometry_types": sorted({_GEOMETRY_TYPES[k] for k in kinds if k >= 0})}
    if "bbox" in part.column_names:  # nulls (no footprint) as NaN, left out as geopandas does
        box = part.column("bbox").combine_chunks()
        sides = np.column_stack(
            [
                pc.struct_field(box, side).to_numpy(zero_copy_only=False).astype(float)
                for side in ("xmin", "ymin", "xmax", "ymax")
            ]
        )[~np.asarray(box.is_null())]
        sides = sides[np.isfinite(sides).all(axis=1)]
        if len(sides):
            own["bbox"] = [*sides[:, :2].min(axis=0).tolist(), *sides[:, 2:].max(axis=0).tolist()]
    # In geopandas' order: encoding, crs, geometry_types, bbox (where finite), covering.
    rest = {k: v for k, v in column.items() if k not in ("geometry_types", "bbox")}
    before = {k: v for k, v in rest.items() if k != "covering"}
    after = {k: v for k, v in rest.items() if k == "covering"}
    geo["columns"]["geometry"] = {**before, **own, **after}
    meta[b"geo"] = json.dumps(geo).encode()
    return part.replace_schema_metadata(meta)


def catalogue_frame(
    store: str, rows: Sequence[Mapping[str, Any]], *, extents: dict[str, Any] | None = None
) -> Any:
    """The catalogue rows of ``rows`` as a GeoDataFrame with the catalogue's columns
    (``extents``: item id -> its :func:`item_extent`, where known already; each is taken
    out of it as its row is made, so it is not held twice)."""
    import geopandas as gpd

    from segflow.store.index import COMMIT_COLUMNS, INDEX_COLUMNS

    # The commit stamps are the planner's, not the catalogue's (it has `committed`).
    columns = {k: v for k, v in INDEX_COLUMNS.items() if k not in COMMIT_COLUMNS}
    records, shapes = [], []
    for row in rows:
        item_id = str(row["id"])
        known = extents.pop(item_id, None) if extents is not None else None
        extra, shape = known if known is not None else item_extent(store, item_id)
        records.append({**{k: row.get(k) for k in columns}, **extra})
        shapes.append(shape)
    frame = pd.DataFrame(records, columns=[*columns, *EXTRA_COLUMNS])
    for name, dtype in {**columns, **EXTRA_COLUMNS}.items():
        frame[name] = frame[name].astype(dtype)
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(shapes, crs=GEOMETRY_CRS))


def item_extent(
    store: str, item_id: str, *, node: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    """The catalogue's columns read from ``STORE/ITEM``'s group (path, commit time, CRS,
    extent) and its footprint in lon/lat (None unless committed and georeferenced);
    ``node``: the group's ``zarr.json``, where read already."""
    from segflow.store.commit import COMMIT_ATTR
    from segflow.store.metadata import read_node
    from segflow.store.versions import resolve_item

    if node is None:
        node = read_node(resolve_item(store, item_id))
    node = node or {}
    attrs = node.get("attributes", {})
    commit = attrs.get(COMMIT_ATTR)
    if not isinstance(commit, dict):
        return {}, None
    out: dict[str, Any] = {
        "path": item_id,
        "committed": commit.get("committed"),
        "version": commit.get("version"),
    }
    bounds = _bounds(attrs)
    out.update(bounds)
    crs = attrs.get("crs")
    if not crs or "minx" not in bounds:
        return out, None
    out["crs"] = _crs_name(crs)
    box = (bounds["minx"], bounds["miny"], bounds["maxx"], bounds["maxy"])
    return out, footprint(crs, box)


def _bounds(attrs: Mapping[str, Any]) -> dict[str, float]:
    """``min``/``max`` per spatial axis: from the affine transform (2-D georeferenced), else
    from origin (first pixel's centre), spacing and shape, in the item's units."""
    shape = [int(n) for n in attrs.get("source_shape", [])]
    axes = list(attrs.get("source_axes", []))
    sizes = {a: n for a, n in zip(axes, shape, strict=False) if a in ("z", "y", "x")}
    transform = attrs.get("transform")
    if transform and "x" in sizes and "y" in sizes:
        a, b, c, d, e, f = (float(v) for v in transform[:6])
        w, h = sizes["x"], sizes["y"]
        xs = [c, a * w + c, b * h + c, a * w + b * h + c]
        ys = [f, d * w + f, e * h + f, d * w + e * h + f]
        return {"minx": min(xs), "maxx": max(xs), "miny": min(ys), "maxy": max(ys)}
    spatial = [a for a in axes if a in ("z", "y", "x")]
    spacing, origin = attrs.get("spacing") or [], attrs.get("origin") or []
    if len(spacing) != len(spatial) or len(origin) != len(spatial):
        return {}
    out = {}
    for axis, step, first in zip(spatial, spacing, origin, strict=True):
        ends = (first - step / 2, first + (sizes[axis] - 0.5) * step)
        out[f"min{axis}"], out[f"max{axis}"] = min(ends), max(ends)
    return out


@functools.lru_cache(maxsize=64)
def _to_lonlat(crs_wkt: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(crs_wkt, GEOMETRY_CRS, always_xy=True)


@functools.lru_cache(maxsize=64)
def _crs_name(crs_wkt: str) -> str:
    """``EPSG:32618`` where the CRS has an authority code, else its WKT."""
    from pyproj import CRS

    code = CRS.from_wkt(crs_wkt).to_authority()
    return f"{code[0]}:{code[1]}" if code else crs_wkt


def footprint(crs_wkt: str, box: tuple[float, float, float, float]) -> Any:
    """The polygon of ``box`` (in ``crs_wkt``) in lon/lat, its edges densified (21 points
    each) so a projected tile's curved outline is kept."""
    import numpy as np
    import shapely

    minx, miny, maxx, maxy = box
    t = np.linspace(0.0, 1.0, 21)[:-1]
    xs = np.concatenate([minx + (maxx - minx) * t, np.full(20, maxx)])
    ys = np.concatenate([np.full(20, miny), miny + (maxy - miny) * t])
    xs = np.concatenate([xs, maxx - (maxx - minx) * t, np.full(20, minx)])
    ys = np.concatenate([ys, np.full(20, maxy), maxy - (maxy - miny) * t])
    lon, lat = _to_lonlat(crs_wkt).transform(xs, ys)
    return shapely.Polygon(np.column_stack([lon, lat]))


def read_part(store: str, bucket: int) -> Any | None:
    """One part of the catalogue as a GeoDataFrame, or None when it has none."""
    import geopandas as gpd

    fs, path = fresh_fs(f"{str(store).rstrip('/')}/{CATALOGUE_NAME}/{part_name(bucket)}")
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        frame = gpd.read_parquet(handle)
    return frame.drop(columns=["bbox"], errors="ignore")


def read_catalogue(
    store: str,
    *,
    bbox: tuple[float, float, float, float] | None = None,
    columns: Sequence[str] | None = None,
) -> Any:
    """The catalogue of ``store`` as a GeoDataFrame (empty, with its columns, when it has
    none); with ``bbox`` (west, south, east, north in degrees) the georeferenced items whose
    footprint meets it, read through the parts' ``bbox`` column."""
    import geopandas as gpd

    fs, path = fresh_fs(f"{str(store).rstrip('/')}/{CATALOGUE_NAME}")
    if not fs.isdir(path) or not fs.glob(f"{path}/part-*.parquet"):
        return catalogue_frame(store, [])
    read_columns = None if columns is None else [*columns, "geometry"]
    frame = gpd.read_parquet(path, bbox=bbox, columns=read_columns, filesystem=fs)
    frame = frame.drop(columns=["bbox"], errors="ignore")
    return frame.sort_values("id", ignore_index=True)

"""The STAC view of a georeferenced store: ``STORE/stac/``, one STAC Item per item.

Written beside the catalogue (:mod:`segflow.store.catalogue`), from the same rows, when a
run's records are compacted, so STAC browsers and clients (``pystac``) find the outputs:

- ``stac/collection.json``: a STAC 1.1 Collection, its spatial extent (lon/lat) and
  temporal extent (commit times) over every georeferenced item; its ``child`` links name
  one catalogue per hash part of the items (the catalogue's :data:`~segflow.store.parts.
  BUCKETS` parts), and ``segflow:parts`` keeps each part's extent;
- ``stac/parts/part-XX.json``: a STAC Catalog whose ``item`` links name that part's Items;
- ``stac/items/ITEM.json``: the Item of ``ITEM``: its footprint in lon/lat (geometry and
  bbox), its commit time (``datetime``), the projection extension's fields (``proj:code``,
  or ``proj:wkt2`` for a CRS without an EPSG code; ``proj:transform``, ``proj:shape``,
  ``proj:bbox``), and assets for the item's Zarr group, each array it committed, its
  OME-Zarr label pyramids, and its ``vectors.parquet``, ``regions.parquet`` and
  ``quicklook.png`` where present.

A run rewrites the Items of the items its records name, their parts' catalogues and the
Collection (whose extent is the union of the parts' extents it keeps): never every Item.
Asset hrefs are relative (``../../ITEM/labels``) and point at ``STORE/ITEM``, the item's
latest version, as the Item itself describes the latest commit (``segflow:version`` names
it). Items that are not georeferenced get no STAC Item (STAC needs a footprint on Earth);
a store without any has no ``stac/`` folder. A store whose catalogue predates this view
gets every Item at its next compaction (``.segflow/stac.json`` records that it is whole).
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from segflow.store.fs import fresh_fs
from segflow.store.lock import bookkeeping_path, is_local, local_path
from segflow.store.names import CATALOGUE_NAME, STAC_DIR

STAC_VERSION = "1.1.0"
PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
ZARR_TYPE = "application/vnd.zarr"
PARQUET_TYPE = "application/vnd.apache.parquet"
COLLECTION_FILE = "collection.json"
ITEMS_DIR = "items"
PARTS_DIR = "parts"
PARTS_KEY = "segflow:parts"  # the Collection's record of each part's extent
MARKER = "stac.json"  # in STORE/.segflow: the STAC view covers every item
_JSON = "application/json"
# Files an item group may hold beside its arrays: asset key, roles, media type, title.
_FILES = {
    "vectors.parquet": ("vectors", ["data"], PARQUET_TYPE, "object polygons (GeoParquet)"),
    "regions.parquet": ("regions", ["metadata"], PARQUET_TYPE, "region properties per object"),
    "quicklook.png": ("thumbnail", ["thumbnail"], "image/png", "quick look"),
}


class StacUpdate:
    """One compaction's update of ``STORE/stac/`` (call while holding the store's lock):
    :meth:`write_item` for each item its records name, as its group is read,
    :meth:`add_parts` with the catalogue's parts just written (once per chunk of parts),
    then :meth:`finish`. Items and parts are written as they come, and only each part's
    extent is kept, so memory does not grow with the number of items a compaction folds."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.collection = _read(_url(store, COLLECTION_FILE)) or {}
        self.whole = _read(bookkeeping_path(store, MARKER))
        self.cid = str(self.collection.get("id") or _collection_id(store))
        self.stale = _exists(_url(store))  # a store without stac/ has nothing to remove
        whole = self.whole
        self.rebuild = whole is None or bool(whole.get("collection") and not self.collection)
        self.written: set[str] = set()  # with `rebuild`: the Items written already
        self.kept = dict(self.collection.get(PARTS_KEY) or {})  # part key -> bbox, interval
        self.parts: set[int] = set()  # the parts given to add_parts

    def write_item(self, item_id: str, node: Any, extent: Any = None) -> None:
        """Write the Item of ``item_id`` (its group's ``node``; ``extent``: its
        :func:`~segflow.store.catalogue.item_extent` where known), or remove it when the
        item is not committed and georeferenced."""
        item = stac_item(self.store, item_id, node, collection_id=self.cid, extent=extent)
        if item is not None:
            _write(_url(self.store, ITEMS_DIR, f"{item_id}.json"), item)
        elif self.stale:
            _remove(_url(self.store, ITEMS_DIR, f"{item_id}.json"))
        if self.rebuild:
            self.written.add(item_id)

    def add_parts(self, parts: Mapping[int, Any]) -> None:
        """Write the catalogues of ``parts`` (bucket -> the catalogue part just written, a
        ``pyarrow.Table``), keeping their extents for the Collection."""
        self.parts.update(parts)
        self._write_parts({bucket: part_extent(table) for bucket, table in parts.items()})

    def _write_parts(self, extents: Mapping[int, Any]) -> None:
        for bucket, extent in sorted(extents.items()):
            key = f"{bucket:02x}"
            if extent is not None:
                self.kept[key] = {"bbox": extent["bbox"], "interval": extent["interval"]}
                catalog = part_catalog(self.cid, key, extent["ids"])
                _write(_url(self.store, PARTS_DIR, f"part-{key}.json"), catalog)
            elif self.kept.pop(key, None) is not None or self.stale:
                _remove(_url(self.store, PARTS_DIR, f"part-{key}.json"))

    def finish(self, parts: Mapping[int, Any]) -> None:
        """Write the catalogues of ``parts`` (:meth:`add_parts`), the Collection and the
        marker; first, for an older store (or one whose ``stac/`` was removed), the Items of
        every part not added."""
        self.add_parts(parts)
        if self.rebuild:
            self._write_parts(self._other_parts(self.parts))
        kept = self.kept
        if kept:
            _write(_url(self.store, COLLECTION_FILE), collection_json(self.store, self.cid, kept))
        elif self.stale:
            _remove(_url(self.store, COLLECTION_FILE))
        if self.whole != {"collection": bool(kept)}:
            _write(bookkeeping_path(self.store, MARKER), {"collection": bool(kept)})

    def _other_parts(self, done: set[int]) -> dict[int, Any]:
        """The :func:`part_extent` of each catalogue part not in ``done``, each of its
        georeferenced items given its Item (one part in memory at a time)."""
        from segflow.store.metadata import read_node
        from segflow.store.parts import part_buckets, read_part
        from segflow.store.versions import resolve_item

        extents = {}
        for bucket in part_buckets(self.store, CATALOGUE_NAME):
            if bucket in done:
                continue
            extents[bucket] = extent = part_extent(read_part(self.store, CATALOGUE_NAME, bucket))
            for item_id in (extent or {}).get("ids", []):
                if item_id not in self.written:
                    node = read_node(resolve_item(self.store, item_id))
                    self.write_item(item_id, node)
        return extents


def stac_item(
    store: str, item_id: str, node: Any, *, collection_id: str, extent: Any = None
) -> dict[str, Any] | None:
    """The STAC Item of a committed georeferenced item (its group's ``node``), or None
    (``extent``: the item's :func:`~segflow.store.catalogue.item_extent`, where known)."""
    import shapely

    from segflow.store.catalogue import item_extent
    from segflow.store.commit import COMMIT_ATTR

    if not node:
        return None
    extra, footprint = extent if extent is not None else item_extent(store, item_id, node=node)
    if footprint is None:
        return None
    attrs = node.get("attributes", {})
    commit = attrs[COMMIT_ATTR]
    code, wkt2 = _crs_fields(str(attrs["crs"]))
    properties: dict[str, Any] = {
        "datetime": stac_time(commit.get("committed")),
        "proj:code": code,
        **({} if code else {"proj:wkt2": wkt2}),
        "proj:bbox": [extra["minx"], extra["miny"], extra["maxx"], extra["maxy"]],
        **_grid(attrs),
        "segflow:version": commit.get("version"),
        "segflow:object_count": commit.get("object_count"),
    }
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [PROJECTION],
        "id": item_id,
        "collection": collection_id,
        "geometry": {
            "type": "Polygon",
            "coordinates": [shapely.get_coordinates(footprint).tolist()],
        },
        "bbox": list(footprint.bounds),
        "properties": properties,
        "links": _item_links(item_id),
        "assets": item_assets(store, item_id, node),
    }


def item_assets(store: str, item_id: str, node: Mapping[str, Any]) -> dict[str, Any]:
    """The Item's assets: the item's Zarr group (``zarr``), each committed array, each
    OME-Zarr label pyramid group, and the tables and quick look the group holds."""
    from segflow.store.commit import COMMIT_ATTR

    attrs = node.get("attributes", {})
    arrays = dict(attrs.get(COMMIT_ATTR, {}).get("arrays") or {})
    group = {"href": _href(item_id), "type": ZARR_TYPE, "roles": ["data"]}
    assets: dict[str, Any] = {
        "zarr": {**group, "title": "item group: xarray.open_zarr(href)"},
    }
    for name, dtype in sorted(arrays.items()):
        title = f"Zarr array {name} ({dtype})"
        assets[name] = {"href": _href(item_id, name), "type": ZARR_TYPE, "roles": ["data"]}
        assets[name]["title"] = title
    for name in (attrs.get("ome") or {}).get("labels") or []:
        assets[str(name)] = {
            "href": _href(item_id, str(name)),
            "type": ZARR_TYPE,
            "roles": ["overview"],
            "title": f"OME-Zarr multiscale labels {name}",
        }
    folder = f"{str(store).rstrip('/')}/{item_id}"
    for file, (key, roles, media, title) in _FILES.items():
        if _exists(f"{folder}/{file}"):
            assets[key] = {"href": _href(item_id, file), "type": media, "roles": roles}
            assets[key]["title"] = title
    return assets


def part_extent(table: Any) -> dict[str, Any] | None:
    """A catalogue part's georeferenced items: their ids, the union of their lon/lat
    boxes and the span of their commit times; None when it has none."""
    import pyarrow.compute as pc

    if table is None or "geometry" not in table.column_names:
        return None
    geo = table.filter(pc.invert(pc.is_null(table.column("geometry"))))
    if geo.num_rows == 0:
        return None
    lows, highs = _box_of(geo)
    times = sorted(filter(None, map(stac_time, geo.column("committed").to_pylist())))
    return {
        "ids": sorted(str(i) for i in geo.column("id").to_pylist()),
        "bbox": [*lows, *highs],
        "interval": [times[0], times[-1]] if times else [None, None],
    }


def _box_of(geo: Any) -> tuple[list[float], list[float]]:
    """The (west, south) and (east, north) of a part's footprints: from its GeoParquet
    ``bbox`` column, or from the geometries where a part has none."""
    import numpy as np
    import pyarrow.compute as pc
    import shapely

    if "bbox" in geo.column_names:
        box = geo.column("bbox")
        sides = [pc.struct_field(box, side) for side in ("xmin", "ymin", "xmax", "ymax")]
        return [pc.min(s).as_py() for s in sides[:2]], [pc.max(s).as_py() for s in sides[2:]]
    bounds = shapely.bounds(shapely.from_wkb(geo.column("geometry").to_numpy(False)))
    return bounds[:, :2].min(axis=0).tolist(), np.max(bounds[:, 2:], axis=0).tolist()


def stac_time(text: Any) -> str | None:
    """A commit time (ISO 8601) in STAC's UTC form, ``2026-12-07T14:01:30Z``.

    Examples
    --------
    >>> stac_time("2026-12-07T15:01:30+01:00")
    '2026-12-07T14:01:30Z'
    """
    import datetime as dt

    if not text:
        return None
    when = dt.datetime.fromisoformat(str(text))
    when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    return when.isoformat().replace("+00:00", "Z")


def collection_json(store: str, cid: str, extents: Mapping[str, Any]) -> dict[str, Any]:
    """The Collection over the parts' ``extents`` (part key -> bbox and interval)."""
    boxes = [e["bbox"] for e in extents.values()]
    starts = [e["interval"][0] for e in extents.values() if e["interval"][0]]
    ends = [e["interval"][1] for e in extents.values() if e["interval"][1]]
    children = [
        {"rel": "child", "href": f"./{PARTS_DIR}/part-{key}.json", "type": _JSON}
        for key in sorted(extents)
    ]
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": cid,
        "title": cid,
        "description": f"segflow outputs of the store {_store_name(store)}: one Item per "
        "georeferenced item (its labels' Zarr arrays, tables and footprint)",
        "license": "other",
        "extent": {
            "spatial": {
                "bbox": [
                    [
                        min(b[0] for b in boxes),
                        min(b[1] for b in boxes),
                        max(b[2] for b in boxes),
                        max(b[3] for b in boxes),
                    ]
                ]
            },
            "temporal": {"interval": [[min(starts, default=None), max(ends, default=None)]]},
        },
        "links": [{"rel": "root", "href": f"./{COLLECTION_FILE}", "type": _JSON}, *children],
        PARTS_KEY: {key: extents[key] for key in sorted(extents)},
    }


def part_catalog(cid: str, key: str, ids: list[str]) -> dict[str, Any]:
    """The Catalog of one part: a link to each of its Items."""
    up = f"../{COLLECTION_FILE}"
    return {
        "type": "Catalog",
        "stac_version": STAC_VERSION,
        "id": f"{cid}-part-{key}",
        "description": f"the Items of the items whose ids hash to part {key}",
        "links": [
            {"rel": "root", "href": up, "type": _JSON},
            {"rel": "parent", "href": up, "type": _JSON},
            *(
                {"rel": "item", "href": f"../{ITEMS_DIR}/{i}.json", "type": "application/geo+json"}
                for i in ids
            ),
        ],
    }


def _item_links(item_id: str) -> list[dict[str, str]]:
    from segflow.store.parts import bucket_of

    depth = "../" * (item_id.count("/") + 1)
    up = f"{depth}{COLLECTION_FILE}"
    parent = f"{depth}{PARTS_DIR}/part-{bucket_of(item_id):02x}.json"
    return [
        {"rel": "root", "href": up, "type": _JSON},
        {"rel": "parent", "href": parent, "type": _JSON},
        {"rel": "collection", "href": up, "type": _JSON},
    ]


def _href(item_id: str, *inside: str) -> str:
    """``STORE/ITEM[/INSIDE]`` relative to the Item's file ``STORE/stac/items/ITEM.json``."""
    here = posixpath.dirname(posixpath.join(STAC_DIR, ITEMS_DIR, f"{item_id}.json"))
    return posixpath.relpath(posixpath.join(item_id, *inside), here)


def _grid(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``proj:shape`` (rows, columns) and ``proj:transform`` (the affine's six numbers,
    GDAL's order: pixel to CRS), where the item's metadata has them."""
    sizes = dict(zip(attrs.get("source_axes", []), attrs.get("source_shape", []), strict=False))
    out: dict[str, Any] = {}
    if "y" in sizes and "x" in sizes:
        out["proj:shape"] = [int(sizes["y"]), int(sizes["x"])]
    if attrs.get("transform"):
        out["proj:transform"] = [float(v) for v in attrs["transform"][:6]]
    return out


@functools.lru_cache(maxsize=64)
def _crs_fields(crs_wkt: str) -> tuple[str | None, str]:
    """``proj:code`` (``EPSG:32618``, None without an authority code) and the WKT2."""
    from pyproj import CRS

    crs = CRS.from_wkt(crs_wkt)
    code = crs.to_authority()
    return (f"{code[0]}:{code[1]}" if code else None), crs.to_wkt()


def _collection_id(store: str) -> str:
    name = _store_name(store)
    return name[: -len(".zarr")] if name.endswith(".zarr") and len(name) > 5 else name


def _store_name(store: str) -> str:
    return str(store).rstrip("/").rsplit("/", 1)[-1]


def _url(store: str, *parts: str) -> str:
    return "/".join([str(store).rstrip("/"), STAC_DIR, *parts])


def _read(url: str) -> dict[str, Any] | None:
    from segflow.store.commit import _read_json

    return _read_json(url)


def _write(url: str, value: Mapping[str, Any]) -> None:
    from segflow.store.metadata import write_json

    write_json(url, value, indent=None)  # compact: an Item's footprint has 81 points


def _exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = fresh_fs(url)
    return bool(fs.exists(path))


def _remove(url: str) -> None:
    if is_local(url):
        try:
            os.remove(local_path(url))
        except FileNotFoundError:
            pass
        return
    fs, path = fresh_fs(url)
    if fs.exists(path):
        fs.rm_file(path)

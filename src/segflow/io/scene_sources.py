"""Tile lists of a scene given as one file: a GDAL VRT or a STAC catalogue.

``input.path`` of a scene (``input.mosaic``) is usually a folder or a glob of tiles. It may
also name

* a GDAL ``.vrt`` (``gdalbuildvrt``'s output): its sources are the tiles, in the order the
  VRT lists them first. The scene is built from the tiles' own georeferencing as for a glob
  (``input.mosaic``'s overlap rule, nodata, CRS and resolution apply; the VRT's own
  resolution, nodata and source windows do not);
* a STAC ``.json``: an ItemCollection (a GeoJSON FeatureCollection of Items), one Item, or
  a static Catalog or Collection whose ``item`` and ``child`` links are followed. Each Item
  gives one tile, the asset ``input.mosaic.asset`` names (default: the one GeoTIFF asset
  the Items have), in catalogue order.

Relative paths and hrefs are relative to the file that holds them. Files are read through
fsspec, so a catalogue on object storage works like a local one. Each tile is fingerprinted
as any tile is, so a changed tile, or a tile added to or removed from the list, redoes the
scene.
"""

from __future__ import annotations

import json
import os
import posixpath
import xml.etree.ElementTree as ElementTree
from typing import Any

import fsspec

from segflow.errors import ItemReadError

GEOTIFF_TYPES = ("image/tiff", "image/geotiff", "image/vnd.stac.geotiff")
VSI_PREFIXES = {"/vsicurl/": "", "/vsis3/": "s3://", "/vsigs/": "gs://", "/vsiaz/": "az://"}


def is_scene_file(path: str) -> bool:
    """Whether ``path`` names a VRT or a STAC JSON rather than tiles."""
    return path.lower().endswith((".vrt", ".json"))


def scene_file_tiles(path: str, asset: str | None) -> list[str]:
    """The tile paths a VRT or STAC file lists (see the module note)."""
    if path.lower().endswith(".vrt"):
        return vrt_sources(path)
    return stac_tiles(path, asset)


def vrt_sources(path: str) -> list[str]:
    """The source files of a VRT, in order of first mention, as paths or URLs."""
    try:
        root = ElementTree.fromstring(_read_text(path))
    except ElementTree.ParseError as error:
        raise ItemReadError(f"scene '{path}': not a readable VRT ({error})") from None
    if root.tag != "VRTDataset":
        raise ItemReadError(f"scene '{path}': not a VRT (its root is <{root.tag}>)")
    sources: list[str] = []
    for element in root.iter("SourceFilename"):
        name = (element.text or "").strip()
        source = _vsi_to_url(path, name)
        if element.get("relativeToVRT") == "1":
            source = _join(path, source)
        if source.lower().endswith(".vrt"):
            raise ItemReadError(
                f"scene '{path}': source '{name}' is a VRT itself: list its tiles in one VRT"
            )
        if source not in sources:
            sources.append(source)
    if not sources:
        raise ItemReadError(f"scene '{path}': the VRT names no source files")
    return sources


def stac_tiles(path: str, asset: str | None) -> list[str]:
    """One tile per STAC Item reachable from ``path``: its ``asset``'s href."""
    items = list(_stac_items(path, _read_json(path), set()))
    if not items:
        raise ItemReadError(f"scene '{path}': the STAC file holds or links no Items")
    key = asset if asset is not None else _default_asset(path, items)
    tiles = []
    for base, item in items:
        assets = item.get("assets") or {}
        if key not in assets:
            raise ItemReadError(
                f"scene '{path}': STAC Item '{item.get('id', '?')}' has no asset '{key}' "
                f"(`input.mosaic.asset`; it has: {', '.join(sorted(assets)) or 'none'})"
            )
        tiles.append(_join(base, str(assets[key]["href"])))
    return tiles


def _stac_items(base: str, document: Any, seen: set[str]) -> Any:
    """``(where its hrefs are relative to, Item)`` for each Item, following links."""
    if not isinstance(document, dict):
        raise ItemReadError(f"scene '{base}': not a STAC document (a JSON object)")
    kind = document.get("type")
    if kind == "Feature":
        yield base, document
    elif kind == "FeatureCollection":
        for feature in document.get("features", []):
            yield base, feature
    elif kind in ("Catalog", "Collection"):
        for link in document.get("links", []):
            if link.get("rel") not in ("item", "child"):
                continue
            target = _join(base, str(link["href"]))
            if target in seen:
                continue
            seen.add(target)
            yield from _stac_items(target, _read_json(target), seen)
    else:
        raise ItemReadError(
            f"scene '{base}': STAC type {kind!r} is none of Feature, FeatureCollection, "
            "Catalog, Collection"
        )


def _default_asset(path: str, items: list[tuple[str, dict]]) -> str:
    """The one asset key whose media type is GeoTIFF in every Item."""
    keys: set[str] | None = None
    for _, item in items:
        tiffs = {
            key
            for key, value in (item.get("assets") or {}).items()
            if str(value.get("type", "")).split(";")[0].strip() in GEOTIFF_TYPES
        }
        keys = tiffs if keys is None else keys & tiffs
    if keys is not None and len(keys) == 1:
        return next(iter(keys))
    found = ", ".join(sorted(keys or ())) or "none"
    raise ItemReadError(
        f"scene '{path}': set `input.mosaic.asset` to the asset that is the tile "
        f"(GeoTIFF assets every Item has: {found})"
    )


def _vsi_to_url(path: str, name: str) -> str:
    for prefix, scheme in VSI_PREFIXES.items():
        if name.startswith(prefix):
            return scheme + name[len(prefix) :]
    if name.startswith("/vsi"):
        raise ItemReadError(f"scene '{path}': source '{name}' is a GDAL path segflow cannot open")
    return name


def _join(base: str, href: str) -> str:
    """``href`` relative to the file ``base`` (absolute paths and URLs as they are)."""
    if "://" in href or href.startswith("/"):
        return href
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), href))}"
    return os.path.normpath(os.path.join(os.path.dirname(base), href))


def _read_text(path: str) -> str:
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as handle:
            return str(handle.read())
    except OSError as error:
        raise ItemReadError(f"scene '{path}': cannot be read ({error})") from None


def _read_json(path: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ItemReadError(f"scene '{path}': not JSON ({error})") from None

"""Consolidated metadata per item: ``STORE/ITEM/zarr.json`` describes the whole item.

Each committed item group carries Zarr's consolidated metadata for its own nodes (arrays,
coordinates, the OME-Zarr pyramid groups), written with its commit record in one replace of
its ``zarr.json``. The store's root ``zarr.json`` holds only segflow's marker, so it stays a
few hundred bytes at any number of items, and opening one item reads that item's metadata
only: ``xarray.open_zarr(f"{store}/{item}")`` one file, ``xarray.open_zarr(store,
group=item, consolidated=False)`` the item's nodes.

Stores written by segflow before this layout (the whole store consolidated into the root
``zarr.json``) stay readable as they are; their next run moves the metadata into the item
groups (:func:`migrate_store`) and says so in its log.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from segflow.store.fs import fresh_fs
from segflow.store.lock import is_local, local_path
from segflow.store.names import ZARR_JSON, is_reserved_name

# segflow's marker key for the metadata layout, and its value for "consolidated per item"
LAYOUT_KEY = "metadata"
LAYOUT = "per-item"


def read_node(url: str) -> dict[str, Any] | None:
    """The ``zarr.json`` under ``url`` (a node's folder) as a dict, or None when absent."""
    from segflow.store.commit import _read_json

    return _read_json(f"{str(url).rstrip('/')}/{ZARR_JSON}")


def write_node(url: str, node: Mapping[str, Any]) -> None:
    """Replace the ``zarr.json`` under ``url``: locally written aside and renamed into place,
    on an object store one PUT, so a reader sees the old file or the new one."""
    write_json(f"{str(url).rstrip('/')}/{ZARR_JSON}", node)


def write_json(url: str, value: Mapping[str, Any], *, indent: int | None = 2) -> None:
    """Replace the JSON file ``url``: locally written aside and renamed into place (its
    folder made when missing), on an object store one PUT. ``indent=None``: compact."""
    compact = (",", ":") if indent is None else None
    data = json.dumps(value, indent=indent, separators=compact).encode()
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Each writer its own file aside: items committing at once in one run write their
        # run's run.json together, and a shared name let one rename the other's away.
        aside = f"{path}.segflow-tmp.{os.getpid()}.{threading.get_ident()}"
        with open(aside, "wb") as handle:
            handle.write(data)
        os.replace(aside, path)
        return
    fs, path = fresh_fs(url)
    fs.pipe_file(path, data)


def item_entries(root: str, item_id: str) -> dict[str, Any]:
    """The consolidated entries of ``ROOT/ITEM``, as zarr's ``consolidate_metadata(...,
    path=ITEM)`` writes them: every node below the group by its path relative to it, a
    subgroup's with an empty inline ``consolidated_metadata``. Arrays are not walked into."""
    fs, base = fresh_fs(f"{str(root).rstrip('/')}/{item_id}")
    entries: dict[str, Any] = {}

    def visit(path: str, key: str) -> None:
        for child in fs.ls(path, detail=True):
            if child["type"] != "directory":
                continue
            name = child["name"].rstrip("/").rsplit("/", 1)[-1]
            try:
                node = json.loads(fs.cat_file(f"{child['name'].rstrip('/')}/{ZARR_JSON}"))
            except (FileNotFoundError, NotADirectoryError):
                continue  # not a Zarr node
            entries[f"{key}{name}"] = node
            if node.get("node_type") == "group":
                node["consolidated_metadata"] = inline({})
                visit(child["name"].rstrip("/"), f"{key}{name}/")

    visit(base.rstrip("/"), "")
    return dict(sorted(entries.items()))


def inline(metadata: dict[str, Any]) -> dict[str, Any]:
    """Zarr v3's inline consolidated metadata block."""
    return {"kind": "inline", "must_understand": False, "metadata": metadata}


def consolidate_item(
    root: str, item_id: str, *, attributes: Mapping[str, Any] | None = None
) -> None:
    """Write ``ROOT/ITEM/zarr.json`` with the item's consolidated metadata (and
    ``attributes`` merged into the group's), in one replace of the file."""
    node = read_node(f"{str(root).rstrip('/')}/{item_id}")
    if node is None:
        raise FileNotFoundError(f"item '{item_id}': no group at {root}/{item_id}")
    node["attributes"] = {**node.get("attributes", {}), **dict(attributes or {})}
    node["consolidated_metadata"] = inline(item_entries(root, item_id))
    write_node(f"{str(root).rstrip('/')}/{item_id}", node)


def drop_consolidated(url: str) -> None:
    """Remove the consolidated metadata of the node at ``url`` (it would go stale as nodes
    are added under it); nothing when it has none."""
    node = read_node(url)
    if node is not None and node.get("consolidated_metadata") is not None:
        del node["consolidated_metadata"]
        write_node(url, node)


def item_groups(store: str) -> list[str]:
    """The ids of the groups at the store's root (not its own files and folders); on an
    object store also the items with versions, which have no group at the root when the
    store keeps no plain copy (``output.plain_copy: false``). Callers check each is
    committed (:func:`segflow.store.commit.read_commit`)."""
    fs, path = fresh_fs(str(store))
    names = {c["name"].rstrip("/").rsplit("/", 1)[-1] for c in fs.ls(path, detail=True)}
    if not is_local(store):
        from segflow.store.pointers import versioned_items

        names |= set(versioned_items(store))
    return sorted(n for n in names if not is_reserved_name(n) and not n.startswith("."))


def is_migrated(store: str) -> bool:
    """Whether the store's marker says its metadata is consolidated per item."""
    root = read_node(store) or {}
    marker = root.get("attributes", {}).get("segflow", {})
    return isinstance(marker, dict) and marker.get(LAYOUT_KEY) == LAYOUT


def migrate_store(store: str, items: Iterable[str] | None = None) -> str | None:
    """Move an older store to consolidated metadata per item: consolidate every item group
    that lacks its own (``items``, or every group), then drop the root's consolidated copy
    and mark the root. Call while holding the store's lock. Returns a line saying what was
    done (for the run's log), or None when the store was migrated already."""
    if is_migrated(store):
        return None
    groups = item_groups(store) if items is None else list(items)
    moved = 0
    from segflow.store.versions import resolve_item

    for item_id in groups:  # a committed version (a link) has its own copy: never written
        node = read_node(resolve_item(store, item_id))
        if node is not None and node.get("node_type") == "group":
            if node.get("consolidated_metadata") is None:
                consolidate_item(store, item_id)
                moved += 1
    mark_migrated(store)
    return (
        f"store {store}: metadata now consolidated per item ({moved} of {len(groups)} item "
        "group(s) consolidated, the root zarr.json's copy removed): open an item with "
        "xarray.open_zarr(STORE/ITEM) or segflow.open_store"
    )


def mark_migrated(store: str) -> None:
    """Drop the root's consolidated metadata and mark the layout in segflow's marker."""
    root = read_node(store)
    if root is None:
        return
    root.pop("consolidated_metadata", None)
    marker = root.setdefault("attributes", {}).get("segflow")
    marker = dict(marker) if isinstance(marker, dict) else {}
    root["attributes"]["segflow"] = {**marker, LAYOUT_KEY: LAYOUT}
    write_node(store, root)

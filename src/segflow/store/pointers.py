"""Item versions on object stores: a pointer object names each item's latest version.

Object stores (``s3://`` and other fsspec URLs) have neither links nor renames. There an
item's committed versions live where a local store keeps them,
``STORE/.segflow/versions/ITEM/VERSION/``, and the object
``STORE/.segflow/versions/ITEM/LATEST`` (:data:`POINTER_NAME`; JSON: the version's name
and its commit record) plays the local link's part: it is written, in one PUT, only
after the version's every object is in place, so a reader that resolved it
(:func:`segflow.store.versions.resolve_item`) reads one complete version whatever commits
meanwhile. The pointer carries the commit record, so the planner's skip check reads one
small object per item, as before.

A commit (:func:`publish_remote`, under the store's lock) runs in this order:

1. the item's earlier result written in place by a segflow before versions (no pointer,
   a commit record at ``STORE/ITEM``) is copied into its versions, named by its record;
2. the staged group is copied (server-side) to its version folder;
3. the pointer is written conditionally: with S3 ``If-Match`` on the ETag of the pointer
   the run read (``If-None-Match: *`` through fsspec's ``mode="create"`` when there was
   none), and only if it still names the version the run started from (``parent``, read
   when the item began). Of two writers that began from the same version, one publishes;
   the other's write fails, its version folder is removed, and the item fails with one
   line (:class:`ItemConflictError`). Other object stores that do not honour fsspec's
   conditions get the check without the atomic write: there the store lock is the rule;
4. the plain copy at ``STORE/ITEM`` is brought up to the new version: its data objects,
   then its metadata, the group's ``zarr.json`` last, then objects the version no longer
   has are removed. It is for readers that open ``STORE/ITEM`` by path (``xarray``,
   napari): they see the latest version, but while step 4 runs they can read a mix of
   two versions, as every in-place write could. segflow's own readers never read it.
   With ``output.plain_copy: false`` (recorded in ``STORE/.segflow/plain_copy.json`` by
   each run, :func:`set_plain_copy`) there is none: step 4 removes ``STORE/ITEM`` instead,
   and the latest version is stored once.

A marker ``STORE/.segflow/publishing/ITEM/VERSION`` is written before step 2 and removed after
step 4; the next run's :func:`recover_publishes` removes the version of a commit cut
before its pointer (the item is redone) and finishes the plain copy of one cut after.
Until its pointer is written a version is never listed (versions named after the
pointer's are hidden), so time travel never reads a half-copied one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from segflow.errors import StoreError
from segflow.faults import fault_point
from segflow.store.fs import fresh_fs
from segflow.store.lock import bookkeeping_path
from segflow.store.names import ZARR_JSON

POINTER_NAME = "LATEST"
PUBLISHING_DIR = "publishing"
PLAIN_COPY_FILE = "plain_copy.json"  # {"plain_copy": true | false | null (being changed)}
ANY_PARENT = "any"  # commit_item's default: publish over whatever the pointer names


class ItemConflictError(StoreError):
    """Another run published a version of the item since this run began it."""


def item_url(store: str, item_id: str) -> str:
    return f"{str(store).rstrip('/')}/{item_id}"


def version_url(store: str, item_id: str, version: str) -> str:
    """``STORE/.segflow/versions/ITEM/VERSION`` as a URL."""
    from segflow.store.versions import VERSIONS_DIR

    return bookkeeping_path(store, VERSIONS_DIR, item_id, version)


def pointer_url(store: str, item_id: str) -> str:
    """``STORE/.segflow/versions/ITEM/LATEST``: the object naming the latest version."""
    from segflow.store.versions import VERSIONS_DIR

    return bookkeeping_path(store, VERSIONS_DIR, item_id, POINTER_NAME)


def read_pointer(store: str, item_id: str) -> dict[str, Any] | None:
    """The item's pointer (``{"version", "commit"}``), or None (never committed with
    versions: not there, or written in place by an earlier segflow)."""
    from segflow.store.commit import _read_json

    found = _read_json(pointer_url(store, item_id))
    return found if found and isinstance(found.get("version"), str) else None


def publish_remote(
    store: str,
    staged: str,
    item_id: str,
    record: Mapping[str, Any],
    *,
    parent: str | None,
) -> None:
    """Publish the checked group ``staged`` as the item's version ``record["version"]``
    on an object store (the steps in the module note; call under the store's lock).

    Raises
    ------
    ItemConflictError
        When the pointer no longer names ``parent`` (another run published meanwhile),
        or its conditional write fails; this run's version is removed first.
    """
    version = str(record["version"])
    if read_pointer(store, item_id) is None:
        _keep_legacy_remote(store, item_id)
    marker = bookkeeping_path(store, PUBLISHING_DIR, item_id, version)
    _put(marker, {"version": version})
    target = version_url(store, item_id, version)
    copy_tree(staged, target)
    fault_point("item-swap")  # the version complete, its pointer not yet written
    try:
        _write_pointer(store, item_id, {"version": version, "commit": dict(record)}, parent)
    except ItemConflictError:
        remove_tree(target)
        remove_tree(marker)
        raise
    follow_plain_copy(store, item_id, version)
    remove_tree(marker)


def _write_pointer(store: str, item_id: str, value: Mapping[str, Any], parent: str | None) -> None:
    """Replace the pointer only if it names ``parent`` (:data:`ANY_PARENT`: whatever it
    names), conditionally on the ETag read where the store honours it (S3)."""
    fs, path = fresh_fs(pointer_url(store, item_id))
    try:
        etag = fs.info(path).get("ETag")
        found = json.loads(fs.cat_file(path)).get("version")
    except FileNotFoundError:
        etag = found = None
    if parent != ANY_PARENT and found != parent:
        raise _conflict(store, item_id, found, parent)
    data = json.dumps(dict(value), indent=2).encode()
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    try:
        if found is None:
            fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        elif etag and "s3" in protocols:
            fs.pipe_file(path, data, IfMatch=etag)
        else:
            fs.pipe_file(path, data)
    except FileExistsError:
        raise _conflict(store, item_id, "(a new one)", found) from None
    except OSError as error:
        if etag and "s3" in protocols and "condition" in str(error).lower():  # HTTP 412
            raise _conflict(store, item_id, "(a new one)", found) from None
        raise


def _conflict(store: str, item_id: str, found: str | None, parent: str | None) -> Exception:
    began = f"version {parent}" if parent else "no version"
    return ItemConflictError(
        f"item '{item_id}': another run published version {found or '(none)'} of it in "
        f"'{str(store).rstrip('/')}' since this run began it from {began}; this run's "
        "result was not published: run it again to rebase on the new version"
    )


def _keep_legacy_remote(store: str, item_id: str) -> None:
    """Copy an item an earlier segflow wrote in place (a commit record at ``STORE/ITEM``,
    no pointer) into its versions, named by its record's version (or its commit time),
    so time travel still reads it after the next commit. A group without a record (an
    in-place rewrite that was cut) is no result and is not kept."""
    import datetime as dt

    from segflow.store.commit import COMMIT_ATTR, _read_json
    from segflow.store.versions import version_id

    node = _read_json(f"{item_url(store, item_id)}/{ZARR_JSON}") or {}
    record = node.get("attributes", {}).get(COMMIT_ATTR)
    if not isinstance(record, dict):
        return
    name = record.get("version")
    if not isinstance(name, str) or not name[:1].isdigit():
        try:
            when = dt.datetime.fromisoformat(str(record.get("committed")))
        except ValueError:
            when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        name = version_id(when)
    copy_tree(item_url(store, item_id), version_url(store, item_id, name))


def copy_tree(source: str, target: str) -> None:
    """Copy every object under ``source`` to the same relative key under ``target``
    (server-side on S3), the ``zarr.json`` files after the data and the top one last;
    then remove what ``target`` held that ``source`` does not."""
    fs, src = fresh_fs(source)
    _, dst = fresh_fs(target)
    src, dst = src.rstrip("/"), dst.rstrip("/")
    names = _below(fs, src)
    old = _below(fs, dst) if fs.exists(dst) else []
    metadata = [n for n in names if n.rsplit("/", 1)[-1] == ZARR_JSON]
    data = sorted(set(names) - set(metadata))
    ordered = sorted(metadata, key=lambda n: -n.count("/"))  # the group's own file last
    for batch in (data, ordered[:-1], ordered[-1:]):
        if batch:
            fs.copy([f"{src}/{n}" for n in batch], [f"{dst}/{n}" for n in batch])
    gone = sorted(set(old) - set(names))
    if gone:
        fs.rm([f"{dst}/{n}" for n in gone])


def _below(fs: Any, folder: str) -> list[str]:
    """The keys under ``folder`` (never a sibling that shares its prefix), relative to it."""
    return [key[len(folder) + 1 :] for key in fs.find(folder) if key.startswith(f"{folder}/")]


def update_plain_copy(store: str, item_id: str, version: str) -> None:
    """Bring ``STORE/ITEM`` (the copy for readers of plain paths) up to ``version``."""
    copy_tree(version_url(store, item_id, version), item_url(store, item_id))


def follow_plain_copy(store: str, item_id: str, version: str) -> None:
    """Make ``STORE/ITEM`` what the store's plain-copy setting asks: a copy of
    ``version``, or nothing (:func:`plain_copy_wanted`)."""
    if plain_copy_wanted(store):
        update_plain_copy(store, item_id, version)
    else:
        remove_tree(item_url(store, item_id))


def recorded_plain_copy(store: str) -> bool | None:
    """The ``output.plain_copy`` the store's runs recorded: True when none was (stores
    before the setting keep their copies), None while a change was cut short."""
    from segflow.store.commit import _read_json

    found = _read_json(bookkeeping_path(store, PLAIN_COPY_FILE))
    if not isinstance(found, dict):
        return True
    value = found.get("plain_copy")
    return value if isinstance(value, bool) else None


def plain_copy_wanted(store: str) -> bool:
    """Whether a commit keeps ``STORE/ITEM`` as a plain copy of the latest version (also
    while a change of the setting was cut short: a stale copy is worse than one more)."""
    return recorded_plain_copy(store) is not False


def plain_copy_changes(store: str, wanted: bool) -> bool:
    """Whether an object store's plain copies do not yet follow ``wanted`` (a run must
    bring them in line, :func:`set_plain_copy`); False for a local store (a link there)."""
    from segflow.store.lock import is_local

    return not is_local(store) and recorded_plain_copy(store) is not wanted


def set_plain_copy(store: str, wanted: bool) -> int:
    """Record ``output.plain_copy`` for an object store's commits and bring every committed
    item in line (copy its latest version to ``STORE/ITEM``, or remove that); call under
    the lock. Returns how many items changed. A run cut here leaves the record unknown
    (null), so the next run does it again."""
    if not plain_copy_changes(store, wanted):
        return 0
    record = bookkeeping_path(store, PLAIN_COPY_FILE)
    _put(record, {"plain_copy": None})
    changed = 0
    for item_id in versioned_items(store):
        version = (read_pointer(store, item_id) or {}).get("version")
        if version is None:
            continue  # not committed with versions: its in-place group is its only copy
        if wanted:
            update_plain_copy(store, item_id, version)
        else:
            remove_tree(item_url(store, item_id))
        changed += 1
    _put(record, {"plain_copy": wanted})
    return changed


def versioned_items(store: str) -> list[str]:
    """The ids of the items with a folder under ``STORE/.segflow/versions`` (an object
    store's; whether one has a pointer is for the caller to read)."""
    from segflow.store.versions import VERSIONS_DIR

    fs, folder = fresh_fs(bookkeeping_path(store, VERSIONS_DIR))
    found = fs.ls(folder, detail=False) if fs.isdir(folder) else []
    return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)


def recover_publishes(store: str) -> None:
    """Finish what a run killed in :func:`publish_remote` left (call under the lock): a
    version its pointer never named goes (the item is redone), the plain copy of one it
    names is completed."""
    fs, folder = fresh_fs(bookkeeping_path(store, PUBLISHING_DIR))
    for key in sorted(fs.find(folder)) if fs.isdir(folder) else ():
        item_id, version = str(key)[len(folder.rstrip("/")) + 1 :].rsplit("/", 1)
        if (read_pointer(store, item_id) or {}).get("version") == version:
            follow_plain_copy(store, item_id, version)
        else:
            remove_tree(version_url(store, item_id, version))
        remove_tree(bookkeeping_path(store, PUBLISHING_DIR, item_id, version))


def _put(url: str, value: Mapping[str, Any]) -> None:
    fs, path = fresh_fs(url)
    fs.pipe_file(path, json.dumps(dict(value)).encode())


def remove_tree(url: str) -> None:
    """Remove the object ``url`` or every object under it (nothing when none)."""
    fs, path = fresh_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)

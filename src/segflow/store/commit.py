"""The commit protocol: an item is ``done`` only once its data is complete on disk.

A run writes each item into a staging group ``STORE/.segflow/staging/RUN/ITEM``, checks it
(every array has the item's shape and dtype and every storage unit on disk:
:func:`check_item`; each output writer checks its own files, such as one table row per
object or every frame of a DICOM SEG: :mod:`segflow.store.writers`),
writes a commit record into the group's attributes (``segflow_commit``: run id and name,
fingerprint, config hash, code version, arrays, object count, version), and only then
commits it: the staged group is renamed to a new version folder
``STORE/.segflow/versions/ITEM/VERSION`` and the link ``STORE/ITEM`` is replaced by a link
to it in one rename (:mod:`segflow.store.versions`), so at every instant ``STORE/ITEM`` is
either the previous complete version or the new one, and a reader that resolved the link
keeps its version. A run killed between the two leaves a link that :func:`prepare_store`
completes. Stores an earlier segflow wrote (``STORE/ITEM`` a folder, or a swap cut between
its two renames into ``STORE/.segflow/trash/RUN/``) are taken over the same way.
The index row that says ``done`` is written after the swap, and skipping an item needs
both that row and a matching commit record (:func:`read_commit`).

Object stores have no rename: there the staged group is copied (server-side) to its new
version folder and a pointer object, written conditionally once the copy is complete,
names it (:mod:`segflow.store.pointers`); ``STORE/ITEM`` then gets a plain copy of it for
readers of paths. The previous result stays readable until the pointer moves. An item an
earlier segflow wrote in place (no pointer) is read in place and kept as a version at its
next commit.

A store is a folder whose root ``zarr.json`` carries ``segflow`` attributes; an existing
folder without them is refused unless empty (:func:`prepare_store`), and a folder in the
store that is not a segflow item group is never replaced or deleted.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from segflow.errors import StoreError
from segflow.store.fs import fresh_fs
from segflow.store.lock import SEGFLOW_DIR, bookkeeping_path, is_local, local_path
from segflow.store.names import check_reserved_names
from segflow.store.pointers import ANY_PARENT

COMMIT_ATTR = "segflow_commit"
STORE_ATTR = "segflow"
# The store format this code writes and reads: the root marker's ``format`` and each commit
# record's. 1: items are folders (before versions); 2: items are links to versions
# (:mod:`segflow.store.versions`). An older store is moved up by its next run; a newer one
# is refused untouched (:func:`check_store_format`).
STORE_FORMAT = 2
WRITTEN_BY = "written_by"  # the marker's key: the segflow version that set its format
# Files an earlier segflow (before the store marker) left at a store's root.
_LEGACY_MARKERS = ("index.parquet",)


class ForeignStoreError(StoreError):
    """A folder that segflow did not make is where a store or an item group should be."""


class StoreFormatError(StoreError):
    """A store or item written by a newer segflow, in a store format this one does not know."""


def check_store_format(store: str) -> None:
    """Refuse a store whose root marker says a newer store format than :data:`STORE_FORMAT`
    (read only: nothing is written). A store without the marker passes (not a segflow
    store, or one older than the marker: the callers tell those apart).

    Raises
    ------
    StoreFormatError
        ``STORE was written by segflow X (store format N); this is segflow Y (format M):
        upgrade segflow``.
    """
    metadata = _read_json(f"{str(store).rstrip('/')}/zarr.json") or {}
    marker = metadata.get("attributes", {}).get(STORE_ATTR)
    if isinstance(marker, dict):
        _refuse_newer(f"{str(store).rstrip('/')}", marker)


def _refuse_newer(what: str, found: Mapping[str, Any]) -> None:
    """Raise :class:`StoreFormatError` when ``found`` (a marker or commit record) holds a
    format newer than this code's."""
    import segflow

    try:
        number = int(found.get("format") or 0)
    except (TypeError, ValueError):
        number = STORE_FORMAT + 1  # not a number this code wrote: a newer one's
    if number > STORE_FORMAT:
        raise StoreFormatError(
            f"{what} was written by segflow {found.get(WRITTEN_BY) or '(a newer version)'} "
            f"(store format {found.get('format')}); this is segflow {segflow.__version__} "
            f"(format {STORE_FORMAT}): upgrade segflow"
        )


def prepare_store(store: str, *, keep_stages: Collection[str] = ()) -> None:
    """Make ``store`` ready for a run: create it, or check that segflow made it.

    Call while holding the store's lock (:mod:`segflow.store.lock`). Creates the folder and
    its root group with the ``segflow`` marker when missing or empty; adds the marker to a
    store an earlier segflow wrote (it has ``index.parquet``); moves back an item whose
    swap a killed run left half done; drops staging folders except ``keep_stages`` (the
    :func:`stage_name` of items this run may resume).

    Raises
    ------
    ForeignStoreError
        If ``store`` is a file, or a non-empty folder segflow did not make.

    Examples
    --------
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/out.zarr"
    >>> prepare_store(store)
    >>> is_segflow_store(store)
    True
    """
    check_store(store)
    import zarr

    import segflow
    from segflow.store.metadata import LAYOUT, LAYOUT_KEY, read_node, write_node
    from segflow.store.versions import recover_links

    root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
    marker: Any = dict(root.attrs).get(STORE_ATTR)
    if not isinstance(marker, dict) or marker.get("format") != STORE_FORMAT:
        fresh = marker is None and not _has_legacy_markers(store)
        # A new store starts with per-item metadata; an older one is migrated by its run.
        layout = {LAYOUT_KEY: LAYOUT} if fresh else {}
        kept = marker if isinstance(marker, dict) else {}
        moved = {"format": STORE_FORMAT, WRITTEN_BY: segflow.__version__}
        # Only the marker changes: an older root's consolidated copy stays until the run
        # migrates the store (zarr's update_attributes would drop it).
        node = read_node(store) or {}
        node.setdefault("attributes", {})[STORE_ATTR] = {**kept, **layout, **moved}
        write_node(store, node)
    if is_local(store):
        _recover_swaps(local_path(store))  # an older segflow's two-rename swap
        recover_links(store)
        staging = local_path(bookkeeping_path(store, "staging"))
        for name in os.listdir(staging) if os.path.isdir(staging) else ():
            if name not in keep_stages:
                shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
    else:
        _prepare_remote(store, keep_stages)


def _prepare_remote(store: str, keep_stages: Collection[str]) -> None:
    """An object store's part of :func:`prepare_store`: finish or undo commits a killed
    run left, drop staging folders except ``keep_stages`` (and the block records an
    earlier segflow kept beside items it wrote in place)."""
    from segflow.store.pointers import recover_publishes

    recover_publishes(store)
    fs, staging = fresh_fs(bookkeeping_path(store, "staging"))
    for entry in fs.ls(staging, detail=False) if fs.isdir(staging) else ():
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep_stages:
            fs.rm(entry, recursive=True)
    _, blocks = fresh_fs(bookkeeping_path(store, "blocks"))
    if fs.isdir(blocks):
        fs.rm(blocks, recursive=True)


def check_store(store: str) -> None:
    """Refuse a ``store`` path that holds something segflow did not write (read-only).

    Raises
    ------
    ForeignStoreError
        If ``store`` is a file, or a non-empty folder without segflow's root metadata.
    StoreError
        If an item group sits where the store keeps a file of its own (``index.parquet``,
        ...: :func:`segflow.store.names.check_reserved_names`).
    """

    fs, path = fresh_fs(str(store))
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise ForeignStoreError(
            f"output.store '{store}' is a file, not a folder: choose a path for the Zarr store"
        )
    if is_segflow_store(store):
        check_store_format(store)
        check_reserved_names(store)
        return
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    names.discard(SEGFLOW_DIR)  # this run's lock, taken before the marker is written
    if names and not names & set(_LEGACY_MARKERS):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise ForeignStoreError(
            f"output.store '{store}' exists and is not a segflow store (no segflow metadata "
            f"in its zarr.json; it holds {shown}): choose a new path or an empty folder"
        )


def _has_legacy_markers(store: str) -> bool:
    fs, path = fresh_fs(str(store))
    return any(fs.exists(f"{path.rstrip('/')}/{name}") for name in _LEGACY_MARKERS)


def is_segflow_store(store: str) -> bool:
    """True when the root ``zarr.json`` of ``store`` carries segflow's marker."""
    metadata = _read_json(f"{str(store).rstrip('/')}/zarr.json")
    return bool(metadata and STORE_ATTR in metadata.get("attributes", {}))


def staging_root(store: str, name: str) -> str:
    """Where an item is staged: ``STORE/.segflow/staging/NAME`` (a Zarr root of its own,
    holding the group ``ITEM``; ``NAME`` from :func:`stage_name` for a resumable item),
    on a local store and an object store alike."""
    return bookkeeping_path(store, "staging", name)


def stage_name(item_id: str, config_hash: str, fingerprint: str, code_version: str) -> str:
    """The staging name of an item: the same for the same item, input, config and code,
    so a rerun after a crash finds what the crashed run staged."""
    import hashlib

    key = hashlib.sha256("\0".join([config_hash, fingerprint, code_version]).encode())
    return f"{item_id}.{key.hexdigest()[:16]}"


def is_staged(root: str, item_id: str) -> bool:
    """Whether ``ROOT/ITEM`` holds a staged group (a crashed run's, to resume)."""
    return _read_json(f"{str(root).rstrip('/')}/{item_id}/zarr.json") is not None


def begin_item(store: str, item_id: str) -> str | None:
    """Before writing an item: make sure ``store`` is a segflow store, refuse a foreign
    folder of the item's name. Returns the item's latest version now (None: none, or an
    item an earlier segflow wrote), the ``parent`` its commit must still find on an
    object store (:func:`commit_item`)."""
    if not is_segflow_store(store):
        prepare_store(store)  # a direct call (notebook, test) without a flow's preparation
    check_store_format(store)
    read_commit(store, item_id)  # refuses an item a newer segflow committed
    target = f"{str(store).rstrip('/')}/{item_id}"

    fs, path = fresh_fs(target)
    if fs.exists(path) and _read_json(f"{target}/zarr.json") is None:
        raise ForeignStoreError(
            f"item '{item_id}': '{target}' exists and is not a segflow item group; segflow "
            "never replaces what it did not write: rename or remove it"
        )
    from segflow.store.versions import current_version

    return current_version(store, item_id)


def check_item(root: str, item_id: str, *, shape: Sequence[int], arrays: Mapping[str, str]) -> None:
    """Check that the arrays of ``ROOT/ITEM`` are complete: shape, dtype, storage units.

    The item's own check (the output writer's); every other writer checks its own files
    (a table's rows, the pyramid's levels, the DICOM SEG's frames) with :func:`check_array`,
    :func:`check_table_rows` or a check of its own.

    Parameters
    ----------
    root : str
        The Zarr root the item was written under (staging, or the store).
    item_id : str
        The item's group.
    shape : sequence of int
        The item's spatial shape: every array's shape.
    arrays : mapping
        Array name to dtype name, every array the run wrote.

    Raises
    ------
    StoreError
        Naming the array and what is missing.
    """
    for name, dtype in arrays.items():
        # A leading class axis (probabilities) is chunked whole: it counts as one unit.
        check_array(root, item_id, name, dtype, shape, suffix=True)


def check_table_rows(root: str, item_id: str, name: str, object_count: int | None) -> None:
    """The table ``ROOT/ITEM/NAME`` (Parquet) is readable and, when ``object_count`` is
    given, has one row per object.

    Raises
    ------
    StoreError
        ``item 'ITEM': NAME is unreadable (...)`` or ``... has N rows for M objects``.
    """
    import fsspec
    import pyarrow.parquet as pq

    table = f"{str(root).rstrip('/')}/{item_id}/{name}"
    try:
        with fsspec.open(table, "rb") as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
    except Exception as exc:
        raise StoreError(f"item '{item_id}': {name} is unreadable ({exc})") from exc
    if object_count is not None and rows != object_count:
        raise StoreError(f"item '{item_id}': {name} has {rows} rows for {object_count} objects")


def check_array(
    root: str, item_id: str, name: str, dtype: str, shape: Sequence[int], *, suffix: bool
) -> None:
    """Check the array ``ROOT/ITEM/NAME``: its shape (its trailing axes with ``suffix``: a
    leading class axis is not the item's), its dtype and every storage unit on disk.

    Raises
    ------
    StoreError
        Naming the array and what is missing or differs.
    """
    import zarr

    label = f"item '{item_id}': array '{name}'"
    try:
        array = zarr.open_array(root, path=f"{item_id}/{name}", mode="r", zarr_format=3)
    except Exception as exc:
        raise StoreError(f"{label} is missing after the run ({exc})") from exc
    found_shape = tuple(array.shape)[-len(shape) :] if suffix else tuple(array.shape)
    if found_shape != tuple(shape) or str(array.dtype) != dtype:
        raise StoreError(
            f"{label} is {tuple(array.shape)} {array.dtype}, expected {tuple(shape)} {dtype}"
        )
    unit = array.shards if array.shards is not None else array.chunks
    expected = math.prod(-(-n // u) for n, u in zip(array.shape, unit, strict=True))
    fs, path = fresh_fs(f"{str(root).rstrip('/')}/{item_id}/{name}/c")
    found = sum(1 for key in fs.find(path) if _is_chunk_key(key, path)) if fs.exists(path) else 0
    if found != expected:
        raise StoreError(
            f"{label} has {found} of its {expected} storage units on disk: a block's "
            "write is missing"
        )


def _is_chunk_key(key: str, prefix: str) -> bool:
    """Whether ``key`` (under an array's ``c`` folder) is a storage unit: ``c/0/1``, not a
    temporary file a killed write left (zarr's ``1.<hex>.partial``)."""
    parts = key[len(prefix.rstrip("/")) + 1 :].split("/")
    return all(part.isdigit() for part in parts)


def drop_partial_writes(root: str, item_id: str) -> int:
    """Remove the temporary files of writes a killed run left in its staged ``ROOT/ITEM``.

    zarr's local store writes a storage unit to ``NAME.<hex>.partial`` and renames it into
    place; a process killed in between leaves the temporary file. Only a staged group (the
    run's own, being resumed) is cleaned, never a committed one. Returns how many went.
    """

    fs, path = fresh_fs(f"{str(root).rstrip('/')}/{item_id}")
    if not fs.exists(path):
        return 0
    stale = [key for key in fs.find(path) if key.endswith(".partial")]
    for key in stale:
        fs.rm_file(key)
    return len(stale)


def commit_item(
    store: str,
    root: str,
    item_id: str,
    record: Mapping[str, Any],
    *,
    parent: str | None = ANY_PARENT,
) -> None:
    """Write the commit record into ``ROOT/ITEM`` and make it ``STORE/ITEM``.

    The group's ``zarr.json`` gets the item's consolidated metadata with the record
    (:func:`segflow.store.metadata.consolidate_item`), so the committed group opens with
    one metadata read.

    ``root`` is :func:`staging_root` of the run; for a local store the staged group is
    renamed to its version and linked (see the module note), for an object store copied
    to its version and named by the item's pointer, which must still name ``parent``
    (:func:`begin_item`'s answer; the default takes whatever it names).

    Raises
    ------
    segflow.store.pointers.ItemConflictError
        On an object store, when another run published a version of the item since
        ``parent``: nothing of this commit is left.
    """
    from segflow.store.lock import lock_lost
    from segflow.store.metadata import consolidate_item, drop_consolidated
    from segflow.store.versions import publish_version, record_commit, version_id

    if (lost := lock_lost(store)) is not None:  # another run holds the store now
        raise StoreError(lost)
    record = {"format": STORE_FORMAT, **record, "version": record.get("version") or version_id()}
    # The item's metadata, consolidated into its group, and the record in one write.
    consolidate_item(root, item_id, attributes={COMMIT_ATTR: dict(record)})
    # An older store's root copy would not list this item (a flow migrates the store
    # first; a direct call does not): drop it rather than leave it stale.
    drop_consolidated(store)
    if is_local(store) and root != store:
        final = os.path.join(local_path(store), item_id)
        if os.path.exists(final) and _read_json(os.path.join(final, "zarr.json")) is None:
            raise ForeignStoreError(
                f"item '{item_id}': '{final}' exists and is not a segflow item group; "
                "segflow never replaces what it did not write: rename or remove it"
            )
        publish_version(store, os.path.join(local_path(root), item_id), item_id, record["version"])
    elif root != store:
        from segflow.store.pointers import publish_remote

        publish_remote(store, f"{str(root).rstrip('/')}/{item_id}", item_id, record, parent=parent)
    record_commit(store, record, item_id)


def read_commit(store: str, item_id: str) -> dict[str, Any] | None:
    """The commit record of the item's latest version (``STORE/ITEM``; on an object store
    the one its pointer holds), or None when it has none (never committed, interrupted,
    written by an older segflow, or not there).

    Raises
    ------
    StoreFormatError
        When a newer segflow committed the item (its record's ``format``).
    """
    record: Any = None
    if not is_local(store):
        from segflow.store.pointers import read_pointer

        record = (read_pointer(store, item_id) or {}).get("commit")
    if record is None:
        return read_group_commit(f"{str(store).rstrip('/')}/{item_id}", item_id)
    if not isinstance(record, dict):
        return None
    _refuse_newer(f"item '{item_id}' of {str(store).rstrip('/')}", record)
    return record


def read_group_commit(group: str, item_id: str) -> dict[str, Any] | None:
    """The commit record in the ``zarr.json`` of the group ``group`` (a path
    :func:`segflow.store.versions.resolve_item` gave, say), or None when it has none.

    Raises
    ------
    StoreFormatError
        When a newer segflow committed it (its record's ``format``).
    """
    metadata = _read_json(f"{str(group).rstrip('/')}/zarr.json")
    if not metadata:
        return None
    record = metadata.get("attributes", {}).get(COMMIT_ATTR)
    if not isinstance(record, dict):
        return None
    _refuse_newer(f"item '{item_id}' of {str(group).rsplit('/', 1)[0]}", record)
    return record


def discard_trash(store: str, run_id: str) -> None:
    """Remove what a run's swaps set aside (normally removed by each swap already)."""
    if is_local(store):
        shutil.rmtree(local_path(bookkeeping_path(store, "trash", run_id)), ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot, and the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(result == 0)


def _recover_swaps(store: str) -> None:
    """Move back each previous result whose replacement a killed run never swapped in."""
    trash = local_path(bookkeeping_path(store, "trash"))
    if not os.path.isdir(trash):
        return
    for run in os.listdir(trash):
        for item_id in os.listdir(os.path.join(trash, run)):
            final = os.path.join(store, item_id)
            if not os.path.exists(final):
                os.rename(os.path.join(trash, run, item_id), final)
    shutil.rmtree(trash, ignore_errors=True)


def _read_json(url: str) -> dict[str, Any] | None:
    """A JSON object file, or None when absent or not one. Local paths are read directly:
    fsspec's URL handling is half the cost of reading a commit record (the skip check
    reads one per done item)."""
    import fsspec

    try:
        if is_local(url):
            with open(local_path(url), "rb") as local:
                value = json.loads(local.read())
        else:
            with fsspec.open(url, "rb") as handle:
                value = json.loads(handle.read())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return None
    return value if isinstance(value, dict) else None

"""Commit stamps: how the planner skips a done item without opening its group.

Skipping an item needs its index row *and* its group's commit record to say the same
input fingerprint, config hash and code version (:func:`segflow.engine.collection.select_items`):
a ``done`` row over a group that was removed, replaced, or is half rewritten on an object
store must be redone. Reading every done item's commit record costs one ``zarr.json`` read
and parse per item (26 s at 100,000 items here).

When an item's row is recorded, its group's ``zarr.json`` is stamped: the commit record is
read between two looks at the file's identity (:func:`group_stamp`: inode, size and
modification and change times locally; size and ETag on an object store), and the row gets
``commit_id`` (a hash of the record's content) and ``commit_stamp`` only when both looks
agree and the record says what the row says. The planner then looks at the file's identity
only (a ``stat``, or a HEAD): where it equals the row's stamp, the file is the one whose
record was checked, so the row speaks for it; anywhere else (no stamp, an older row, a
group rewritten, replaced, removed or moved, a store copied elsewhere) the record is read
as before. A stale or missing stamp can only cost a read, never skip an item whose group
does not hold a matching commit.

The stamp is the identity of the file that holds the record, whatever path leads to it (a
group that is a link to a versioned folder is stamped through the link), and
``commit_id`` names the record's content, not a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from segflow.store.fs import fresh_fs
from segflow.store.lock import is_local, local_path

# What a commit record and an index row must agree on for the item to be skipped.
SKIP_KEYS = ("fingerprint", "config_hash", "code_version")
_ETAG_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "md5")


def commit_id(record: Mapping[str, Any]) -> str:
    """A short hash of a commit record's content.

    Examples
    --------
    >>> a, b = {"run_id": "r", "fingerprint": "f"}, {"fingerprint": "f", "run_id": "r"}
    >>> commit_id(a) == commit_id(b) != commit_id({**a, "run_id": "s"})
    True
    """
    text = json.dumps(dict(record), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def group_stamp(store: str, item_id: str) -> str | None:
    """The identity of the file that holds the item's commit record as it is now:
    ``STORE/ITEM/zarr.json`` (through the link), on an object store the item's pointer
    (:mod:`segflow.store.pointers`; ``STORE/ITEM/zarr.json`` for an item an earlier segflow
    wrote in place). None when it is not there (or, on an object store, when the listing
    gives no ETag to tell one version from another)."""
    path = f"{str(store).rstrip('/')}/{item_id}/zarr.json"
    if is_local(path):
        return local_stamps(store, [item_id])[0]
    from segflow.store.pointers import pointer_url

    for url in (pointer_url(store, item_id), path):
        fs, inner = fresh_fs(url)
        try:
            info = fs.info(inner)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        tag = next((str(info[k]) for k in _ETAG_KEYS if info.get(k)), None)
        kind = "" if url == path else "pointer:"  # an in-place item's stamp as before
        return None if tag is None else f"{kind}{info.get('size')}:{tag}"
    return None


def local_stamps(store: str, item_ids: Iterable[str]) -> list[str | None]:
    """:func:`group_stamp` of each of ``item_ids`` in a local store, in order: one ``stat``
    of ``STORE/ITEM/zarr.json`` each (through the item's link: the stamp is its version's
    file), the store's path built once. This loop is the nothing-to-do check's cost per
    item; it is kept free of any other work."""
    root = local_path(str(store).rstrip("/"))
    stat = os.stat
    stamps: list[str | None] = []
    for item_id in item_ids:
        try:
            st = stat(f"{root}/{item_id}/zarr.json")
        except OSError:
            stamps.append(None)
            continue
        stamps.append(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return stamps


def stamp_commit(store: str, row: Mapping[str, Any]) -> dict[str, str]:
    """``{"commit_id", "commit_stamp"}`` for a ``done`` index ``row``, when its group's
    commit record says what the row says and the file did not change while it was read;
    ``{}`` otherwise (the planner then reads the record).

    Call after the item is committed, while holding the store's lock.
    """
    from segflow.store.commit import read_commit

    item_id = str(row["id"])
    before = group_stamp(store, item_id)
    if before is None:
        return {}
    record = read_commit(store, item_id)
    if record is None or group_stamp(store, item_id) != before:
        return {}
    if any(not row.get(key) or record.get(key) != row.get(key) for key in SKIP_KEYS):
        return {}
    return {"commit_id": commit_id(record), "commit_stamp": before}

"""Item versions: every commit of an item is kept at a path of its own, never rewritten.

On a local store each committed version of an item lives in
``STORE/.segflow/versions/ITEM/VERSION/`` (an item group, its commit record in its
``zarr.json``), and ``STORE/ITEM`` is a relative symbolic link to the latest one. A commit
renames the checked staged group to a new version folder and replaces the link in one
``rename`` (a new link made beside it first), so ``xarray.open_zarr("STORE/ITEM")`` and
napari open the latest version the usual way, and a reader that resolved the link when it
opened (:func:`resolve_item`: :func:`segflow.open_store` does) keeps reading its version
whatever commits meanwhile.

``VERSION`` is the commit's UTC time and a random suffix (``20261207T105500.123456Z-
1a2b3c4d``): version names sort by time, so the store as it was at time ``T`` is, per
item, the newest version named before ``T`` (:func:`version_as_of`). Each commit also
leaves a line in its run's journal, ``STORE/.segflow/runs/RUN/`` (``run.json``: run id,
flow run name, config hash, code version; ``commits/VERSION.json``: the item), read by
:func:`read_history`. Tags (``STORE/.segflow/tags/NAME.json``) name a time;
:func:`resolve_as_of` takes a tag, a run id, a run name or a time. Old versions stay until
:func:`prune_versions` applies a :class:`Retention` policy, which never removes an item's
latest version nor one a tag still reads.

A store an earlier segflow wrote (``STORE/ITEM`` a folder) keeps working: its item folder
becomes a version of its own (named from its commit record's time) at the item's next
commit. Only item groups segflow wrote are ever moved (the caller checks).

Object stores keep versions in the same folders; a pointer object
``STORE/.segflow/versions/ITEM/LATEST`` takes the link's place, and ``STORE/ITEM`` holds a
plain copy of the latest version for readers of paths (:mod:`segflow.store.pointers`).
Every reader that opens an item goes through :func:`resolve_item` (or
:func:`path_as_of`), never ``STORE/ITEM``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from segflow.faults import fault_point
from segflow.store.lock import bookkeeping_path, is_local, local_path

VERSIONS_DIR = "versions"
RUNS_DIR = "runs"
TAGS_DIR = "tags"
LINKS_DIR = "links"  # links made beside an item before they replace it
_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def version_id(when: dt.datetime | None = None) -> str:
    """A new version name: the UTC time, then a random suffix (names sort by time).

    Examples
    --------
    >>> version_id(dt.datetime(2026, 12, 7, 10, 55, tzinfo=dt.UTC))[:24]
    '20261207T105500.000000Z-'
    """
    return f"{time_key(when or dt.datetime.now(dt.UTC))}-{uuid.uuid4().hex[:8]}"


def time_key(when: dt.datetime) -> str:
    """``when`` as the prefix of version names (a naive time is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime(_TIME_FORMAT)


def version_time(version: str) -> dt.datetime:
    """The commit time a version name holds."""
    return dt.datetime.strptime(version.split("-", 1)[0], _TIME_FORMAT).replace(tzinfo=dt.UTC)


def versions_dir(store: str, item_id: str) -> str:
    """``STORE/.segflow/versions/ITEM`` (a local path, or an object store's URL)."""
    return local_path(bookkeeping_path(store, VERSIONS_DIR, item_id))


def version_path(store: str, item_id: str, version: str) -> str:
    """Where the item's version ``version`` lives (a local path or a URL)."""
    return f"{versions_dir(store, item_id)}/{version}"


def list_versions(store: str, item_id: str) -> list[str]:
    """The item's kept versions, oldest first (none before its first versioned commit).
    On an object store only those up to the one its pointer names: a later one is a
    commit still being copied (or cut before its pointer)."""
    if not is_local(store):
        latest = current_version(store, item_id)
        if latest is None:
            return []
        names = _listdir(versions_dir(store, item_id))
        return [n for n in names if n[:1].isdigit() and n <= latest]
    folder = versions_dir(store, item_id)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n for n in names if not n.startswith("."))


def current_version(store: str, item_id: str) -> str | None:
    """The version ``STORE/ITEM`` links to (on an object store: its pointer names), or
    None (not there, or a plain folder)."""
    if not is_local(store):
        from segflow.store.pointers import read_pointer

        return (read_pointer(store, item_id) or {}).get("version")
    try:
        target = os.readlink(os.path.join(local_path(store), item_id))
    except OSError:
        return None
    return os.path.basename(target.rstrip("/"))


def resolve_item(store: str, item_id: str) -> str:
    """The path that holds the item's latest version now: the target of the link
    ``STORE/ITEM``, on an object store the version its pointer names (or ``STORE/ITEM``
    itself: an older store's folder, an item an earlier segflow wrote in place). Open
    this, not ``STORE/ITEM``, to keep reading one version."""
    path = f"{str(store).rstrip('/')}/{item_id}"
    if not is_local(store):
        latest = current_version(store, item_id)
        return path if latest is None else version_path(store, item_id, latest)
    return os.path.realpath(local_path(path)) if os.path.islink(local_path(path)) else path


def publish_version(store: str, staged: str, item_id: str, version: str) -> None:
    """Make the checked group ``staged`` the item's version ``version`` and link
    ``STORE/ITEM`` to it (local stores; the caller holds the lock and refused a foreign
    folder at ``STORE/ITEM``).

    The link is made first in ``.segflow/links/``, so a run killed anywhere here leaves
    either the previous version linked or a link :func:`recover_links` completes."""
    link = _new_link(store, item_id, version)
    target = os.path.join(versions_dir(store, item_id), version)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(staged, target)
    fault_point("item-swap")
    _place_link(store, link, item_id)


def _new_link(store: str, item_id: str, version: str) -> str:
    """A link to the version, in its own folder under ``.segflow/links/``; its content is
    relative to the store's root, where it will sit."""
    folder = local_path(bookkeeping_path(store, LINKS_DIR, uuid.uuid4().hex))
    os.makedirs(folder)
    link = os.path.join(folder, item_id)
    os.symlink(os.path.join(".segflow", VERSIONS_DIR, item_id, version), link)
    return link


def _place_link(store: str, link: str, item_id: str) -> None:
    """Put ``link`` at ``STORE/ITEM`` in one rename; a folder there (an older store's
    item) is exchanged with it atomically where Linux can, then kept as a version."""
    from segflow.store.commit import _exchange

    final = os.path.join(local_path(store), item_id)
    if os.path.isdir(final) and not os.path.islink(final):
        if not _exchange(link, final):  # two renames: a kill between is recovered
            _keep_legacy(store, item_id, final)
            os.rename(link, final)
        else:
            _keep_legacy(store, item_id, link)  # the old folder now sits at link's name
    else:
        os.replace(link, final)
    shutil.rmtree(os.path.dirname(link), ignore_errors=True)


def _keep_legacy(store: str, item_id: str, folder: str) -> None:
    """Move an older store's item folder into the item's versions, named from its commit
    record's time (its modification time when it has none)."""
    from segflow.store.commit import COMMIT_ATTR, _read_json

    record = (_read_json(os.path.join(folder, "zarr.json")) or {}).get("attributes", {})
    committed = (record.get(COMMIT_ATTR) or {}).get("committed")
    try:
        when = dt.datetime.fromisoformat(str(committed))
    except ValueError:
        when = dt.datetime.fromtimestamp(os.path.getmtime(folder), dt.UTC)
    target = os.path.join(versions_dir(store, item_id), version_id(when))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(folder, target)


def recover_links(store: str) -> None:
    """Finish what a run killed in :func:`publish_version` left in ``.segflow/links/``: a
    link to a version that exists takes its place (the version was checked and committed),
    one to nothing goes; an older store's folder exchanged out is kept as a version."""
    links = local_path(bookkeeping_path(store, LINKS_DIR))
    for name in os.listdir(links) if os.path.isdir(links) else ():
        folder = os.path.join(links, name)
        for item_id in os.listdir(folder):
            entry = os.path.join(folder, item_id)
            if not os.path.islink(entry):
                _keep_legacy(store, item_id, entry)
            elif os.path.isdir(os.path.join(local_path(store), os.readlink(entry))):
                _place_link(store, entry, item_id)
        shutil.rmtree(folder, ignore_errors=True)


def record_commit(store: str, record: Mapping[str, Any], item_id: str) -> None:
    """Add an item's commit to its run's journal (``.segflow/runs/RUN/``), writing the
    run's ``run.json`` at its first commit."""
    from segflow.store.metadata import write_json

    run = bookkeeping_path(store, RUNS_DIR, _safe(str(record.get("run_id") or "run")))
    if not _exists(f"{run}/run.json"):
        keys = ("run_id", "run_name", "config_hash", "code_version")
        write_json(f"{run}/run.json", {k: record.get(k) for k in keys})
    version = str(record.get("version"))
    write_json(f"{run}/commits/{version}.json", {"item": item_id, "version": version})


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _exists(url: str) -> bool:
    from segflow.store.fs import fresh_fs

    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = fresh_fs(url)
    return bool(fs.exists(path))


def _read(url: str) -> dict[str, Any]:
    from segflow.store.commit import _read_json

    return _read_json(url) or {}


def _listdir(url: str) -> list[str]:
    from segflow.store.fs import fresh_fs

    if is_local(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = fresh_fs(url)
    found = fs.ls(path, detail=False) if fs.isdir(path) else []
    return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)


def read_history(store: str, item_id: str | None = None) -> list[dict[str, Any]]:
    """The store's commits, oldest first: per run (``item_id`` None) its id, flow run name,
    config hash, code version, first and last commit time and item count (and tags that
    name it); per version of ``item_id`` its commit record."""
    if item_id is not None:
        current = current_version(store, item_id)
        return [_version_row(store, item_id, v, current) for v in list_versions(store, item_id)]
    rows = []
    for run in _listdir(bookkeeping_path(store, RUNS_DIR)):
        folder = bookkeeping_path(store, RUNS_DIR, run)
        names = _listdir(f"{folder}/commits")
        commits = [c.removesuffix(".json") for c in names if c.endswith(".json")]
        if not commits:
            continue
        first, last = version_time(commits[0]), version_time(commits[-1])
        rows.append({**_read(f"{folder}/run.json"), "first": first, "last": last,
                     "items": len(commits)})  # fmt: skip
    return sorted(rows, key=lambda row: row["last"])


def _version_row(store: str, item_id: str, version: str, current: str | None) -> dict[str, Any]:
    from segflow.store.commit import COMMIT_ATTR

    node = _read(f"{version_path(store, item_id, version)}/zarr.json")
    record = dict(node.get("attributes", {}).get(COMMIT_ATTR) or {})
    latest = version == current
    return {**record, "item": item_id, "version": version, "latest": latest}


def run_commits(store: str, run: str) -> list[dict[str, Any]]:
    """The commits of the run ``run`` (id), oldest first: ``{"item", "version"}`` each."""
    folder = bookkeeping_path(store, RUNS_DIR, _safe(run), "commits")
    return [_read(f"{folder}/{name}") for name in _listdir(folder) if name.endswith(".json")]


def tag_store(store: str, name: str, *, as_of: str | dt.datetime | None = None) -> str:
    """Name the store's state now (or at ``as_of``) ``name``; returns the time it names.
    A tagged state's versions are kept by :func:`prune_versions` (``keep_tags``).

    Raises
    ------
    ValueError
        When ``name`` is empty, holds ``/`` or names a tag already.
    """
    from segflow.store.metadata import write_json

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"tag name {name!r}: expected a name without '/' or a leading '.'")
    url = bookkeeping_path(store, TAGS_DIR, f"{name}.json")
    if _exists(url):
        raise ValueError(f"tag {name!r} names a state of '{store}' already: choose another name")
    key = resolve_as_of(store, as_of) if as_of is not None else time_key(dt.datetime.now(dt.UTC))
    write_json(url, {"name": name, "time": key})
    return key


def read_tags(store: str) -> dict[str, str]:
    """Tag name -> the time (version key) it names."""
    folder = bookkeeping_path(store, TAGS_DIR)
    tags = (_read(f"{folder}/{n}") for n in _listdir(folder) if n.endswith(".json"))
    return {str(t["name"]): str(t["time"]) for t in tags if "name" in t and "time" in t}


def resolve_as_of(store: str, as_of: str | dt.datetime) -> str:
    """The time key ``as_of`` names: a datetime, a tag, a run id, a run's name (the time
    of its last commit) or an ISO time (a naive one is UTC).

    Raises
    ------
    ValueError
        When ``as_of`` is none of these.
    """
    if isinstance(as_of, dt.datetime):
        return time_key(as_of)
    tags = read_tags(store)
    if as_of in tags:
        return tags[as_of]
    for row in read_history(store):
        if as_of in (row.get("run_id"), row.get("run_name")):
            return time_key(row["last"])
    try:
        return time_key(dt.datetime.fromisoformat(as_of))
    except ValueError:
        raise ValueError(
            f"as_of {as_of!r}: not a tag, run id, run name or ISO time of store '{store}' "
            "(segflow history STORE lists its runs)"
        ) from None


def version_as_of(store: str, item_id: str, key: str) -> str | None:
    """The item's version at time ``key``: its newest kept version named before it."""
    older = [v for v in list_versions(store, item_id) if v[: len(key)] <= key]
    return older[-1] if older else None


def path_as_of(store: str, item_id: str, key: str) -> str | None:
    """The path of the item as it was at time ``key``, or None when it had no kept
    version then. An older store's item folder (not yet a version) counts from the time
    in its commit record."""
    from segflow.store.commit import read_commit

    version = version_as_of(store, item_id, key)
    if version is not None:
        return version_path(store, item_id, version)
    path = f"{str(store).rstrip('/')}/{item_id}"
    if is_local(store) and os.path.islink(local_path(path)):
        return None
    if not is_local(store) and current_version(store, item_id) is not None:
        return None  # versioned: an older in-place result was kept as a version
    committed = (read_commit(store, item_id) or {}).get("committed")
    if committed and time_key(dt.datetime.fromisoformat(str(committed))) <= key:
        return path
    return None


def items_as_of(store: str, key: str) -> list[str]:
    """The items that had a kept version at time ``key``."""
    from segflow.store.metadata import item_groups

    ids = set(_listdir(bookkeeping_path(store, VERSIONS_DIR))) | set(item_groups(store))
    return sorted(i for i in ids if path_as_of(store, i, key) is not None)


@dataclass(frozen=True)
class Retention:
    """Which old versions an item keeps (``output.retention``): its ``keep_last`` newest,
    those younger than ``keep_days`` days, and with ``keep_tags`` those a tag reads. The
    latest version is always kept."""

    keep_last: int = 2
    keep_days: float = 7.0
    keep_tags: bool = True


def write_retention(store: str, retention: Retention) -> None:
    """Record the policy a run applies (``.segflow/retention.json``), for ``segflow prune``."""
    from segflow.store.metadata import write_json

    write_json(bookkeeping_path(store, "retention.json"), asdict(retention))


def read_retention(store: str, **overrides: Any) -> Retention:
    """The policy the store's last run recorded (defaults when none), with ``overrides``
    that are not None."""
    recorded = _read(bookkeeping_path(store, "retention.json"))
    fields = {k: v for k, v in recorded.items() if k in Retention.__dataclass_fields__}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Retention(**fields)


def apply_retention(store: str, retention: Retention, run_id: str) -> int:
    """At a run's end (under its lock): record the policy and prune the versions of the
    items the run committed; returns how many versions went."""
    write_retention(store, retention)
    items = {str(c.get("item")) for c in run_commits(store, run_id) if c.get("item")}
    return prune_versions(store, plan_prune(store, retention, items=items)) if items else 0


def plan_prune(
    store: str,
    retention: Retention,
    *,
    items: Iterable[str] | None = None,
    now: dt.datetime | None = None,
) -> list[tuple[str, str]]:
    """The ``(item, version)`` pairs ``retention`` lets go, for ``items`` (default: every
    item with versions)."""
    cutoff = time_key((now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=retention.keep_days))
    tag_keys = list(read_tags(store).values()) if retention.keep_tags else []
    ids = _listdir(bookkeeping_path(store, VERSIONS_DIR)) if items is None else sorted(items)
    gone = []
    for item_id in ids:
        versions = list_versions(store, item_id)
        keep = set(versions[-max(retention.keep_last, 1) :])
        keep |= {v for v in versions if v >= cutoff}
        keep |= {version_as_of(store, item_id, key) for key in tag_keys} - {None}  # type: ignore[arg-type]
        keep.add(current_version(store, item_id) or versions[-1] if versions else "")
        gone += [(item_id, v) for v in versions if v not in keep]
    return gone


def prune_versions(store: str, pairs: Sequence[tuple[str, str]]) -> int:
    """Remove the versions ``pairs`` names (from :func:`plan_prune`, under the lock);
    returns how many went. A version still linked is never removed."""
    removed = 0
    for item_id, version in pairs:
        if version == current_version(store, item_id):
            continue
        if is_local(store):
            shutil.rmtree(version_path(store, item_id, version))
        else:
            from segflow.store.pointers import remove_tree

            remove_tree(version_path(store, item_id, version))
        removed += 1
    return removed

"""A collection run's bookkeeping, without Prefect: which items, under which ids, which
are skipped, how they are batched, one item run with a config's settings and its record,
and the run's summary.

An item is skipped only when its index row says ``done`` *and* its group's commit record
says the same input fingerprint, config hash and code version (:func:`select_items`); the
record is taken from the row where the group's ``zarr.json`` is unchanged since the row was
stamped (:mod:`segflow.store.stamps`), so an unchanged store is planned without opening its
groups. The
``segment`` flow (through its tasks) and the ``segflow run`` command decide with the same
functions; the command decides before it starts Prefect or Dask, so a run with nothing to
do costs no server or cluster start.

Items travel as small references, ``{"id", "path", "fingerprint", "pixels"}``, never as
arrays or open files: a task gets the references of its batch and opens each item itself.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.engine.item import ItemResult, code_version
from segflow.engine.rows import IndexRows, first_by_id, table_of_rows
from segflow.errors import StoreError
from segflow.io import Reader, assign_item_ids, unused_id
from segflow.store.commit import read_commit, stage_name
from segflow.store.lock import has_stale_lock, is_local
from segflow.store.pointers import plain_copy_changes

# An item's reference: {"id", "path", "fingerprint", "pixels"} (pixels: of the whole input,
# channels included; 0 for a file discovery could not open).
Item = dict[str, Any]

if TYPE_CHECKING:
    from segflow.config import SegflowConfig
    from segflow.engine.executor import Executor

# Items segmented at once (in a flow run: task runs in flight). Dask already spreads each
# item's blocks over every worker; a few items in flight hide the round trips between an
# item's phases.
ITEMS_IN_FLIGHT = 3


def item_references(
    readers: Sequence[Reader], failures: Sequence[tuple[str, str]]
) -> tuple[list[Item], list[dict[str, Any]]]:
    """``{"id", "path", "fingerprint"}`` for each readable item, and an index row (status
    ``failed``) for each file that could not be opened, with the id discovery would give it.
    """
    items = [
        {
            "id": r.info.id,
            "path": r.info.path,
            "fingerprint": r.info.fingerprint,
            "pixels": math.prod(r.info.shape),
        }
        for r in readers
    ]
    return items, _failed_rows(readers, failures)


def item_columns(
    readers: Sequence[Reader], failures: Sequence[tuple[str, str]]
) -> tuple[Any, list[dict[str, Any]]]:
    """:func:`item_references` as one ``pyarrow.Table`` (columns ``id``, ``path``,
    ``fingerprint``, ``pixels``), not a dict per item, and the failed rows."""
    import pyarrow as pa

    text = pa.large_string()
    items = pa.table(
        {
            "id": pa.array((r.info.id for r in readers), text, size=len(readers)),
            "path": pa.array((r.info.path for r in readers), text, size=len(readers)),
            "fingerprint": pa.array((r.info.fingerprint for r in readers), text, size=len(readers)),
            "pixels": pa.array(
                (math.prod(r.info.shape) for r in readers), pa.int64(), size=len(readers)
            ),
        }
    )
    return items, _failed_rows(readers, failures)


def _failed_rows(
    readers: Sequence[Reader], failures: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    if not failures:  # the ids below are for the files that could not be opened only
        return []
    paths = sorted([r.info.path for r in readers] + [path for path, _ in failures])
    ids = dict(zip(paths, assign_item_ids(paths), strict=True))
    return [
        ItemResult(id=ids[path], source=path, status="failed", error=message).as_row()
        for path, message in failures
    ]


def index_rows(store: str) -> list[dict[str, Any]]:
    """The rows of ``STORE/index.parquet`` and its pending records (none for a new store),
    as plain dicts (missing values as None)."""
    rows = IndexRows(index_as_table(store))
    return row_dicts(rows.table) if not rows._encoded() else list(rows)


def index_as_table(store: str) -> Any:
    """The rows :func:`index_rows` gives, as one ``pyarrow.Table`` (a column of values of
    mixed kinds, from records, as JSON text: :func:`segflow.engine.rows.table_of_rows`)."""
    import pandas as pd
    import pyarrow as pa
    from pandas.api.types import is_scalar

    from segflow.store.index import index_table, read_index

    try:  # the compacted index without a frame of Python strings and its copies
        table = index_table(store)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        table = None  # a column pandas reads another way: as below
    if table is not None:
        return table
    frame = read_index(store)
    try:  # through Arrow: nulls and NaN come out as None, a column at a time
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of mixed kinds, from records
        pass
    return table_of_rows(
        [
            {
                str(key): (None if is_scalar(value) and pd.isna(value) else value)
                for key, value in row.items()
            }
            for row in frame.to_dict(orient="records")
        ]
    )


def row_dicts(table: Any) -> list[dict[str, Any]]:
    """``table.to_pylist()``, with one Python string for each distinct text of a column
    that repeats (status, shape, hashes, code version: the same few values in every row),
    not one per row: some 300 bytes less per row of a large index.

    Examples
    --------
    >>> import pyarrow as pa
    >>> rows = row_dicts(pa.table({"id": ["a", "b"], "status": ["done", "done"]}))
    >>> rows == [{"id": "a", "status": "done"}, {"id": "b", "status": "done"}]
    True
    >>> rows[0]["status"] is rows[1]["status"]
    True
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    rows: list[dict[str, Any]] = table.to_pylist()
    for name, column in zip(table.column_names, table.columns, strict=True):
        text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if text and pc.count_distinct(column).as_py() * 2 <= len(rows):
            once: dict[str, str] = {}
            for row in rows:  # a value replaced in place: the dicts keep their size
                if (value := row[name]) is not None:
                    row[name] = once.setdefault(value, value)
    return rows


# Commit records read at once from an object store: each is one small GET, some 20-50 ms
# of waiting, so a 100,000-item store's scheduled run would wait most of an hour one by one.
REMOTE_READERS = 32


def read_commits(
    store: str, item_ids: Sequence[str], *, keys: Sequence[str] | None = None
) -> dict[str, dict[str, Any] | None]:
    """The commit record of each item's group (None where there is none); from an object
    store, :data:`REMOTE_READERS` at a time. With ``keys``, each record keeps those only
    (a whole record is some kilobytes: a store's worth of them is not held)."""
    if "://" not in store and not Path(store).exists():
        return dict.fromkeys(item_ids)

    def read(item_id: str) -> dict[str, Any] | None:
        record = read_commit(store, item_id)
        if record is None or keys is None:
            return record
        return {key: record.get(key) for key in keys}

    return dict(zip(item_ids, _each(store, read, item_ids), strict=True))


def stamps_hold(store: str, rows: Any) -> np.ndarray:
    """Which of a batch of done ``rows`` (a ``pyarrow.Table`` with ``id`` and
    ``commit_stamp``) still speak for their groups: the group's ``zarr.json`` is the file
    the row was stamped with (:mod:`segflow.store.stamps`: a ``stat`` per item locally, a
    HEAD on an object store; no read). Their records say what the rows say; every other
    row (no stamp, or another file now) has its record read. Compared on columns: no row
    becomes a dict here."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from segflow.store.stamps import group_stamp, local_stamps

    wanted = text_column(rows, "commit_stamp")
    asked = np.flatnonzero(pc.fill_null(pc.not_equal(wanted, ""), False).to_numpy(False))
    ids = [str(i) for i in text_column(rows, "id").take(pa.array(asked)).to_pylist()]
    if is_local(store):
        now = local_stamps(store, ids)
    else:
        now = _each(store, lambda i: group_stamp(store, i), ids)
    same = pc.equal(wanted.take(pa.array(asked)), pa.array(now, pa.large_string()))
    hold = np.zeros(len(rows), dtype=bool)
    hold[asked] = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    return hold


def _each(store: str, call: Callable[[str], Any], item_ids: Sequence[str]) -> list[Any]:
    """``call`` on each id, in order: in a loop locally, :data:`REMOTE_READERS` at a time
    from an object store (each is a round trip there)."""
    if "://" not in store or len(item_ids) < 2:
        return [call(i) for i in item_ids]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(REMOTE_READERS, len(item_ids))) as pool:
        return list(pool.map(call, item_ids))


def keep_recorded_ids(
    items: list[Item],
    failed_rows: list[dict[str, Any]],
    index_rows: list[dict[str, Any]],
) -> tuple[list[Item], list[dict[str, Any]]]:
    """Give every item the id the store's index recorded for its source.

    Discovery names items by file stem, prefixed with folders only where stems collide, so a
    file joining the collection can rename others (``a/tile.tif`` is ``tile`` until
    ``b/tile.tif`` appears, then ``a_tile``): on the next scheduled run its output would be
    redone under a new name. Here an id in the store stays with its source, and is never
    given to another one (a new item whose id is taken gets ``_2``, ``_3``, ...). A
    recorded id that is one of the store's own names (``index.parquet``: an earlier segflow
    let an image take it) is not kept: the item gets its new, unreserved id.
    """
    import pyarrow as pa

    paths = [item["path"] for item in items]
    table = pa.table(
        {
            "id": pa.array([str(item["id"]) for item in items], pa.large_string()),
            "path": pa.array(paths, pa.large_string()),
        }
    )
    index = table_of_rows([{"id": r["id"], "source": r.get("source")} for r in index_rows])
    renamed, failed = recorded_item_ids(table, failed_rows, index)
    ids = renamed.column("id").to_pylist()
    return [{**item, "id": i} for item, i in zip(items, ids, strict=True)], failed


def recorded_item_ids(
    items: Any, failed_rows: list[dict[str, Any]], index: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """:func:`keep_recorded_ids` with ``items`` and the ``index`` as ``pyarrow.Table`` s
    (each item's ``path`` looked up among the index's sources on columns): the same ids.
    The index's ids become a Python set only when a new id collides with one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from segflow.store.names import reserved_mask

    text = pa.large_string()
    ids, sources = text_column(index, "id"), text_column(index, "source")
    usable = np.array(pc.fill_null(pc.not_equal(sources, ""), False), dtype=bool)
    keep = pa.array((usable & ~reserved_mask(ids))[::-1].copy())  # a source's last row wins
    recorded_sources, recorded = sources[::-1].filter(keep), ids[::-1].filter(keep)

    def lookup(paths: Any) -> Any:  # the recorded id of each path, else null
        found = recorded.take(pc.index_in(paths, value_set=recorded_sources))
        return pc.if_else(pc.fill_null(pc.equal(found, ""), False), pa.scalar(None, text), found)

    found = lookup(text_column(items, "path"))
    fresh = np.array(pc.is_null(found), dtype=bool)
    failed_found = lookup(pa.array([row["source"] for row in failed_rows], text)).to_pylist()
    unrecorded = [row["id"] for row, i in zip(failed_rows, failed_found, strict=True) if not i]
    asked = pa.concat_arrays(
        [text_column(items, "id").filter(pa.array(fresh)), pa.array(unrecorded, text)]
    )
    taken: set[str] = set()

    def take_index_ids() -> None:
        taken.update(str(i) for i in ids.to_pylist() if i is not None)

    full = bool(pc.any(pc.is_in(asked, value_set=ids)).as_py())  # a new id is a recorded one
    if full:
        take_index_ids()

    def unused(item_id: str) -> str:
        nonlocal full
        if not full and item_id in taken:  # its _2, _3 ... may be recorded ones
            take_index_ids()
            full = True
        return unused_id(item_id, taken)

    given = [unused(str(i)) for i in asked.to_pylist()]
    n_fresh = int(fresh.sum())
    if n_fresh:
        found = pc.replace_with_mask(found, pa.array(fresh), pa.array(given[:n_fresh], text))
    new_ids = iter(given[n_fresh:])
    failed = [
        {**row, "id": i or next(new_ids)} for row, i in zip(failed_rows, failed_found, strict=True)
    ]
    return items.set_column(items.column_names.index("id"), "id", found), failed


def select_items(
    items: list[Item],
    index_rows: list[dict[str, Any]],
    *,
    config_hash: str,
    overwrite: bool,
    commits: Mapping[str, Mapping[str, Any] | None],
    reuse_rows: bool = False,
) -> tuple[list[Item], list[dict[str, Any]]]:
    """Split ``items`` into those to segment and the index rows of those to skip.

    An item is skipped when its index row says ``done`` with the same (non-empty)
    fingerprint, config hash and code version, and its group's commit record (``commits``,
    by id: :func:`segflow.store.commit.read_commit`) says the same: a ``done`` row over a
    group that was never committed, was interrupted or is gone is redone. Never skipped
    with ``overwrite``. With ``reuse_rows`` (rows the caller drops afterwards) a skipped
    item's row is marked ``skipped`` in place, not copied. The rule is
    :func:`skip_mask`'s, which :func:`plan_items` applies to columns.
    """
    import pyarrow as pa

    done = {row["id"]: row for row in index_rows if row.get("status") == "done"}
    keys = ("id", "fingerprint", "config_hash", "code_version", "status")
    table = pa.table({k: pa.array([_text(row.get(k)) for row in done.values()]) for k in keys})
    columns = pa.table({k: [_text(item.get(k)) for item in items] for k in ("id", "fingerprint")})
    skip, _ = skip_mask(
        columns, table, config_hash=config_hash, overwrite=overwrite, commits_of=lambda _: commits
    )
    todo, skipped = [], []
    for item, skipped_here in zip(items, skip, strict=True):
        if not skipped_here:
            todo.append(item)
        elif reuse_rows:
            done[item["id"]]["status"] = "skipped"
            skipped.append(done[item["id"]])
        else:
            skipped.append({**done[item["id"]], "status": "skipped"})
    return todo, skipped


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None  # another kind never equals a text


# Done rows whose commit records are looked up at once (a batch of small dicts at a time).
COMMIT_BATCH = 10_000
CommitsOf = Callable[[list[dict[str, Any]]], Mapping[str, Mapping[str, Any] | None]]


def skip_mask(
    items: Any,
    done: Any,
    *,
    config_hash: str,
    overwrite: bool,
    commits_of: CommitsOf,
    held_of: Callable[[Any], np.ndarray] | None = None,
) -> tuple[np.ndarray, Any]:
    """Which of ``items`` (a ``pyarrow.Table`` with ``id`` and ``fingerprint``) are
    skipped, as a boolean array, and for each item its row's position in ``done`` (the
    ``done`` index rows, unique ids; null where it has none): the rule of
    :func:`select_items`, on columns. Of a batch of done rows that pass the row's own test,
    ``held_of`` (a ``pyarrow.Table`` of them: ``id``, fingerprint, config hash, code
    version, commit stamp) says which rows' stamps still hold (:func:`stamps_hold`: their
    records say what the rows say); ``commits_of`` gives the commit records (by id) of the
    others, as dicts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    skip = np.zeros(len(items), dtype=bool)
    pos = pc.index_in(text_column(items, "id"), value_set=text_column(done, "id"))
    if overwrite or not len(items) or not len(done):
        return skip, pos
    fingerprint = text_column(items, "fingerprint")
    rows = done.take(pc.fill_null(pos, 0))  # the row of each item (row 0 where none)

    def same(name: str, value: Any) -> Any:
        return pc.fill_null(pc.equal(text_column(rows, name), value), False)

    agree = pc.and_(pc.is_valid(pos), pc.fill_null(pc.not_equal(fingerprint, ""), False))
    agree = pc.and_(agree, same("fingerprint", fingerprint))
    agree = pc.and_(agree, same("config_hash", pa.scalar(config_hash, pa.large_string())))
    agree = pc.and_(agree, same("code_version", pa.scalar(code_version(), pa.large_string())))
    candidates = np.flatnonzero(agree.to_numpy(zero_copy_only=False))
    keys = ["id", "commit_stamp", "commit_id", *SKIP_ROW_KEYS]
    present = [k for k in keys if k in rows.column_names]
    for first in range(0, len(candidates), COMMIT_BATCH):
        chunk = candidates[first : first + COMMIT_BATCH]
        table = rows.select(present).take(pa.array(chunk))
        held = held_of(table) if held_of is not None else np.zeros(len(chunk), dtype=bool)
        skip[chunk[held]] = True
        chunk, batch = chunk[~held], table.filter(pa.array(~held)).to_pylist()
        commits = commits_of(batch)
        for k, row in zip(chunk, batch, strict=True):
            commit = commits.get(row["id"]) or {}
            skip[k] = all(commit.get(key) == row.get(key) for key in SKIP_ROW_KEYS)
    return skip, pos


# What a commit record must say as the row does (segflow.store.stamps.SKIP_KEYS).
SKIP_ROW_KEYS = ("fingerprint", "config_hash", "code_version")


def text_column(table: Any, name: str) -> Any:
    """Column ``name`` of ``table`` as one ``large_string`` Arrow array: nulls where the
    table has no such column or it holds something other than text."""
    import pyarrow as pa

    if name not in table.column_names:
        return pa.nulls(len(table), pa.large_string())
    column = table.column(name).combine_chunks()
    if pa.types.is_large_string(column.type):
        return column
    if pa.types.is_string(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.large_string())
    return pa.nulls(len(table), pa.large_string())


@dataclass(frozen=True)
class ItemPlan:
    """What a run of one collection does: segment ``todo``, record ``failed`` (files that
    cannot be opened), skip ``skipped`` (their index rows, status ``skipped``, held as
    Arrow columns: :class:`segflow.engine.rows.IndexRows`; a list of dicts given here is
    turned into one); ``stale_lock`` when a dead run's lock is to be taken over (its
    records compacted); ``notes``: discovery's lines on files left out or renamed on
    purpose; ``plain_copy_changes`` when an object store's plain copies are to follow a
    changed ``output.plain_copy``."""

    todo: list[Item]
    skipped: IndexRows
    failed: list[dict[str, Any]]
    stale_lock: bool
    notes: tuple[str, ...] = ()
    plain_copy_changes: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.skipped, IndexRows):
            object.__setattr__(self, "skipped", IndexRows(self.skipped))

    @property
    def nothing_to_do(self) -> bool:
        return not (self.todo or self.failed or self.stale_lock or self.plain_copy_changes)

    def work(self) -> list[Item]:
        """The items to run, in path order: ``todo`` and each file that could not be opened,
        which is tried like any item and fails there with the same reason (so it is a failed
        item of the run, a Failed task run in the UI, not only a line of the discovery log).
        """
        unreadable = [
            {"id": row["id"], "path": row["source"], "fingerprint": "", "pixels": 0}
            for row in self.failed
        ]
        return sorted(self.todo + unreadable, key=lambda item: str(item["path"]))

    def stages(self, config_hash: str) -> list[str]:
        """The staging names of ``todo`` (:func:`segflow.store.commit.stage_name`): what a
        killed run left staged for these items is kept, to resume."""
        version = code_version()
        return [stage_name(i["id"], config_hash, i["fingerprint"], version) for i in self.todo]


def plan_items(
    readers: Sequence[Reader],
    failures: Sequence[tuple[str, str]],
    store: str,
    *,
    config_hash: str,
    overwrite: bool,
    item_filter: Sequence[str] | None = None,
    config_name: str | None = None,
    allow_other_configs: bool = False,
    notes: Sequence[str] = (),
    plain_copy: bool = True,
) -> ItemPlan:
    """Apply the skip rule to a discovered collection (``readers``, unreadable ``failures``)
    against ``store``, reading only its index, commit records and lock. With
    ``item_filter`` (glob patterns on the ids the items have in the store), items and
    unreadable files that match none are left out altogether. With ``config_name``, a store
    whose index records items of another config is refused (:func:`check_config_owner`).
    ``plain_copy`` (``output.plain_copy``) is checked against what an object store's runs
    recorded (one small read). The items and the index are held as Arrow columns: the
    plan's ``todo`` are dicts, its ``skipped`` rows stay columns.

    Examples
    --------
    >>> plan = plan_items([], [], "no_such_store.zarr", config_hash="h", overwrite=False)
    >>> plan.nothing_to_do
    True
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    items, failed = item_columns(readers, failures)
    index = index_as_table(store)
    if config_name is not None:
        counts = config_counts(index)
        check_config_owner(store, counts, config_name=config_name, allow=allow_other_configs)
    items, failed = recorded_item_ids(items, failed, index)
    if item_filter:
        ids = text_column(items, "id")
        keep = [_matches(str(i), item_filter) for i in ids.to_pylist()]
        items = items.filter(pa.array(keep, pa.bool_()))
        failed = [r for r in failed if _matches(r["id"], item_filter)]
    done = index.filter(pc.fill_null(pc.equal(text_column(index, "status"), "done"), False))
    del index  # only the done rows matter from here on
    skip, pos = skip_mask(
        items,
        done,
        config_hash=config_hash,
        overwrite=overwrite,
        commits_of=lambda rows: read_commits(
            store, [str(r["id"]) for r in rows], keys=SKIP_ROW_KEYS
        ),
        held_of=lambda rows: stamps_hold(store, rows),
    )
    todo: list[Item] = items.filter(pa.array(~skip)).to_pylist()
    skipped = done.take(pc.filter(pos, pa.array(skip)))
    if "status" in skipped.column_names:  # their index rows, as the run's summary lists them
        status = pa.repeat(pa.scalar("skipped", pa.large_string()), len(skipped))
        skipped = skipped.set_column(skipped.column_names.index("status"), "status", status)
    changes = plain_copy_changes(store, plain_copy)
    return ItemPlan(todo, IndexRows(skipped), failed, has_stale_lock(store), tuple(notes), changes)


def check_config_owner(
    store: str,
    rows: Sequence[Mapping[str, Any]] | Mapping[str, int],
    *,
    config_name: str,
    allow: bool = False,
) -> None:
    """Refuse to let config ``config_name`` write into ``store`` when its index ``rows``
    (or their counts by config name, :func:`config_counts`) record items of another config
    (rows written before segflow recorded the config's name
    belong to none). Two configs on one store would replace each other's items silently, and
    ``evaluate`` would score one config's items under the other's name.

    Raises
    ------
    StoreError
        Naming the store, the other config and the setting that allows it (``allow``).

    Examples
    --------
    >>> rows = [{"config_name": "nuclei"}, {"config_name": None}]
    >>> check_config_owner("out.zarr", rows, config_name="nuclei")  # its own: fine
    >>> try:
    ...     check_config_owner("out.zarr", rows, config_name="unet")
    ... except StoreError as error:
    ...     print(str(error).split(";")[0])
    store 'out.zarr' holds 1 item made by config 'nuclei'
    """
    if allow:
        return
    if isinstance(rows, Mapping):
        names: Mapping[str, int] = rows
    else:
        names = Counter(str(row["config_name"]) for row in rows if row.get("config_name"))
    others = {name: n for name, n in names.items() if name != config_name}
    if not others:
        return
    made = ", ".join(
        f"{n} item{'s' if n > 1 else ''} made by config {other!r}" for other, n in others.items()
    )
    raise StoreError(
        f"store {store!r} holds {made}; config {config_name!r} would replace or mix with "
        f"them: choose another output.store, or --set output.allow_other_configs=true to let "
        f"both write into it"
    )


def config_counts(index: Any) -> dict[str, int]:
    """How many rows of ``index`` (a ``pyarrow.Table``) each config made, by its name (rows
    without one left out), in the order the names first appear: what
    :func:`check_config_owner` needs, without a dict per row."""
    import pyarrow.compute as pc

    names = text_column(index, "config_name")
    names = names.filter(pc.fill_null(pc.not_equal(names, ""), False))
    counts = pc.value_counts(names)
    return {
        str(v): int(n)
        for v, n in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        )
    }


def _matches(item_id: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(item_id, pattern) for pattern in patterns)


def plan_collection(
    cfg: SegflowConfig,
    *,
    overwrite: bool | None = None,
    item_filter: Sequence[str] | None = None,
    notes: list[str] | None = None,
) -> ItemPlan:
    """Discover ``cfg``'s collection and plan its run (:func:`plan_items`); ``overwrite``
    defaults to the config's ``output.overwrite``. ``notes`` receives discovery's notes on
    files left out or renamed on purpose (a DICOM folder's RTSTRUCT, a segflow store in the
    input folder, say).

    A plan the command made for the same config, overwrite and filter
    (:func:`hand_over_plan`) is taken instead, once: the collection is discovered once per
    run (a minute at 100,000 items); a run started elsewhere (a deployment) plans here.
    """
    from segflow.engine.pipeline import collection_notes
    from segflow.io import discover_items

    if (handed := _HANDED.pop(_plan_key(cfg, overwrite, item_filter), None)) is not None:
        if notes is not None:
            notes.extend(handed.notes)
        return handed
    found: list[str] = []
    readers, failures = discover_items(
        cfg.input.path, notes=found, store=cfg.output.store, **cfg.input.reader_options()
    )
    found += collection_notes(cfg.pipeline, [reader.info for reader in readers])
    if notes is not None:
        notes.extend(found)
    return plan_items(
        readers,
        failures,
        cfg.output.store,
        config_hash=cfg.config_hash(),
        overwrite=cfg.output.overwrite if overwrite is None else overwrite,
        item_filter=item_filter,
        config_name=cfg.name,
        allow_other_configs=cfg.output.allow_other_configs,
        notes=found,
        plain_copy=cfg.output.plain_copy,
    )


# Plans the command made for the configs it runs next in this process (see plan_collection).
_HANDED: dict[tuple[Any, ...], ItemPlan] = {}


def _plan_key(
    cfg: SegflowConfig, overwrite: bool | None, item_filter: Sequence[str] | None
) -> tuple[Any, ...]:
    overwrite = cfg.output.overwrite if overwrite is None else overwrite
    where = (
        cfg.input.path,
        cfg.output.store,
        json.dumps(cfg.input.reader_options(), sort_keys=True),
    )
    return (cfg.name, cfg.config_hash(), *where, overwrite, tuple(item_filter or ()))


def hand_over_plan(cfg: SegflowConfig, plan: ItemPlan) -> None:
    """Keep ``plan`` (made for ``cfg`` as it stands, no filter) for the next
    :func:`plan_collection` of the same config in this process."""
    _HANDED[_plan_key(cfg, None, None)] = plan


def forget_plans() -> None:
    """Drop every plan handed over and not taken (a run that stopped before its flow)."""
    _HANDED.clear()


# Automatic batching (``run.batch`` unset). A task run costs Prefect some 80-150 ms here (its
# API calls and logs), as much as a tiny item's whole work: a collection of many small
# tiles puts several items in one task run, so task runs grow with the work, not with the
# file count. Small collections keep one task run per item (the clearest view in the UI).
BATCH_FROM_ITEMS = 100
BATCH_PIXELS = 2**24  # about this much input per automatic batch (a 4096^2 tile is one item)
BATCH_MAX = 64
# An automatic batch leaves each of the run's slots at least this many batches, so progress
# moves and the last batches do not run alone.
BATCHES_PER_SLOT = 8


def batch_size(items: Sequence[Item], setting: int | None = None) -> int:
    """Items per task run: ``setting`` (``run.batch``) when given; else 1 below
    :data:`BATCH_FROM_ITEMS` items, and otherwise as many items as make about
    :data:`BATCH_PIXELS` of input (by the median item), at most :data:`BATCH_MAX`, and few
    enough to give every one of the :data:`ITEMS_IN_FLIGHT` slots
    :data:`BATCHES_PER_SLOT` batches.

    Examples
    --------
    >>> tiles = [{"pixels": 256 * 256}] * 10_000
    >>> batch_size(tiles), batch_size(tiles[:99]), batch_size(tiles[:600]), batch_size(tiles, 5)
    (64, 1, 25, 5)
    >>> batch_size([{"pixels": 4096 * 4096}] * 10_000)
    1
    """
    if setting is not None:
        return setting
    if len(items) < BATCH_FROM_ITEMS:
        return 1
    pixels = int(np.median([max(int(item["pixels"]), 1) for item in items]))
    by_size = BATCH_PIXELS // pixels
    by_count = len(items) // (ITEMS_IN_FLIGHT * BATCHES_PER_SLOT)
    return max(1, min(by_size, by_count, BATCH_MAX))


def batches(items: Sequence[Item], size: int, *, taper: bool = False) -> list[list[Item]]:
    """``items`` cut into consecutive batches of ``size`` (the last one may be shorter).

    With ``taper``, the batches shrink towards the end of the run (each at most the
    remaining items over twice the :data:`ITEMS_IN_FLIGHT` slots, down to one item), so that
    no slot is left running one last long batch while the others wait: fixed batches of 50
    small tiles left some 10 s of idle slots at the end of a 1,200-item run here.

    Examples
    --------
    >>> [[i["id"] for i in b] for b in batches([{"id": c} for c in "abcde"], 2)]
    [['a', 'b'], ['c', 'd'], ['e']]
    >>> [len(b) for b in batches([{"id": i} for i in range(40)], 8, taper=True)]
    [7, 6, 5, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    """
    cut, start = [], 0
    while start < len(items):
        remaining = len(items) - start
        n = min(size, math.ceil(remaining / (2 * ITEMS_IN_FLIGHT))) if taper else size
        cut.append(list(items[start : start + n]))
        start += n
    return cut


ItemProgress = Callable[[str, str, int, int], None]  # (item id, phase, done, total)


def run_item(
    cfg: SegflowConfig,
    item: Item,
    *,
    executor: Executor,
    run_id: str,
    run_name: str | None = None,
    config_hash: str | None = None,
    progress: ItemProgress | None = None,
    quicklook: bool = False,
) -> tuple[dict[str, Any], Reader | None]:
    """Open and segment one item with ``cfg``'s settings, record its result in the store's
    index records, and report its end to ``progress``; return its index row and its reader
    (None when it could not be opened).

    Never raises for a bad item: the row says ``failed`` and its ``error`` names the item and
    the reason. An item not started because the run was asked to stop, or stopped midway,
    says ``interrupted`` and is not recorded (its previous result stays as it was). With
    ``run.item_timeout``, an item still waiting for its blocks after that many seconds has
    them cancelled and fails. With ``quicklook``, the item's quick look
    (``run.quicklook_size``) is written into it before its commit. Call while holding the
    store's lock. Once another run took the store's lock over (:func:`segflow.store.lock.
    lock_lost`), each item fails with that line, unrecorded: the store is the other run's.
    """
    from segflow.engine.budget import check_item_budget
    from segflow.engine.interrupt import item_deadline, stop_requested
    from segflow.engine.item import segment_item
    from segflow.io import open_item
    from segflow.store.index import append_records
    from segflow.store.lock import lock_lost
    from segflow.store.stamps import stamp_commit

    item_id, path = str(item["id"]), str(item["path"])
    report = progress or (lambda *_: None)
    reader = None
    lost = lock_lost(cfg.output.store)  # another run took the store over: write nothing
    if (reason := stop_requested()) is not None:  # queued when the run was asked to stop
        row = ItemResult(
            id=item_id, source=path, status="interrupted", error=f"not started ({reason})"
        ).as_row()
    elif lost is not None:
        row = ItemResult(id=item_id, source=path, status="failed", error=lost).as_row()
    else:
        with item_deadline(cfg.run.item_timeout):
            try:
                reader = open_item(path, item_id, **cfg.input.reader_options())
                # Before anything of it is planned or read: a header that lies fails here.
                check_item_budget(
                    reader.info, cfg.blocks.shape, max_item_bytes=cfg.run.max_item_bytes
                )
            except Exception as error:  # unreadable, too large, or changed since discovery
                row = ItemResult(
                    id=item_id, source=path, status="failed", error=_named(error, item_id, path)
                ).as_row()
            else:
                output = cfg.output
                row = segment_item(
                    reader,
                    cfg.pipeline,
                    store=output.store,
                    block_shape=cfg.blocks.shape,
                    executor=executor,
                    chunks=output.chunks,
                    shards=output.shards,
                    config_hash=cfg.config_hash() if config_hash is None else config_hash,
                    output=output.model_dump(),  # what its output writers read
                    quicklook=cfg.run.quicklook_size if quicklook else None,
                    progress=lambda phase, done, total: report(item_id, phase, done, total),
                    run_id=run_id,
                    run_name=run_name,
                    resumable=True,
                ).as_row()
    row["config_name"] = cfg.name
    if row["status"] == "done":  # lets the next run skip it without opening its group
        row.update(stamp_commit(cfg.output.store, row))
    if row["status"] != "interrupted" and lock_lost(cfg.output.store) is None:
        # After the item's data is committed, durable at once: a killed run keeps the
        # records of what it finished.
        append_records(cfg.output.store, run_id, [row])
    report(item_id, row["status"], 1, 1)
    return row, reader


def check_item_fit(cfg: SegflowConfig, info: Any) -> str | None:
    """What stops one item before any of it runs, as one line naming it (None: nothing):
    its size against ``run.max_item_bytes``, the pipeline compiled for it and every output
    writer's pre-run check (:func:`segflow.engine.item.check_outputs`), the same checks
    its own run makes first."""
    from segflow.engine.budget import check_item_budget
    from segflow.engine.item import check_outputs, plan_for_item
    from segflow.errors import SegflowError

    try:  # its message names the item
        check_item_budget(info, cfg.blocks.shape, max_item_bytes=cfg.run.max_item_bytes)
    except SegflowError as error:
        return str(error)
    try:
        check_outputs(plan_for_item(cfg.pipeline, info), info, cfg.output.model_dump())
    except (SegflowError, ValueError) as error:
        return f"item {info.id!r} ({info.path}): {error}"
    return None


def unfit_items(cfg: SegflowConfig, infos: Sequence[Any]) -> list[str]:
    """:func:`check_item_fit`'s lines for the items ``infos`` when none of them fits (the
    config is wrong, not the items: refused before a run starts), else ``[]`` (an unfit
    item among fitting ones fails alone in the run). Items are checked until one fits,
    so a fitting collection costs one check."""
    lines = []
    for info in infos:
        line = check_item_fit(cfg, info)
        if line is None:
            return []
        lines.append(line)
    return lines


def _named(error: Exception, item_id: str, path: str) -> str:
    """``error``'s message, prefixed with the item and its path unless it names one."""
    text = str(error)
    if item_id in text or path in text:
        return text
    return f"item {item_id!r} ({path}): {type(error).__name__}: {error}"


def open_line(store: str, item_id: str, *, plain_copy: bool = True) -> str:
    """The Python expression that opens one item of the output: its group as a Zarr
    hierarchy of its own, with its consolidated metadata (one metadata read); without a
    plain copy on an object store (``output.plain_copy: false``) through segflow, which
    reads the item's pointer. The expression starts with the module to import.

    Examples
    --------
    >>> open_line("s3://b/out.zarr", "tile", plain_copy=False)
    "segflow.open_store('s3://b/out.zarr')['tile']"
    """
    if not plain_copy and not is_local(store):
        return f"segflow.open_store({store.rstrip('/')!r})[{item_id!r}]"
    return f"xarray.open_zarr({store.rstrip('/') + '/' + item_id!r})"


# Rows and failures a run's summary lists at most (the rest are in the store's index), so
# the persisted flow result stays small whatever the collection's size.
SUMMARY_ROWS = 1000


def run_summary(
    name: str,
    store: str,
    rows: list[dict[str, Any]],
    *,
    skipped: IndexRows | None = None,
    plain_copy: bool = True,
) -> dict[str, Any]:
    """The small, JSON-serialisable summary a run returns (and the command prints), from its
    index ``rows`` and the rows of the items it ``skipped`` (a plan's
    :attr:`ItemPlan.skipped`, in id order, as columns: the same summary as with them
    among ``rows``, sorted by id, without a dict per skipped item).

    ``rows`` and ``failures`` list at most :data:`SUMMARY_ROWS` items each (in id order);
    ``rows_omitted`` and ``failures_omitted`` count the others, which the store's index has.
    ``made`` says what the done items hold, over all of them (:func:`made_line`).
    """
    more = skipped if skipped is not None else IndexRows()
    statuses = ("done", "failed", "skipped", "interrupted")
    counts = {s: sum(r["status"] == s for r in rows) for s in statuses}
    counts["skipped"] += len(more)
    opened = next((r["id"] for r in rows if r["status"] in ("done", "skipped")), None)
    if more and (opened is None or str(more.head(1)[0]["id"]) < str(opened)):
        opened = more.head(1)[0]["id"]
    failures = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    return {
        "name": name,
        "store": store,
        "index": f"{str(store).rstrip('/')}/index.parquet",
        **counts,
        "failures": failures[:SUMMARY_ROWS],
        "failures_omitted": max(len(failures) - SUMMARY_ROWS, 0),
        "made": made_line(rows, more),
        "open": open_line(store, opened, plain_copy=plain_copy) if opened is not None else None,
        "rows": [_plain(row) for row in first_by_id(rows, more, SUMMARY_ROWS)],
        "rows_omitted": max(len(rows) + len(more) - SUMMARY_ROWS, 0),
    }


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with numpy scalars as Python numbers (JSON has no numpy types)."""
    return {
        key: value.item() if isinstance(value, np.generic) else value for key, value in row.items()
    }


def made_line(rows: Sequence[dict[str, Any]], skipped: IndexRows | None = None) -> str:
    """What the done (or already done) items hold: their objects, or for masks and class
    maps the share of foreground pixels (the mean over items); "" when nothing is done.
    ``skipped``: more such rows, as columns (:func:`run_summary`)."""
    from segflow.engine.item import describe_output

    rows = [r for r in rows if r["status"] in ("done", "skipped")]
    more = skipped if skipped is not None else IndexRows()
    n = len(rows) + len(more)
    if not n:
        return ""
    if n == 1:
        row = rows[0] if rows else more.head(1)[0]
        return describe_output(row.get("object_count"), row.get("foreground_fraction"))
    counts = [int(r["object_count"]) for r in rows if r.get("object_count") is not None]
    fractions = [
        float(r["foreground_fraction"]) for r in rows if r.get("foreground_fraction") is not None
    ]
    more_counts = _numbers(more, "object_count")
    if len(counts) + len(more_counts) == n:
        objects = sum(counts) + int(np.trunc(more_counts).astype(np.int64).sum())
        return f"{describe_output(objects, None)} in {n} items"
    more_fractions = _numbers(more, "foreground_fraction")
    if len(fractions) + len(more_fractions) == n:
        share = _sum_by_id(rows, more) if more else sum(fractions)
        return f"{describe_output(None, share / n)} (mean of {n} items)"
    return ""


def _numbers(rows: IndexRows, name: str) -> np.ndarray:
    """The values of column ``name`` that are not null, as float64 (none: no such column)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = rows.column(name)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return np.zeros(0)
    return np.asarray(pc.drop_null(column).cast(pa.float64()).to_numpy(), dtype=np.float64)


def _sum_by_id(rows: Sequence[dict[str, Any]], more: IndexRows) -> float:
    """The foreground fractions of ``rows`` and ``more`` added one after another in id
    order (``rows`` first among equal ids), as ``sum`` over the rows sorted by id adds them:
    the same float to the last bit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.concat_arrays([pa.array([str(r["id"]) for r in rows], pa.large_string()), more.ids()])
    mine = [float(r["foreground_fraction"]) for r in rows]
    values = np.concatenate(
        [np.asarray(mine, dtype=np.float64), _numbers(more, "foreground_fraction")]
    )
    order = pc.sort_indices(ids)  # stable: ties keep ``rows`` first
    return float(np.cumsum(values[np.asarray(order)])[-1])

"""The collection index: one Parquet row per item (status, error, counts, hashes).

During a run each finished item appends one JSON line to its run's record file
(``STORE/.segflow/records/RUN.jsonl``, flushed and fsynced): an append, never a
read-modify-write of a growing table, so recording an item costs the same at 100,000 items
as at 10, and a killed run keeps the records of the items it finished. The records are
compacted into ``index.parquet`` when the run ends (or by the next run), and the rows of the
items they name into the catalogue (:mod:`segflow.store.catalogue`); :func:`read_index`
reads both, a later record replacing an earlier row of the same id.

Every path goes through fsspec, so a store on ``s3://`` (or ``gs://``, ``az://``) keeps its
index exactly as a local one. Object stores have no append: there each call writes its own
small record object (``RUN.<time>.jsonl``), and ``index.parquet`` is replaced in one PUT.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pandas as pd
from pandas.api.extensions import ExtensionDtype

from segflow.errors import StoreError
from segflow.faults import fault_point
from segflow.store.fs import fresh_fs
from segflow.store.lock import bookkeeping_path, is_local, local_path
from segflow.store.names import INDEX_NAME, check_reserved_names

_appending = threading.Lock()  # one record file per run, appended to by the run's items
STATUSES = ("done", "failed", "skipped")
# Core columns and their dtypes; rows may add more columns, which are kept as given.
_TEXT = pd.StringDtype()
INDEX_COLUMNS: dict[str, ExtensionDtype] = {
    "id": _TEXT,
    "source": _TEXT,
    "status": _TEXT,
    "error": _TEXT,
    "shape": _TEXT,
    "object_count": pd.Int64Dtype(),
    "area_p05": pd.Float64Dtype(),
    "area_p50": pd.Float64Dtype(),
    "area_p95": pd.Float64Dtype(),
    "seconds": pd.Float64Dtype(),
    "config_hash": _TEXT,
    "config_name": _TEXT,
    "warning": _TEXT,
    "model_hash": _TEXT,
    "code_version": _TEXT,
    "fingerprint": _TEXT,
}


def read_index(store: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``STORE/index.parquet``; an empty frame with the core columns when it is missing.

    Examples
    --------
    >>> list(read_index("no_such_store.zarr").columns)[:3]
    ['id', 'source', 'status']
    """
    path = _join(store, INDEX_NAME)
    frame = _empty_index()
    fs, inner = _fs(path)
    if fs.exists(inner):
        try:
            with fs.open(inner, "rb") as handle:
                frame = _with_core_columns(pd.read_parquet(handle))
        except Exception as exc:
            if fs.isdir(inner):  # an item group took the index's name: say what to do
                check_reserved_names(str(store))
            raise StoreError(f"cannot read index '{path}' ({type(exc).__name__}: {exc})") from exc
    records = [row for _, rows in _record_files(store) for row in rows]
    if not records:
        return frame
    latest = {str(row["id"]): row for row in records}  # a later record wins
    new = _with_core_columns(pd.DataFrame([_normalise_row(r) for r in latest.values()]))
    frame = frame[~frame["id"].isin(new["id"])]
    merged = new if frame.empty else pd.concat([frame, new], ignore_index=True)
    return _with_core_columns(merged).sort_values("id", ignore_index=True)


def append_records(
    store: str | os.PathLike[str], run_id: str, rows: Sequence[dict[str, Any]]
) -> None:
    """Append ``rows`` to this run's record file, durably (flushed and fsynced).

    Call after an item's data is committed. Rows are checked as :func:`write_index` checks
    them; :func:`compact_index` folds the records into ``index.parquet``.

    Examples
    --------
    >>> import tempfile
    >>> store = tempfile.mkdtemp()
    >>> append_records(store, "run-1", [{"id": "a", "status": "done"}])
    >>> read_index(store).loc[0, "status"]
    'done'
    """
    _check_rows(rows)
    lines = "".join(json.dumps(_jsonable(row), default=str) + "\n" for row in rows)
    if is_local(str(store)):
        path = pathlib.Path(local_path(bookkeeping_path(str(store), "records", f"{run_id}.jsonl")))
        path.parent.mkdir(parents=True, exist_ok=True)
        with _appending, open(path, "a", encoding="utf-8") as handle:  # items of several threads
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
    else:  # no appends on object stores: one small object per call, ordered by its name
        name = f"{run_id}.{time.time_ns():020d}.{uuid.uuid4().hex[:8]}.jsonl"
        fs, inner = _fs(bookkeeping_path(str(store), "records", name))
        fs.pipe_file(inner, lines.encode())
    fault_point("record-written")


def compact_index(store: str | os.PathLike[str]) -> set[str]:
    """Fold every record file into ``index.parquet`` and remove them; return the ids of the
    items they recorded (none without records: the index is left as it is).

    Call while holding the store's lock (no run appends meanwhile).
    """
    files = _record_files(store)
    if not files:
        return set()
    frame = read_index(store)
    _replace_index(store, frame)
    latest = {str(row["id"]): row for _, rows in files for row in rows}  # a later one wins
    _update_catalogue(store, list(latest.values()))
    fault_point("index-compact")
    _remove_records(store, files)
    return set(latest)


def write_index(store: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> str:
    """Merge ``rows`` into ``STORE/index.parquet``, keyed by item id, and return its path.

    A row replaces the stored row with the same ``id``; other stored rows are kept. Rows are
    sorted by id. A ``shape`` given as a tuple is stored as text (``"(718, 791)"``). The file
    is replaced atomically, but concurrent writers are not merged: write from one process
    (the flow), not from workers.

    Parameters
    ----------
    store : str or path
        Path or URL of the output store.
    rows : sequence of dict
        One dict per item with at least ``id`` and ``status`` (``"done"``, ``"failed"`` or
        ``"skipped"``); any of the core columns and extra keys.

    Raises
    ------
    ValueError
        If a row has no ``id``, repeats an id, or has an unknown ``status``.

    Examples
    --------
    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/doc_store.zarr"
    >>> path = write_index(store, [{"id": "a", "status": "done"}])
    >>> read_index(store).loc[0, "status"]
    'done'
    """
    _check_rows(rows)
    new = _with_core_columns(pd.DataFrame([_normalise_row(row) for row in rows]))
    old = read_index(store)
    old = old[~old["id"].isin(new["id"])]
    merged = new if old.empty else pd.concat([old, new], ignore_index=True)
    path = _replace_index(store, _with_core_columns(merged).sort_values("id", ignore_index=True))
    latest = {str(row["id"]): row for _, found in _record_files(store) for row in found}
    latest.update({str(row["id"]): dict(row) for row in rows})  # the rows given win
    _update_catalogue(store, list(latest.values()))
    _remove_records(store, _record_files(store))  # now folded into the table
    return path


def _update_catalogue(store: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Bring the catalogue's rows of ``rows`` up to date (:mod:`segflow.store.catalogue`),
    before the records that name them are removed."""
    from segflow.store.catalogue import update_catalogue

    try:
        update_catalogue(str(store), [_normalise_row(row) for row in rows])
    except Exception as exc:
        raise StoreError(
            f"cannot write the catalogue of '{store}' ({type(exc).__name__}: {exc})"
        ) from exc


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    ids = [str(row.get("id")) for row in rows]
    for row in rows:
        if not row.get("id"):
            raise ValueError(f"index row {row!r} has no `id`")
        if row.get("status") not in STATUSES:
            raise ValueError(
                f"index row '{row['id']}': `status` {row.get('status')!r} must be one of {STATUSES}"
            )
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"index rows repeat ids {repeated}")


def _replace_index(store: str | os.PathLike[str], merged: pd.DataFrame) -> str:
    path = _join(store, INDEX_NAME)
    try:
        if is_local(path):
            local = pathlib.Path(local_path(path))
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")
            try:
                merged.to_parquet(tmp, index=False)
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        else:  # one PUT: an object store never shows half a table
            fs, inner = _fs(path)
            buffer = io.BytesIO()
            merged.to_parquet(buffer, index=False)
            fs.pipe_file(inner, buffer.getvalue())
    except Exception as exc:
        raise StoreError(f"cannot write index '{path}' ({type(exc).__name__}: {exc})") from exc
    return path


def _record_files(store: str | os.PathLike[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every run's record file, oldest first, with its complete lines (a line cut short by
    a kill is left out)."""
    fs, folder = _fs(bookkeeping_path(str(store), "records"))
    if not fs.isdir(folder):
        return []
    listed = fs.find(folder, detail=True)
    files = sorted(
        (info for name, info in listed.items() if name.endswith(".jsonl")),
        key=lambda info: (_modified(info), info["name"]),
    )
    out = []
    for info in files:
        rows = []
        for line in fs.cat_file(info["name"]).decode("utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("id"):
                rows.append(row)
        out.append((str(info["name"]), rows))
    return out


def _remove_records(store: str | os.PathLike[str], files: Sequence[tuple[str, Any]]) -> None:
    fs, _ = _fs(bookkeeping_path(str(store), "records"))
    for name, _rows in files:
        try:
            fs.rm_file(name)
        except FileNotFoundError:
            pass


def _modified(info: dict[str, Any]) -> float:
    """A listing entry's modification time in seconds (local mtime, S3 LastModified)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return 0.0


def _join(store: str | os.PathLike[str], name: str) -> str:
    return f"{str(store).rstrip('/')}/{name}"


def _fs(path: str) -> tuple[Any, str]:

    return fresh_fs(path)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: missing numbers become null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def _normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("shape"), tuple | list):
        out["shape"] = str(tuple(int(n) for n in out["shape"]))
    return out


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in INDEX_COLUMNS.items()})


def _with_core_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add missing core columns, cast them to their dtypes, and put them first."""
    frame = frame.copy()
    for name, dtype in INDEX_COLUMNS.items():
        if name not in frame.columns:
            frame[name] = pd.Series([pd.NA] * len(frame), dtype=dtype, index=frame.index)
        else:
            frame[name] = frame[name].astype(dtype)
    extra = [c for c in frame.columns if c not in INDEX_COLUMNS]
    return frame[[*INDEX_COLUMNS, *extra]]

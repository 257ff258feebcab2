"""Helpers shared by the readers: region checks, fingerprints, item ids, channel handling."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from segflow.errors import ItemReadError
from segflow.io.base import ItemInfo


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec-style URL (``s3://…``, ``https://…``) and not a local path."""
    return "://" in path and not path.startswith("file://")


def strip_file_scheme(path: str) -> str:
    """Turn ``file:///data/a.tif`` into ``/data/a.tif``; other paths come back unchanged."""
    return path[len("file://") :] if path.startswith("file://") else path


def sanitize_id(name: str) -> str:
    """Make ``name`` a valid, store-safe Zarr v3 node name.

    Letters and digits of any script are kept (Zarr v3 node names are Unicode; the name is
    NFC-normalised so that macOS's decomposed file names give the same id), as are
    combining marks, ``.``, ``_`` and ``-``; any other character becomes ``_``. A name Zarr
    forbids (empty, only periods, starting with the reserved prefix ``__``) gets ``item``
    in front, and a name the store keeps for its own files
    (:mod:`segflow.store.names`: ``index.parquet``, ``zarr.json``, ...) has its periods made
    ``_`` (``index.parquet`` -> ``index_parquet``).

    Examples
    --------
    >>> sanitize_id("снимок 1"), sanitize_id("__init__"), sanitize_id("index.parquet")
    ('снимок_1', 'item__init__', 'index_parquet')
    """
    from segflow.store.names import unreserved_id  # the store owns its reserved names

    return unreserved_id(zarr_node_name(name))


def zarr_node_name(name: str) -> str:
    """``name`` as a valid Zarr v3 node name (:func:`sanitize_id` without the store's
    reserved names)."""
    safe = "".join(
        ch if ch.isalnum() or ch in "._-" or unicodedata.category(ch) in ("Mn", "Mc") else "_"
        for ch in unicodedata.normalize("NFC", name)
    )
    if not safe.strip(".") or safe.startswith("__"):
        safe = "item" + safe
    return safe


def fingerprint_file(path: str) -> str:
    """sha256 of ``(absolute path, size, mtime_ns)`` as 16 hex digits; ``""`` for URLs."""
    if is_url(path):
        return fingerprint_url(path)
    local = os.path.abspath(strip_file_scheme(path))
    stat = os.stat(local)
    return _hash_parts(local, str(stat.st_size), str(stat.st_mtime_ns))


def fingerprint_url(path: str) -> str:
    """sha256 of a remote object's ``(url, size, mtime or ETag)`` from fsspec; ``""`` if unknown."""
    try:
        import fsspec

        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
    except Exception:  # remote metadata is a best effort: no fingerprint means "always rerun"
        return ""
    stamp = next((str(info[k]) for k in ("mtime", "LastModified", "ETag", "etag") if k in info), "")
    return _hash_parts(path, str(info.get("size", "")), stamp)


def fingerprint_tree(path: str) -> str:
    """sha256 of every metadata document and the listing ``(name, size, mtime_ns)`` of a folder.

    Used for Zarr directories: metadata contents catch shape/dtype changes, the listing with
    modification times catches rewritten chunks. Costs one ``stat`` per chunk file.
    """
    if is_url(path):
        return fingerprint_url(path)
    root = os.path.abspath(strip_file_scheme(path))
    digest = hashlib.sha256(root.encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            stat = os.stat(full)
            rel = os.path.relpath(full, root)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            if name in ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"):
                with open(full, "rb") as file:
                    digest.update(file.read())
    return digest.hexdigest()[:16]


def _hash_parts(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def mtime_ns(path: str) -> int:
    """Modification stamp of a file, keying per-process caches of decoded files: the local
    mtime, or for a URL a number from its size and modification time or ETag (one HEAD)."""
    if is_url(path):
        return int(fingerprint_url(path) or "0", 16)
    return os.stat(path).st_mtime_ns


def read_bytes(path: str) -> bytes:
    """The whole file at a local path or fsspec URL (formats that are decoded whole)."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as remote:
            return bytes(remote.read())
    with open(path, "rb") as file:
        return file.read()


def read_head(path: str, size: int) -> bytes:
    """The first ``size`` bytes of a local file or URL (b"" when it cannot be read)."""
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as remote:
                return bytes(remote.read(size))
        with open(path, "rb") as file:
            return file.read(size)
    except (OSError, ValueError):
        return b""


def check_region(info: ItemInfo, region: tuple[slice, ...]) -> tuple[slice, ...]:
    """Validate ``region`` against the item's spatial shape and return it with explicit bounds.

    Raises
    ------
    ValueError
        If the region has the wrong number of slices, a step other than 1, or lies outside.
    """
    shape = info.spatial_shape
    if len(region) != len(shape):
        raise ValueError(
            f"item '{info.id}': `region` has {len(region)} slices, "
            f"expected one per spatial axis {info.spatial_axes}"
        )
    bounded = []
    for sl, size, axis in zip(region, shape, info.spatial_axes, strict=True):
        start = 0 if sl.start is None else sl.start
        stop = size if sl.stop is None else sl.stop
        if sl.step not in (None, 1) or not 0 <= start <= stop <= size:
            raise ValueError(
                f"item '{info.id}': `region` slice {sl} along {axis!r} must have step 1 and lie "
                f"inside 0..{size}"
            )
        bounded.append(slice(start, stop))
    return tuple(bounded)


def raise_read_error(item: str, what: str, exc: BaseException) -> NoReturn:
    """Raise :class:`ItemReadError` naming the item path, what failed and the cause."""
    raise ItemReadError(f"item '{item}': {what} ({type(exc).__name__}: {exc})") from exc


#: Words of a cause that say the file could not be reached, not that it is damaged.
_ACCESS_WORDS = (
    "credentials",
    "accessdenied",
    "access denied",
    "forbidden",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "expiredtoken",
    "permission denied",
    "http response code: 403",
    "http response code: 401",
)
ACCESS_HINT = (
    "it cannot be reached from here: the storage refused access or found no credentials "
    "(on a Dask cluster each worker needs the credentials and endpoint the run was given)"
)


def is_access_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the storage refused access (credentials, permissions), not that
    the file is damaged.

    Examples
    --------
    >>> is_access_error(OSError("NoCredentialsError('Unable to locate credentials')"))
    True
    >>> is_access_error(OSError("TIFFReadEncodedTile() failed"))
    False
    """
    if isinstance(exc, PermissionError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _ACCESS_WORDS)


@contextmanager
def wrap_read_errors(item: str, what: str, damaged: str | None = None) -> Iterator[None]:
    """Turn any library error inside the block into an :class:`ItemReadError` naming ``item``;
    ``damaged`` is said after ``what`` unless the cause is refused access (then
    :data:`ACCESS_HINT` is)."""
    try:
        yield
    except ItemReadError:
        raise
    except Exception as exc:
        hint = ACCESS_HINT if is_access_error(exc) else damaged
        raise_read_error(item, f"{what}; {hint}" if hint else what, exc)


def format_bytes(n: int) -> str:
    """A byte count for a person: ``480 B``, ``2.6 MiB``, ``98.2 TiB``.

    Examples
    --------
    >>> format_bytes(480), format_bytes(2_658_000), format_bytes(30000**3 * 4)
    ('480 B', '2.5 MiB', '98.2 TiB')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

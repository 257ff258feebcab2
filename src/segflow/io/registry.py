"""The reader registry: which reader opens which file or folder, in one place.

Each input format is a :class:`ReaderBackend`: its name, the suffixes it claims, whether an
item is a file, a folder or a series of files, a cheap :meth:`~ReaderBackend.guess_can_open`
(a suffix, a folder signature or a file's first bytes) and :meth:`~ReaderBackend.open`.
Discovery (:mod:`segflow.io.discover`), :func:`~segflow.io.discover.open_item`, the
evaluate command's reference lookup and the format list of ``segflow formats`` all derive
from the registry, as xarray's backends and zarr's codecs do.

Backends are tried in registration order, so a specific reader goes before a general one
that claims the same suffix (GeoTIFF, which needs GeoTIFF tags or a world file, before plain
TIFF). A third-party package adds a reader with an entry point in the ``segflow.readers``
group naming a :class:`ReaderBackend` subclass; it is tried before the built-in ones.

Series backends (DICOM) claim single files and group them into items:
:meth:`~ReaderBackend.group` turns the claimed files of a collection into one path per item
(a series' first file), and ``open`` on that path reads the whole series.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from segflow.io.base import Reader

ItemKind = Literal["file", "folder", "series"]
ENTRY_POINT_GROUP = "segflow.readers"


class ReaderBackend:
    """One input format: what it claims and how it opens an item.

    Subclasses set the class attributes and implement :meth:`open`; the default
    :meth:`guess_can_open` accepts the claimed suffixes.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()  # lower case, with the dot: (".nii.gz", ".nii")
    item: ClassVar[ItemKind] = "file"
    # Whether files without a claimed suffix are offered to guess_can_open (a DICOM export
    # names its files IM0001 or 1.2.840...): costs one small read per such file.
    sniffs: ClassVar[bool] = False
    metadata: ClassVar[str] = ""  # what the reader keeps, for the formats table
    options: ClassVar[tuple[str, ...]] = ()  # keyword options `open` takes (`input.options`)

    def claims_suffix(self, path: str) -> bool:
        return bool(self.suffixes) and path.lower().rstrip("/").endswith(self.suffixes)

    def guess_can_open(self, path: str) -> bool:
        """Whether this backend reads ``path``: cheap (a name, a signature, a few bytes)."""
        return self.claims_suffix(path)

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        raise NotImplementedError

    def group(self, paths: Sequence[str]) -> tuple[list[str], list[str]]:
        """Series backends: one path per item among the claimed ``paths``, and notes on
        the files left out on purpose."""
        return sorted(paths), []

    def item_name(self, path: str) -> str | None:
        """Series backends: the item's name (None: the file's stem)."""
        return None

    def strip_suffix(self, name: str) -> str | None:
        """``name`` without the claimed suffix, or None when it has none of them."""
        lower = name.lower()
        for suffix in sorted(self.suffixes, key=len, reverse=True):
            if lower.endswith(suffix):
                return name[: -len(suffix)]
        return None


_BACKENDS: list[ReaderBackend] = []


def register_reader(backend: ReaderBackend | type[ReaderBackend], *, first: bool = False) -> None:
    """Add a backend (an instance or a class, instantiated without arguments).

    A backend of the same name is replaced in place. ``first`` puts a new one before every
    other backend (as entry-point readers are), so it wins a suffix another also claims.
    """
    instance = backend() if isinstance(backend, type) else backend
    for i, known in enumerate(_BACKENDS):
        if known.name == instance.name:
            _BACKENDS[i] = instance
            return
    if first:
        _BACKENDS.insert(0, instance)
    else:
        _BACKENDS.append(instance)


def backends() -> list[ReaderBackend]:
    """Every registered backend, in the order they are tried."""
    _load_builtins()
    _load_entry_points()
    return list(_BACKENDS)


def backend_named(name: str) -> ReaderBackend:
    for backend in backends():
        if backend.name == name:
            return backend
    known = ", ".join(b.name for b in backends())
    raise KeyError(f"no reader named {name!r} (known: {known})")


def claimed_suffixes() -> tuple[str, ...]:
    """Every suffix some backend claims, longest first (``.nii.gz`` before ``.gz``)."""
    found = {s for b in backends() for s in b.suffixes}
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def folder_suffixes() -> tuple[str, ...]:
    """Suffixes that make a folder an item (``.zarr``), not a folder to search."""
    return tuple(s for b in backends() if b.item == "folder" for s in b.suffixes)


def backend_for(path: str, *, sniff: bool = True) -> ReaderBackend | None:
    """The first backend that can open ``path``, or None.

    Backends claiming ``path``'s suffix are asked first; with ``sniff``, a file no suffix
    claims is offered to the backends that look at content.
    """
    candidates = backends()
    by_suffix = [b for b in candidates if b.claims_suffix(path)]
    for backend in by_suffix:
        if backend.guess_can_open(path):
            return backend
    if by_suffix:  # claimed by name, refused by content: the last claimant says why
        return by_suffix[-1]
    if sniff and not os.path.basename(path.rstrip("/")).startswith("."):
        for backend in candidates:
            if backend.sniffs and backend.guess_can_open(path):
                return backend
    return None


def might_open(path: str) -> bool:
    """Cheaply, whether some backend may take ``path``: a claimed suffix, or a sniffing
    backend's yes. Discovery walks folders with this; :func:`backend_for` then decides."""
    if any(b.claims_suffix(path) for b in backends()):
        return True
    if os.path.basename(path.rstrip("/")).startswith("."):
        return False
    return any(b.sniffs and b.guess_can_open(path) for b in backends())


def strip_item_suffix(name: str) -> str:
    """A file or folder name without the suffix its reader claims (the whole ``.nii.gz``)."""
    lower = name.lower()
    for suffix in claimed_suffixes():
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def describe_formats() -> list[dict[str, str]]:
    """One row per backend: name, item kind, suffixes and what metadata it keeps."""
    return [
        {
            "name": b.name,
            "item": b.item,
            "suffixes": " ".join(b.suffixes) or "(by content)",
            "description": b.description,
            "metadata": b.metadata,
            "options": ", ".join(b.options),
        }
        for b in backends()
    ]


@functools.cache
def _load_builtins() -> None:
    # Imported here, not at module level: each reader module imports its library.
    from segflow.io import builtin

    for backend in builtin.BUILTIN_BACKENDS:
        if not any(b.name == backend.name for b in _BACKENDS):
            _BACKENDS.append(backend())


@functools.cache
def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        backend = entry.load()
        register_reader(backend, first=True)

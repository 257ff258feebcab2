"""Find the items of a collection (file, folder, glob or URL) and open each with its reader."""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from segflow.errors import ItemReadError
from segflow.io._common import is_url, sanitize_id, strip_file_scheme, zarr_node_name
from segflow.io.base import Reader
from segflow.io.registry import (
    ReaderBackend,
    backend_for,
    backends,
    claimed_suffixes,
    folder_suffixes,
    might_open,
    strip_item_suffix,
)

_GLOB_CHARS = frozenset("*?[")


def open_item(path: str, item_id: str | None = None, **options: Any) -> Reader:
    """Open one item with the reader the registry picks for it (:mod:`segflow.io.registry`).

    ``.tif``/``.tiff`` files with GeoTIFF tags (or a world-file sidecar) and TIFF URLs go to
    the GeoTIFF reader, OME-TIFFs to the OME-TIFF reader, other TIFFs (labels, z-stacks,
    RGB) to the plain image reader; a DICOM file opens the whole series it belongs to.

    Parameters
    ----------
    path : str
        Path or URL of a file or folder item (``segflow formats`` lists them).
    item_id : str, optional
        Item id; defaults to the file stem made safe for Zarr.
    **options
        Reader options (``input.options`` of a config), e.g. ``level`` for OME-TIFF.

    Returns
    -------
    Reader
        A reader whose ``info`` is already filled in.

    Raises
    ------
    ItemReadError
        If no reader takes the path or the file cannot be read; the message names the path.

    Examples
    --------
    >>> open_item("tests/data/aerial/RGB.byte.tif").info.format
    'geotiff'
    >>> open_item("tests/data/nuclei/003cee89357d9fe1/labels.tif").info.format
    'tiff'
    """
    path = strip_file_scheme(path)
    if "stack" in options:
        return _open_stack(path, item_id, options)
    if "mosaic" in options:
        return _open_mosaic(path, item_id, options)
    empty = not is_url(path) and os.path.isfile(path) and os.path.getsize(path) == 0
    backend = None if empty else backend_for(path)
    if backend is None and not (empty and might_open(path)):
        known = ", ".join(claimed_suffixes())
        raise ItemReadError(f"item '{path}': unknown file type, expected one of {known}")
    if empty or backend is None:
        raise ItemReadError(f"item '{path}': the file is empty (0 bytes)")
    unknown = sorted(set(options) - set(backend.options))
    if unknown:
        takes = ", ".join(backend.options) or "none"
        raise ItemReadError(
            f"item '{path}': the {backend.name} reader takes no option(s) {unknown} "
            f"(`input.options`; it takes: {takes})"
        )
    reader = backend.open(path, item_id, **options)
    if any(n == 0 for n in reader.info.shape):
        raise ItemReadError(
            f"item '{path}': the image has no pixels (shape {tuple(reader.info.shape)})"
        )
    return reader


def discover_items(
    path: str, *, notes: list[str] | None = None, store: str | None = None, **options: Any
) -> tuple[list[Reader], list[tuple[str, str]]]:
    """Find and open every item under ``path``; one bad item never stops the others.

    Parameters
    ----------
    path : str
        A file or folder item (``.zarr``); a folder, searched recursively for files some
        reader takes (hidden names skipped) and folder items; a glob pattern (``**``
        allowed); or an fsspec URL to a file, folder or glob. Files of a series format
        (DICOM) are grouped into one item per series.
    notes : list of str, optional
        Receives what discovery left out or renamed on purpose (non-image DICOM objects,
        the segflow stores below ``path``, an item whose name the store keeps for itself).
    store : str, optional
        The run's own output store (``output.store``), left out where it lies below
        ``path`` even before it carries segflow's marker. Any other segflow store below
        ``path`` (a folder whose root ``zarr.json`` has the ``segflow`` attribute:
        :func:`segflow.store.commit.is_segflow_store`) is left out too, whatever its
        name; a plain Zarr array or group is an item as always.
    **options
        Reader options passed to every reader (``input.options``).

    Returns
    -------
    readers : list of Reader
        One reader per readable item, in sorted path order. Ids are file stems (``.nii.gz``
        stripped whole), prefixed with parent folder names where stems collide
        (``nuclei/a/image.png`` -> ``a_image``), made valid Zarr names.
    failures : list of (str, str)
        ``(path, message)`` for every item that could not be opened.

    Raises
    ------
    ItemReadError
        If ``path`` does not exist, or nothing any reader takes was found.

    Examples
    --------
    >>> readers, failures = discover_items("tests/data/nuclei")
    >>> [r.info.id for r in readers], failures
    (['image', 'labels'], [])
    """
    path = strip_file_scheme(path)
    if "mosaic" in options:
        return _discover_scene(path, notes, store, options)
    stores = _StoreFilter(store)
    paths = _stack_folders(path) if "stack" in options else _item_paths(path, stores)
    if stores.found and notes is not None:
        notes.append(stores.note(path))
    paths, series_names = _group_series(paths, notes) if "stack" not in options else (paths, {})
    if not paths:
        raise ItemReadError(_nothing_found(path))
    ids = assign_item_ids(paths, names=[series_names.get(p) for p in paths], notes=notes)
    return _open_items(paths, ids, options)


# Items opened (headers read, fingerprints taken) at once: each open waits mostly on the
# disk or the network (a header read, a stat or a HEAD), so threads overlap the waits; an
# object store's round trips take tens of milliseconds each.
OPENERS_LOCAL = 8
OPENERS_REMOTE = 32


def _open_items(
    paths: Sequence[str], ids: Sequence[str], options: dict[str, Any]
) -> tuple[list[Reader], list[tuple[str, str]]]:
    """Open every item (its reader, with its fingerprint), several at a time; the readers
    in ``paths`` order, and ``(path, message)`` for each that could not be opened."""
    from concurrent.futures import ThreadPoolExecutor

    def opened(pair: tuple[str, str]) -> Reader | tuple[str, str]:
        item_path, item_id = pair
        try:
            return open_item(item_path, item_id, **options)
        except ItemReadError as exc:
            return (item_path, str(exc))
        except Exception as exc:  # a reader bug on one file must not stop the collection
            return (item_path, f"item '{item_path}': {type(exc).__name__}: {exc}")

    pairs = list(zip(paths, ids, strict=True))
    threads = OPENERS_REMOTE if pairs and is_url(pairs[0][0]) else OPENERS_LOCAL
    if len(pairs) < 2:
        results = [opened(pair) for pair in pairs]
    else:
        with ThreadPoolExecutor(min(threads, len(pairs))) as pool:
            results = list(pool.map(opened, pairs))
    readers = [r for r in results if not isinstance(r, tuple)]
    failures = [r for r in results if isinstance(r, tuple)]
    return readers, failures


def _item_paths(path: str, stores: _StoreFilter) -> list[str]:
    """Every item path under a file, folder, glob or URL (segflow stores left out)."""
    if is_url(path):
        return _list_url(path, stores)
    if _GLOB_CHARS & set(path):
        base = _glob_base(path)
        return [
            p
            for p in sorted(glob.glob(path, recursive=True))
            if _is_item_path(p) and not stores.holds(p, base)
        ]
    if os.path.isdir(path) and not _is_folder_item(path):
        return _walk_folder(path, stores)
    if os.path.exists(path):
        return [path]
    raise ItemReadError(f"collection '{path}': no such file or folder")


def _nothing_found(path: str) -> str:
    suffixes = [s for s in claimed_suffixes() if s not in folder_suffixes()]
    return (
        f"collection '{path}': no items found, looked for files ending in "
        f"{', '.join(suffixes)}, DICOM files by content and "
        f"{' '.join(folder_suffixes())} folders"
    )


def _discover_scene(
    path: str, notes: list[str] | None, store: str | None, options: dict[str, Any]
) -> tuple[list[Reader], list[tuple[str, str]]]:
    """``input.mosaic``: every file ``path`` matches is a tile of one scene item."""
    stores = _StoreFilter(store)
    try:
        paths = _tile_paths(path, stores, options["mosaic"])
    except ItemReadError as exc:
        return [], [(path, str(exc))]
    if stores.found and notes is not None:
        notes.append(stores.note(path))
    if not paths:
        raise ItemReadError(_nothing_found(path))
    try:
        return [_open_mosaic(path, None, options, paths, notes=notes)], []
    except ItemReadError as exc:
        return [], [(path, str(exc))]


def _open_mosaic(
    path: str,
    item_id: str | None,
    options: dict[str, Any],
    paths: list[str] | None = None,
    *,
    notes: list[str] | None = None,
) -> Reader:
    from segflow.io.mosaic import MosaicSettings, open_mosaic

    scene_id = item_id if item_id is not None else scene_id_for(path)
    where = f"scene '{scene_id}' ({path})"
    settings = options["mosaic"]
    settings = {} if settings is True else dict(settings)
    settings.pop("asset", None)  # which tiles, not how they make the image
    try:
        parsed = MosaicSettings(**settings)
    except TypeError:
        raise ItemReadError(
            f"{where}: `input.mosaic` must be true or a mapping of "
            f"{', '.join(MosaicSettings.__dataclass_fields__)} (got {settings!r})"
        ) from None
    if paths is None:
        paths = _tile_paths(path, _StoreFilter(None), options["mosaic"])
    tile_options = {k: v for k, v in options.items() if k != "mosaic"}
    readers = []
    for tile_path in paths:
        try:
            readers.append(_open_tile(tile_path, tile_options))
        except ItemReadError as exc:
            message = str(exc).removeprefix("item ")
            raise ItemReadError(f"{where}: tile {message}") from exc
    if not readers:
        raise ItemReadError(f"{where}: no tiles found")
    return open_mosaic(path, scene_id, readers, parsed, notes=notes)


def _tile_paths(path: str, stores: _StoreFilter, mosaic: Any) -> list[str]:
    """A scene's tile files: those a VRT or STAC file lists, or the input's item paths
    less folder items (a Zarr store)."""
    from segflow.io.scene_sources import is_scene_file, scene_file_tiles

    if is_scene_file(path):
        asset = mosaic.get("asset") if isinstance(mosaic, dict) else None
        return scene_file_tiles(path, asset)
    return [p for p in _item_paths(path, stores) if not _is_folder_item(p)]


def _open_tile(path: str, options: dict[str, Any]) -> Reader:
    """A scene's tile: TIFFs through the GeoTIFF reader even without a CRS (its transform
    places it; the scene then says the CRS is missing), other files as always."""
    from segflow.io.builtin import TIFF_SUFFIXES

    if path.lower().endswith(TIFF_SUFFIXES) and not options:
        from segflow.io.geotiff import GeoTIFFReader

        return GeoTIFFReader(path)
    return open_item(path, None, **options)


def scene_id_for(path: str) -> str:
    """A scene's item id: the name of the folder its tiles are in (a glob's fixed folder).

    Examples
    --------
    >>> scene_id_for("flights/2026-05/*.tif"), scene_id_for("/data/city tiles/")
    ('2026-05', 'city_tiles')
    """
    folder = _glob_base(path) if _GLOB_CHARS & set(path) else path.rstrip("/")
    name = folder.rsplit("/", 1)[-1] if folder else ""
    if not os.path.isdir(folder) and not is_url(path) and "." in name:
        name = strip_item_suffix(name)
    return sanitize_id(name) if name else "scene"


def _open_stack(path: str, item_id: str | None, options: dict[str, Any]) -> Reader:
    from segflow.io.stack import StackReader

    stack = options["stack"]
    settings = {} if stack is True else stack
    if not isinstance(settings, dict) or set(options) - {"stack"}:
        raise ItemReadError(
            f"item '{path}': `input.options.stack` must be true or a mapping of spacing, "
            f"units and pattern, alone in `input.options` (got {options!r})"
        )
    unknown = sorted(set(settings) - {"spacing", "units", "pattern"})
    if unknown:
        raise ItemReadError(
            f"item '{path}': `input.options.stack` takes spacing, units and pattern, not {unknown}"
        )
    return StackReader(path, item_id, **settings)


def _stack_folders(path: str) -> list[str]:
    """The folders a stack input names: the folder itself, or the folders a glob matches."""
    if is_url(path):
        raise ItemReadError(f"collection '{path}': stacks are read from local folders")
    if _GLOB_CHARS & set(path):
        return [p for p in sorted(glob.glob(path, recursive=True)) if os.path.isdir(p)]
    if os.path.isdir(path):
        return [path.rstrip("/")]
    raise ItemReadError(
        f"collection '{path}': a stack input is a folder of slices (or a glob of folders)"
    )


def _series_backend(path: str, series: dict[str, ReaderBackend]) -> ReaderBackend | None:
    """The series backend that takes ``path``, if any (no other reader claims it first)."""
    if not series or is_url(path):
        return None
    for backend in backends():
        if backend.claims_suffix(path) and backend.name not in series:
            return None
    return next((b for b in series.values() if b.guess_can_open(path)), None)


def _group_series(
    paths: list[str], notes: list[str] | None
) -> tuple[list[str], dict[str, str | None]]:
    """Collapse the files of series formats (DICOM) into one path per series; the series'
    item names (number and description) by path."""
    by_backend: dict[str, list[str]] = defaultdict(list)
    series: dict[str, ReaderBackend] = {b.name: b for b in backends() if b.item == "series"}
    kept: list[str] = []
    for path in paths:
        backend = _series_backend(path, series)
        if backend is not None:
            by_backend[backend.name].append(path)
        else:
            kept.append(path)
    names: dict[str, str | None] = {}
    for name, members in by_backend.items():
        grouped, skipped = series[name].group(members)
        kept.extend(grouped)
        names.update((p, series[name].item_name(p)) for p in grouped)
        if notes is not None:
            notes.extend(skipped)
    return sorted(kept), names


def assign_item_ids(
    paths: list[str],
    names: Sequence[str | None] | None = None,
    *,
    notes: list[str] | None = None,
) -> list[str]:
    """Unique, Zarr-safe item ids for ``paths``: stems, prefixed by parent folders on collision.

    ``names`` replaces a path's stem where given (a DICOM series' number and description).

    Files of the same stem in one folder keep their extension (``a.tif``, ``a.png``); any
    collision left after that gets a numeric suffix (``_2``, ``_3``) in path order. Letters
    of every script are kept (:func:`segflow.io._common.sanitize_id`). An id that would be
    one of the store's own names (``index.parquet``, ``zarr.json``, ...:
    :mod:`segflow.store.names`) has its periods made ``_`` (``index_parquet``), said in one
    line per item in ``notes``.

    Examples
    --------
    >>> assign_item_ids(["d/x/image.png", "d/y/image.png", "d/ct.nii.gz"])
    ['x_image', 'y_image', 'ct']
    >>> notes = []
    >>> assign_item_ids(["d/index.parquet.png", "d/снимок.png"], notes=notes)
    ['index_parquet', 'снимок']
    >>> "'index.parquet' is where a store keeps its collection index" in notes[0]
    True
    """
    from segflow.store.names import reserved_role

    files = [p.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] for p in paths]
    dirs = [os.path.dirname(p.rstrip("/")) for p in paths]
    stems = [
        given if given else _strip_suffix(n)
        for n, given in zip(files, names or [None] * len(paths), strict=True)
    ]
    by_folder_stem: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(dirs, stems, strict=True)):
        by_folder_stem[key].append(i)
    for members in by_folder_stem.values():
        if len(members) > 1:
            for i in members:
                stems[i] = files[i]
    common = os.path.commonpath(dirs) if len(set(dirs)) > 1 else (dirs[0] if dirs else "")
    parents = [_relative_parts(d, common) for d in dirs]  # nearest folder first
    depth = [0] * len(paths)

    made: dict[tuple[int, int], str] = {}  # each (item, depth) sanitised once

    def make_id(i: int) -> str:
        key = (i, depth[i])
        if key not in made:
            made[key] = sanitize_id(plain_id(i))
        return made[key]

    def plain_id(i: int) -> str:
        return "_".join([*reversed(parents[i][: depth[i]]), stems[i]])

    while True:
        groups = _group_collisions([make_id(i) for i in range(len(paths))])
        deepened = False
        for members in groups:
            for i in members:
                if depth[i] < len(parents[i]):
                    depth[i] += 1
                    deepened = True
        if not groups or not deepened:
            break
    seen: set[str] = set()
    ids = [unused_id(make_id(i), seen) for i in range(len(paths))]
    for i, item_id in enumerate(ids):
        if notes is None or item_id == made[(i, depth[i])] == plain_id(i):
            continue  # kept as it is: not a reserved name
        plain = zarr_node_name(plain_id(i))
        role = reserved_role(plain)
        if role is not None:
            notes.append(
                f"item '{paths[i]}': '{plain}' is where a store keeps {role}, "
                f"so its id is '{item_id}'"
            )
    return ids


def unused_id(item_id: str, taken: set[str]) -> str:
    """``item_id``, or ``item_id_2``, ``item_id_3``, ... whichever is not in ``taken``; the
    answer is added to ``taken``."""
    unique, n = item_id, 1
    while unique in taken:
        n += 1
        unique = f"{item_id}_{n}"
    taken.add(unique)
    return unique


def _group_collisions(ids: list[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item_id in enumerate(ids):
        groups[item_id].append(i)
    return [members for members in groups.values() if len(members) > 1]


def _relative_parts(folder: str, root: str) -> list[str]:
    rel = os.path.relpath(folder, root) if folder and root else folder
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    return parts[::-1]


def _strip_suffix(name: str) -> str:
    return strip_item_suffix(name)


def _is_folder_item(path: str) -> bool:
    return path.rstrip("/").lower().endswith(folder_suffixes())


def _is_item_path(path: str) -> bool:
    if _is_folder_item(path):
        return os.path.isdir(path)
    return os.path.isfile(path) and might_open(path)


def _walk_folder(root: str, stores: _StoreFilter) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Segflow stores are outputs, never searched; folder items (.zarr) are not
        # searched; hidden names (.git, ._x.tif) are skipped.
        dirnames[:] = [
            d
            for d in sorted(dirnames)
            if d.startswith(".") or not stores.is_store(os.path.join(dirpath, d))
        ]
        for name in dirnames:
            if _is_folder_item(name) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not _is_folder_item(d)]
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and might_open(os.path.join(dirpath, f))
        )
    return sorted(found)


class _StoreFilter:
    """Tells the segflow stores among folders (by their root marker, or being the run's own
    ``store``), and remembers those it found for the discovery note."""

    def __init__(self, store: str | None) -> None:
        own = strip_file_scheme(store) if store else None
        self.own = None if own is None else (own if is_url(own) else os.path.abspath(own))
        self.found: list[str] = []
        self._known: dict[str, bool] = {}

    def is_store(self, folder: str) -> bool:
        """Whether ``folder`` (a path or URL) is a segflow store; found ones are noted."""
        folder = folder.rstrip("/")
        if folder not in self._known:
            from segflow.store.commit import is_segflow_store

            key = folder if is_url(folder) else os.path.abspath(folder)
            marked = key == self.own or (
                (is_url(folder) or os.path.isfile(os.path.join(folder, "zarr.json")))
                and is_segflow_store(folder)
            )
            self._known[folder] = marked
            if marked:
                self.found.append(folder)
        return self._known[folder]

    def holds(self, path: str, base: str) -> bool:
        """Whether ``path`` is a segflow store or lies in one, below the folder ``base``."""
        folder = path.rstrip("/")
        base = base.rstrip("/")
        while folder and folder != base and folder.startswith(base):
            if self.is_store(folder):
                return True
            parent = folder.rsplit("/", 1)[0] if "/" in folder else ""
            if parent == folder:
                break
            folder = parent
        return False

    def note(self, path: str) -> str:
        shown = ", ".join(f"'{s}'" for s in self.found[:5])
        more = f", ... ({len(self.found)} in all)" if len(self.found) > 5 else ""
        return (
            f"collection '{path}': left out {len(self.found)} segflow store(s), outputs of "
            f"segflow runs and not inputs: {shown}{more}"
        )


def _glob_base(pattern: str) -> str:
    """The folder a glob pattern searches below: its path up to the first glob character."""
    fixed = pattern[: min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)]
    return fixed.rsplit("/", 1)[0] if "/" in fixed else ""


def _list_url(url: str, stores: _StoreFilter) -> list[str]:
    """Item URLs under an fsspec URL (file, folder or glob); folder items count once."""
    import fsspec

    if not _GLOB_CHARS & set(url) and any(b.claims_suffix(url) for b in backends()):
        if not _is_folder_item(url):
            return [url]  # a file item: never list it (over http that is a GET of it all)
    try:
        fs, root = fsspec.core.url_to_fs(url)
        if _GLOB_CHARS & set(root):
            listed = sorted(fs.glob(root))
        elif fs.isdir(root) and not _is_folder_item(root):
            listed = sorted(fs.find(root))
        else:
            return [url]
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ItemReadError(f"collection '{url}': cannot list ({reason})") from exc
    found: list[str] = []
    folders = folder_suffixes()
    # Folders with Zarr metadata: those of them with segflow's marker are stores, left out
    # with everything in them (one small GET per folder item or store candidate).
    zarr_folders = {e.rsplit("/", 1)[0] for e in listed if e.endswith("/zarr.json")}
    base = _glob_base(root) if _GLOB_CHARS & set(root) else root
    for entry in listed:
        lower = entry.lower()
        inside = [s for s in folders if f"{s}/" in lower]
        if inside:
            entry = entry[: lower.index(f"{inside[0]}/") + len(inside[0])]
        elif not any(b.claims_suffix(entry) for b in backends()):
            continue
        if _in_url_store(fs, entry, base, zarr_folders, stores):
            continue
        full = fs.unstrip_protocol(entry)
        if full not in found:
            found.append(full)
    return found


def _in_url_store(
    fs: Any, entry: str, base: str, zarr_folders: set[str], stores: _StoreFilter
) -> bool:
    """Whether the listed ``entry`` is a segflow store or lies in one below ``base``."""
    folder = entry.rstrip("/")
    while folder.startswith(f"{base.rstrip('/')}/"):
        if folder in zarr_folders or (folder == entry and _is_folder_item(entry)):
            if stores.is_store(fs.unstrip_protocol(folder)):
                return True
        folder = folder.rsplit("/", 1)[0]
    return False

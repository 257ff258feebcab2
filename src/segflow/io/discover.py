"""Find the items of a collection (file, folder, glob or URL) and open each with its reader."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

from segflow.errors import ItemReadError
from segflow.io._common import is_url, sanitize_id, strip_file_scheme
from segflow.io.base import Reader
from segflow.io.geotiff import GeoTIFFReader
from segflow.io.image import PICTURE_SUFFIXES, TIFF_SUFFIXES, ImageReader
from segflow.io.nifti import NiftiReader
from segflow.io.zarr import ZarrReader

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ZARR_SUFFIX = ".zarr"
ITEM_SUFFIXES = TIFF_SUFFIXES + PICTURE_SUFFIXES + NIFTI_SUFFIXES + (ZARR_SUFFIX,)
# World files and GDAL sidecars that georeference a TIFF without GeoTIFF tags.
_GEO_SIDECARS = (".tfw", ".tifw", ".tiffw", ".wld", ".aux.xml")
_GLOB_CHARS = frozenset("*?[")


def open_item(path: str, item_id: str | None = None) -> Reader:
    """Open one item with the reader its extension calls for.

    ``.tif``/``.tiff`` files with GeoTIFF tags (or a world-file sidecar) and TIFF URLs go to
    :class:`GeoTIFFReader`; plain TIFFs (labels, z-stacks, RGB) to :class:`ImageReader`.

    Parameters
    ----------
    path : str
        Path or URL of a ``.tif``, ``.tiff``, ``.png``, ``.jpg``, ``.jpeg``, ``.nii``,
        ``.nii.gz`` file or ``.zarr`` folder.
    item_id : str, optional
        Item id; defaults to the file stem made safe for Zarr.

    Returns
    -------
    Reader
        A reader whose ``info`` is already filled in.

    Raises
    ------
    ItemReadError
        If the extension is unknown or the file cannot be read; the message names the path.

    Examples
    --------
    >>> open_item("tests/data/aerial/RGB.byte.tif").info.format
    'geotiff'
    >>> open_item("tests/data/nuclei/003cee89357d9fe1/labels.tif").info.format
    'tiff'
    """
    path = strip_file_scheme(path)
    reader = _open_by_suffix(path, item_id)
    if any(n == 0 for n in reader.info.shape):
        raise ItemReadError(
            f"item '{path}': the image has no pixels (shape {tuple(reader.info.shape)})"
        )
    return reader


def _open_by_suffix(path: str, item_id: str | None) -> Reader:
    lower = path.lower().rstrip("/")
    known = lower.endswith(tuple(ITEM_SUFFIXES))
    if known and not is_url(path) and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ItemReadError(f"item '{path}': the file is empty (0 bytes)")
    if lower.endswith(ZARR_SUFFIX):
        return ZarrReader(path, item_id)
    if lower.endswith(NIFTI_SUFFIXES):
        return NiftiReader(path, item_id)
    if lower.endswith(PICTURE_SUFFIXES):
        return ImageReader(path, item_id)
    if lower.endswith(TIFF_SUFFIXES):
        if is_url(path) or _is_georeferenced(path):
            return GeoTIFFReader(path, item_id)
        return ImageReader(path, item_id)
    raise ItemReadError(
        f"item '{path}': unknown file type, expected one of {', '.join(ITEM_SUFFIXES)}"
    )


def discover_items(path: str) -> tuple[list[Reader], list[tuple[str, str]]]:
    """Find and open every item under ``path``; one bad item never stops the others.

    Parameters
    ----------
    path : str
        A file or ``.zarr`` folder (one item); a folder, searched recursively for files with
        a known extension and ``.zarr`` folders (hidden names skipped); a glob pattern
        (``**`` allowed); or an fsspec URL to a file, folder or glob.

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
        If ``path`` does not exist, or nothing with a known extension was found.

    Examples
    --------
    >>> readers, failures = discover_items("tests/data/nuclei")
    >>> [r.info.id for r in readers], failures
    (['image', 'labels'], [])
    """
    path = strip_file_scheme(path)
    if is_url(path):
        paths = _list_url(path)
    elif _GLOB_CHARS & set(path):
        paths = [p for p in sorted(glob.glob(path, recursive=True)) if _is_item_path(p)]
    elif os.path.isdir(path) and not path.rstrip("/").lower().endswith(ZARR_SUFFIX):
        paths = _walk_folder(path)
    elif os.path.exists(path):
        paths = [path]
    else:
        raise ItemReadError(f"collection '{path}': no such file or folder")
    if not paths:
        raise ItemReadError(
            f"collection '{path}': no items found, looked for files ending in "
            f"{', '.join(ITEM_SUFFIXES[:-1])} and {ZARR_SUFFIX} folders"
        )
    readers: list[Reader] = []
    failures: list[tuple[str, str]] = []
    for item_path, item_id in zip(paths, assign_item_ids(paths), strict=True):
        try:
            readers.append(open_item(item_path, item_id))
        except ItemReadError as exc:
            failures.append((item_path, str(exc)))
        except Exception as exc:  # a reader bug on one file must not stop the collection
            failures.append((item_path, f"item '{item_path}': {type(exc).__name__}: {exc}"))
    return readers, failures


def assign_item_ids(paths: list[str]) -> list[str]:
    """Unique, Zarr-safe item ids for ``paths``: stems, prefixed by parent folders on collision.

    Files of the same stem in one folder keep their extension (``a.tif``, ``a.png``); any
    collision left after that gets a numeric suffix (``_2``, ``_3``) in path order.

    Examples
    --------
    >>> assign_item_ids(["d/x/image.png", "d/y/image.png", "d/ct.nii.gz"])
    ['x_image', 'y_image', 'ct']
    """
    names = [p.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] for p in paths]
    dirs = [os.path.dirname(p.rstrip("/")) for p in paths]
    stems = [_strip_suffix(n) for n in names]
    by_folder_stem: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(dirs, stems, strict=True)):
        by_folder_stem[key].append(i)
    for members in by_folder_stem.values():
        if len(members) > 1:
            for i in members:
                stems[i] = names[i]
    common = os.path.commonpath(dirs) if len(set(dirs)) > 1 else (dirs[0] if dirs else "")
    parents = [_relative_parts(d, common) for d in dirs]  # nearest folder first
    depth = [0] * len(paths)

    def make_id(i: int) -> str:
        return sanitize_id("_".join([*reversed(parents[i][: depth[i]]), stems[i]]))

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
    return [unused_id(make_id(i), seen) for i in range(len(paths))]


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
    lower = name.lower()
    for suffix in (*NIFTI_SUFFIXES, ZARR_SUFFIX):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _is_item_path(path: str) -> bool:
    lower = path.lower().rstrip("/")
    if lower.endswith(ZARR_SUFFIX):
        return os.path.isdir(path)
    return lower.endswith(ITEM_SUFFIXES) and os.path.isfile(path)


def _walk_folder(root: str) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Zarr folders are items, not folders to search; hidden names (.git, ._x.tif) are skipped.
        for name in sorted(dirnames):
            if name.lower().endswith(ZARR_SUFFIX) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not d.lower().endswith(ZARR_SUFFIX)
        )
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(ITEM_SUFFIXES[:-1])
        )
    return sorted(found)


def _list_url(url: str) -> list[str]:
    """Item URLs under an fsspec URL (file, folder or glob); zarr prefixes count once."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        if _GLOB_CHARS & set(root):
            listed = sorted(fs.glob(root))
        elif fs.isdir(root) and not root.rstrip("/").lower().endswith(ZARR_SUFFIX):
            listed = sorted(fs.find(root))
        else:
            return [url]
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ItemReadError(f"collection '{url}': cannot list ({reason})") from exc
    found: list[str] = []
    for entry in listed:
        lower = entry.lower()
        if ".zarr/" in lower:
            entry = entry[: lower.index(".zarr/") + len(ZARR_SUFFIX)]
        elif not lower.endswith(ITEM_SUFFIXES):
            continue
        full = fs.unstrip_protocol(entry)
        if full not in found:
            found.append(full)
    return found


def _is_georeferenced(path: str) -> bool:
    """Whether a local TIFF has GeoTIFF tags or a world-file / GDAL sidecar."""
    import tifffile

    base = path.rsplit(".", 1)[0]
    if any(os.path.exists(base + s) or os.path.exists(path + s) for s in _GEO_SIDECARS):
        return True
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages.first.is_geotiff)
    except Exception as exc:
        raise ItemReadError(
            f"item '{path}': not a readable GeoTIFF/TIFF ({type(exc).__name__}: {exc})"
        ) from exc

"""NRRD images and volumes through pynrrd, presented as ``(c, (z), y, x)`` in RAS+ mm."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from segflow.errors import ItemReadError
from segflow.io._common import (
    check_region,
    fingerprint_file,
    mtime_ns,
    raise_read_error,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import ItemInfo

# NRRD `space` values whose first two world axes point left and posterior (LPS-like).
_LPS_SPACES = {"left-posterior-superior", "lps", "left-posterior-superior-time"}
_RAS_SPACES = {"right-anterior-superior", "ras", "right-anterior-superior-time"}
# Kinds that make an axis the channel axis rather than a spatial one.
_CHANNEL_KINDS = {"vector", "list", "rgb-color", "rgba-color", "3-color", "4-color", "point"}
_UNITS = {"mm": "mm", "millimeter": "mm", "um": "um", "micron": "um", "m": "m", "cm": "cm"}


class NrrdReader:
    """Reads of a NRRD file (attached ``.nrrd`` or detached ``.nhdr`` header).

    The data are decoded whole on the first read (NRRD is usually gzip-encoded, which has
    no windowed access) and cached per process, two files at most. An axis whose ``kind``
    is a vector, list or colour is the channel axis. With ``space directions`` and
    ``space origin``, ``info.affine`` is the voxel-to-world matrix as the NIfTI reader
    gives it (RAS+ in ``(x, y, z)`` index order: an LPS file's x and y change sign) and
    spacing / origin follow from it; without them, spacing is the ``spacings`` field or 1
    pixel.

    Parameters
    ----------
    path : str
        Path of a ``.nrrd`` or ``.nhdr`` file.
    item_id : str, optional
        Item id; defaults to the file stem.

    Raises
    ------
    ItemReadError
        If the header is unreadable or the image is not 2-D or 3-D.
    """

    info: ItemInfo

    def __init__(self, path: str, item_id: str | None = None) -> None:
        import nrrd

        self.path = strip_file_scheme(path)
        try:
            header = nrrd.read_header(self.path)
        except Exception as exc:
            raise_read_error(self.path, "not a readable NRRD header", exc)
        self.info, self._channel_axis = _make_info(self.path, item_id, header)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(c, *region_shape)``."""
        bounded = check_region(self.info, region)
        with wrap_read_errors(self.path, "cannot decode NRRD data"):
            array = _load(self.path, mtime_ns(self.path), self._channel_axis)
        return np.array(array[(slice(None), *bounded)])

    def __repr__(self) -> str:
        return f"NrrdReader({self.path!r}, item_id={self.info.id!r})"


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime: int, channel_axis: int | None) -> np.ndarray:
    """The whole image as ``(c, (z), y, x)``; ``mtime`` keys the cache."""
    import nrrd

    data, _ = nrrd.read(path, index_order="C")
    array = data[np.newaxis] if channel_axis is None else np.moveaxis(data, channel_axis, 0)
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _make_info(
    path: str, item_id: str | None, header: dict[str, Any]
) -> tuple[ItemInfo, int | None]:
    sizes = [int(n) for n in header["sizes"]]  # file (Fortran) order: x first
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    channel_f = [i for i, k in enumerate(kinds) if k in _CHANNEL_KINDS]
    if len(channel_f) > 1:
        raise ItemReadError(f"item '{path}': more than one channel axis (kinds {kinds})")
    spatial_f = [i for i in range(len(sizes)) if i not in channel_f]
    if len(spatial_f) not in (2, 3):
        raise ItemReadError(
            f"item '{path}': NRRD sizes {sizes} (kinds {kinds}) are not a 2-D or 3-D image"
        )
    ndim = len(spatial_f)
    directions = header.get("space directions")
    space = str(header.get("space", "")).lower()
    affine = None
    attrs: dict[str, object] = {}
    if directions is not None:
        rows = [np.asarray(directions[i], dtype=float) for i in spatial_f]
        if any(not np.all(np.isfinite(r)) for r in rows):
            raise ItemReadError(f"item '{path}': a spatial axis has no space direction")
        world = len(rows[0])
        linear = np.zeros((3, 3))
        for j, row in enumerate(rows):
            linear[:world, j] = row
        origin_world = np.zeros(3)
        if header.get("space origin") is not None:
            origin_world[:world] = np.asarray(header["space origin"], dtype=float)
        if space in _LPS_SPACES:
            flip = np.diag([-1.0, -1.0, 1.0])
            linear, origin_world = flip @ linear, flip @ origin_world
        elif space not in _RAS_SPACES:
            attrs["nrrd_space"] = space or "(none)"
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = linear, origin_world
        block = linear[:ndim, :ndim]
        axis_aligned = np.allclose(block, np.diag(np.diag(block)), atol=1e-6)
        steps = np.diag(block) if axis_aligned else np.linalg.norm(linear[:, :ndim], axis=0)
        spacing = tuple(float(v) for v in steps[::-1])
        origin = tuple(float(v) for v in origin_world[:ndim][::-1])
        units_list = header.get("space units") or ["mm"]
        units = _UNITS.get(str(units_list[0]).lower(), str(units_list[0]))
        import nibabel as nib

        if ndim == 3:
            attrs["orientation"] = "".join(nib.orientations.aff2axcodes(affine))
    else:
        given = header.get("spacings")
        steps = [float(given[i]) if given is not None else 1.0 for i in spatial_f]
        steps = [s if np.isfinite(s) else 1.0 for s in steps]
        spacing = tuple(steps[::-1])
        origin = (0.0,) * ndim
        units = "pixel" if given is None else "mm"
    # In C order the file's axes reverse: the channel axis index counts from the end.
    channel_axis = None if not channel_f else len(sizes) - 1 - channel_f[0]
    spatial_shape = tuple(sizes[i] for i in spatial_f)[::-1]
    n_channels = sizes[channel_f[0]] if channel_f else 1
    name = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    info = ItemInfo(
        id=item_id if item_id is not None else sanitize_id(name),
        path=path,
        format="nrrd",
        shape=((n_channels,) if channel_f else ()) + spatial_shape,
        dtype=str(np.dtype(nrrd_dtype(header))),
        axes=(("c",) if channel_f else ()) + ("z", "y", "x")[3 - ndim :],
        spacing=spacing,
        origin=origin,
        units=units,
        affine=None if affine is None else tuple(tuple(float(v) for v in r) for r in affine),
        fingerprint=fingerprint_file(path),
        attrs=attrs,
    )
    return info, channel_axis


_TYPES = {
    **dict.fromkeys(["signed char", "int8", "int8_t"], "int8"),
    **dict.fromkeys(["uchar", "unsigned char", "uint8", "uint8_t"], "uint8"),
    **dict.fromkeys(
        ["short", "short int", "signed short", "signed short int", "int16", "int16_t"], "int16"
    ),
    **dict.fromkeys(
        ["ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"], "uint16"
    ),
    **dict.fromkeys(["int", "signed int", "int32", "int32_t"], "int32"),
    **dict.fromkeys(["uint", "unsigned int", "uint32", "uint32_t"], "uint32"),
    **dict.fromkeys(
        [
            "longlong",
            "long long",
            "long long int",
            "signed long long",
            "signed long long int",
            "int64",
            "int64_t",
        ],
        "int64",
    ),
    **dict.fromkeys(
        ["ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"],
        "uint64",
    ),
    "float": "float32",
    "double": "float64",
}


def nrrd_dtype(header: dict[str, Any]) -> np.dtype:
    """The numpy dtype of the header's ``type`` field (the NRRD format's type names)."""
    name = str(header.get("type", "")).lower()
    if name not in _TYPES:
        raise ItemReadError(f"NRRD type {name!r} is not one segflow reads")
    return np.dtype(_TYPES[name])

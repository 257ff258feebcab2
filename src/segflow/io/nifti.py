"""NIfTI-1/2 volumes through nibabel, presented as ``(z, y, x)``."""

from __future__ import annotations

import functools
import math
from typing import Any

import nibabel as nib
import numpy as np

from segflow.errors import ItemReadError
from segflow.io._common import (
    check_region,
    fingerprint_file,
    format_bytes,
    is_url,
    mtime_ns,
    raise_read_error,
    read_bytes,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import ItemInfo

# Off-diagonal affine terms below this (in mm per voxel) count as zero: NIfTI stores float32.
_AXIS_ALIGNED_TOL = 1e-6
# NIfTI xyzt_units as nibabel names them; "unknown" is read as mm, the NIfTI convention.
_UNIT_NAMES = {"mm": "mm", "micron": "um", "meter": "m"}


class NiftiReader:
    """Windowed reads of a NIfTI volume as ``(1, z, y, x)``.

    nibabel gives arrays in ``(x, y, z)`` index order; this reader transposes them so axes
    follow the project order ``(z, y, x)``. ``info.affine`` is the file's 4x4 voxel-to-world
    (RAS+, mm) matrix *in nibabel's (i, j, k) = (x, y, z) index order*, unchanged.
    ``info.origin`` is the world position of voxel 0 and ``info.spacing`` the signed step
    along each axis, both in ``(z, y, x)`` order, so ``origin + i * spacing`` is the world
    coordinate of voxel ``i`` for axis-aligned affines (the usual case; a flipped axis, as in
    LPS-stored CT, has a negative spacing). For oblique affines, ``spacing`` is the header
    zooms (positive) and the coordinates are only a local frame: use ``affine``.

    Plain ``.nii`` is sliced lazily from disk. ``.nii.gz`` cannot be seeked, so its
    decompressed array is cached once per process (two volumes at most) and sliced.

    Parameters
    ----------
    path : str
        Path of a ``.nii`` or ``.nii.gz`` file.
    item_id : str, optional
        Item id; defaults to the file name without ``.nii``/``.nii.gz``.

    Raises
    ------
    ItemReadError
        If the file is not readable NIfTI or is 4-D (time series or vector volumes).

    Examples
    --------
    >>> reader = NiftiReader("tests/data/ct/STS_002/CT_image.nii.gz", "sts_002")
    >>> reader.info.axes, reader.info.shape
    (('z', 'y', 'x'), (48, 143, 161))
    >>> reader.read((slice(0, 2), slice(0, 3), slice(0, 4))).shape
    (1, 2, 3, 4)
    """

    info: ItemInfo

    def __init__(self, path: str, item_id: str | None = None) -> None:
        self.path = strip_file_scheme(path)
        self.info, self._disk_ndim = _read_nifti_info(self.path, item_id)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(1, *region_shape)``."""
        bounded = check_region(self.info, region)
        # The file's index order is the reverse of ours: (x, y, z) for (z, y, x).
        # Trailing singleton dimensions on disk (x, y, z, 1) are indexed away with 0.
        file_region = bounded[::-1] + (0,) * (self._disk_ndim - len(bounded))
        with wrap_read_errors(self.path, "cannot read NIfTI data"):
            if self.path.endswith(".gz") or is_url(self.path):
                block = _load_gz_volume(self.path, mtime_ns(self.path))[file_region]
            else:
                block = np.asarray(_load_image(self.path, mtime_ns(self.path)).dataobj[file_region])
        return np.ascontiguousarray(block.T)[np.newaxis]

    def __repr__(self) -> str:
        return f"NiftiReader({self.path!r}, item_id={self.info.id!r})"


@functools.lru_cache(maxsize=16)
def _load_image(path: str, mtime: int) -> Any:
    """The nibabel image (header + lazy data proxy) of ``path``; ``mtime`` keys the cache."""
    if is_url(path):  # nibabel reads local files: a remote volume is fetched whole, once
        import gzip

        data = read_bytes(path)
        if path.lower().endswith(".gz"):
            data = gzip.decompress(data)
        return nib.Nifti1Image.from_bytes(data)
    return nib.load(path)


@functools.lru_cache(maxsize=2)
def _load_gz_volume(path: str, mtime: int) -> np.ndarray:
    """The whole decompressed array of a ``.nii.gz`` in file order; ``mtime`` keys the cache."""
    array = np.asarray(_load_image(path, mtime).dataobj)
    array.flags.writeable = False  # shared by every read in this process
    return array


def _diagnose(path: str) -> str:
    """What is wrong with a NIfTI file nibabel refused, in words."""
    import gzip
    import struct

    try:
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:
            head = handle.read(352)
            handle.read()  # a cut gzip stream fails here
    except EOFError:
        return "the compressed data is cut short (a truncated file)"
    except gzip.BadGzipFile:
        return "the file is not gzip data although it is named .gz"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if len(head) < 4:
        return f"it has {len(head)} bytes, too few for a NIfTI header"
    sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
    if not sizes & {348, 540}:
        size = struct.unpack("<i", head[:4])[0]
        return (
            f"its header is not NIfTI (sizeof_hdr is {size}, expected 348 or 540): the "
            "header is damaged or the file is another format"
        )
    return "its header or data is damaged"


# Deflate cannot shrink data more than about 1032:1 (a 258-byte match in at least 2 bits):
# a .nii.gz of N bytes holds at most this many times N bytes of voxels.
DEFLATE_MAX_RATIO = 1032


def _check_data_fits_file(path: str, image: Any, disk_shape: tuple[int, ...]) -> None:
    """Refuse a header that declares more voxel data than the file can hold: a plain
    ``.nii`` must hold every byte after its data offset, a ``.nii.gz`` at most
    :data:`DEFLATE_MAX_RATIO` times its size. A damaged or hostile header (480 bytes claiming
    30000^3 voxels) is caught here, before anything is planned or allocated."""
    if is_url(path):
        return
    import os

    dtype = np.dtype(image.header.get_data_dtype())
    declared = math.prod(disk_shape) * dtype.itemsize
    size = os.path.getsize(path)
    if path.lower().endswith(".gz"):
        room, how = size * DEFLATE_MAX_RATIO, "can hold at most"
    else:
        # Voxels start after the header and its 4-byte extension flag at the earliest,
        # whatever vox_offset says (352 bytes in NIfTI-1, 544 in NIfTI-2).
        offset = max(int(image.dataobj.offset), len(image.header.binaryblock) + 4)
        room, how = size - offset, "holds"
    if declared > room:
        dims = " x ".join(str(n) for n in disk_shape)
        raise ItemReadError(
            f"item '{path}': its NIfTI header declares {dims} {dtype} voxels "
            f"({format_bytes(declared)}), but the file of {format_bytes(size)} {how} "
            f"{format_bytes(max(room, 0))} of voxel data: the header is damaged or the data "
            f"is cut short"
        )


def _read_nifti_info(path: str, item_id: str | None) -> tuple[ItemInfo, int]:
    try:
        image = _load_image(path, mtime_ns(path))
        disk_shape = tuple(int(n) for n in image.shape)
        zooms = tuple(float(z) for z in image.header.get_zooms())
        affine = np.asarray(image.affine, dtype=float)
        # A one-voxel read gives the dtype after scl_slope/scl_inter scaling, cheaply.
        probe = np.asarray(image.dataobj[(slice(0, 1),) * len(disk_shape)])
        space_unit = image.header.get_xyzt_units()[0]
    except Exception as exc:
        raise_read_error(path, f"not a readable NIfTI file: {_diagnose(path)}", exc)
    _check_data_fits_file(path, image, disk_shape)
    shape = disk_shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise_read_error(
            path,
            f"NIfTI shape {disk_shape} is not supported",
            ValueError("expected a 2-D or 3-D volume; split 4-D series into 3-D files"),
        )
    ndim = len(shape)
    linear = affine[:ndim, :ndim]
    if np.all(np.abs(linear - np.diag(np.diag(linear))) < _AXIS_ALIGNED_TOL):
        steps = tuple(float(v) for v in np.diag(linear))
    else:
        steps = zooms[:ndim]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
    info = ItemInfo(
        id=item_id if item_id is not None else sanitize_id(stem),
        path=path,
        format="nifti",
        shape=shape[::-1],
        dtype=str(probe.dtype),
        axes=("z", "y", "x")[3 - ndim :],
        spacing=steps[::-1],
        origin=tuple(float(v) for v in affine[:ndim, 3][::-1]),
        units=_UNIT_NAMES.get(space_unit, "mm"),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        fingerprint=fingerprint_file(path),
        attrs={"orientation": "".join(nib.orientations.aff2axcodes(affine))},
    )
    return info, len(disk_shape)

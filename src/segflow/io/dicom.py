"""DICOM series through pydicom: one volume per ``SeriesInstanceUID``, in millimetres.

A folder as a scanner or PACS exports it holds one file per slice, often without a suffix,
sometimes several series side by side, and objects that are not images (RTSTRUCT, SEG,
SR). Discovery sniffs the ``DICM`` preamble, reads headers only, and groups the image
files of one folder by ``SeriesInstanceUID`` (:func:`group_series`); an item's path is
the first file of its series, and :class:`DicomSeriesReader` reads the whole series back
from that file's folder.

Geometry follows the standard, not file names or ``InstanceNumber``: slices are ordered by
their position along the slice normal (the cross product of the row and column
directions of ``ImageOrientationPatient``), the slice step comes from those positions
(uneven steps, a repeated position or a gantry tilt are refused with the figures), and
``PixelSpacing`` gives the in-plane steps. The voxel-to-world matrix is given as the NIfTI
reader gives it, RAS+ in millimetres in ``(x, y, z)`` index order (DICOM's patient frame
is LPS: x and y change sign), so a series and its NIfTI conversion get the same
coordinates. Stored values are rescaled by ``RescaleSlope`` / ``RescaleIntercept``
(Hounsfield units for CT). Compressed transfer syntaxes are decoded by pydicom's plugins
(pylibjpeg, pyjpegls). An enhanced multi-frame object is one item with its frames as
slices, positioned by its per-frame functional groups.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow.errors import ItemReadError
from segflow.io._common import (
    check_region,
    fingerprint_file,
    raise_read_error,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import ItemInfo

# SOP classes of objects that are not images to segment; skipped with a note.
_NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.11.1": "presentation state",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
}
# Positions and steps agree within this fraction of the slice step (0.1 % of 3 mm is 3 um).
_SPACING_TOLERANCE = 1e-3
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class _Slice:
    """One 2-D frame of the series: its file, frame index, position and rescale."""

    path: str
    frame: int | None  # None: a single-frame file
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    slope: float
    intercept: float


class DicomSeriesReader:
    """Windowed reads of a DICOM series as ``(1, z, y, x)`` (a one-slice series: ``(y, x)``).

    Parameters
    ----------
    path : str
        Any file of the series (discovery passes the first); the series is every file in
        that folder with the same ``SeriesInstanceUID``.
    item_id : str, optional
        Item id; defaults to the series number and description (``3_CT_CHEST``).

    Raises
    ------
    ItemReadError
        If the file is not a DICOM image, or the series has no consistent geometry (mixed
        orientations or sizes, repeated positions, uneven spacing, gantry tilt).
    """

    info: ItemInfo

    def __init__(self, path: str, item_id: str | None = None) -> None:
        self.path = strip_file_scheme(path)
        header = _header(self.path)
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid or not _is_image(header):
            raise ItemReadError(
                f"item '{self.path}': not a DICOM image (SOP class "
                f"{_sop_name(header)}, no pixel data to segment)"
            )
        folder = os.path.dirname(os.path.abspath(self.path))
        files = _series_files(folder, uid, _folder_stamp(folder))
        self.files = files
        self._slices, self.info = _read_series(files, self.path, uid, item_id)

    @property
    def slice_sources(self) -> tuple[tuple[str, int | None], ...]:
        """Where each slice of the item comes from, in the item's ``z`` order: ``(file,
        frame)``, the frame index of an enhanced multi-frame object or None for a
        single-frame file (what a DICOM SEG of the item must reference, slice by slice)."""
        return tuple((s.path, s.frame) for s in self._slices)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(1, *region_shape)``."""
        bounded = check_region(self.info, region)
        if len(bounded) == 2:
            bounded = (slice(0, 1), *bounded)
        rows, cols = bounded[1], bounded[2]
        dtype = np.dtype(self.info.dtype)
        out = np.empty(
            (bounded[0].stop - bounded[0].start, rows.stop - rows.start, cols.stop - cols.start),
            dtype=dtype,
        )
        for k in range(bounded[0].start, bounded[0].stop):
            item = self._slices[k]
            with wrap_read_errors(item.path, "cannot decode DICOM pixel data"):
                frame = _frame(item.path, _mtime(item.path), item.frame)[rows, cols]
            if item.slope != 1.0 or item.intercept != 0.0:
                frame = frame * item.slope + item.intercept
            out[k - bounded[0].start] = frame
        return out[np.newaxis] if len(region) == 3 else out[np.newaxis, 0]

    def __repr__(self) -> str:
        return f"DicomSeriesReader({self.path!r}, item_id={self.info.id!r})"


def group_series(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """One path per series among DICOM ``paths`` (its first file), and notes on the files
    left out (objects that are not images, unreadable headers)."""
    series: dict[tuple[str, str], list[str]] = defaultdict(list)
    skipped: dict[str, list[str]] = defaultdict(list)
    for path in sorted(paths):
        try:
            header = _header(path)
        except ItemReadError:
            skipped["unreadable header"].append(path)
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid or not _is_image(header):
            skipped[_sop_name(header)].append(path)
            continue
        series[(os.path.dirname(os.path.abspath(path)), uid)].append(path)
    notes = [
        f"left out {len(files)} DICOM object(s) that are not images to segment ({kind}): "
        f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
        for kind, files in sorted(skipped.items())
    ]
    return sorted(files[0] for files in series.values()), notes


def series_name(path: str) -> str:
    """The series' number and description as an item name (``3_CT_CHEST``)."""
    header = _header(path)
    parts = [str(header.get(k, "")).strip() for k in ("SeriesNumber", "SeriesDescription")]
    name = "_".join(p for p in parts if p)
    return sanitize_id(name) if name else str(header.get("SeriesInstanceUID", "series"))[-12:]


def _header(path: str) -> Any:
    return _cached_header(path, _mtime(path))


@functools.lru_cache(maxsize=4096)
def _cached_header(path: str, mtime: int) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise_read_error(path, "not a readable DICOM file", exc)


def _mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def _folder_stamp(folder: str) -> int:
    return os.stat(folder).st_mtime_ns


@functools.lru_cache(maxsize=64)
def _series_files(folder: str, uid: str, stamp: int) -> tuple[str, ...]:
    """Every file of series ``uid`` in ``folder``; ``stamp`` (its mtime) keys the cache."""
    from segflow.io.builtin import DicomBackend

    backend = DicomBackend()
    found = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(full) or not backend.guess_can_open(full):
            continue
        try:
            header = _header(full)
        except ItemReadError:
            continue
        if str(header.get("SeriesInstanceUID", "")) == uid and _is_image(header):
            found.append(full)
    return tuple(found)


def _is_image(header: Any) -> bool:
    sop = str(header.get("SOPClassUID", ""))
    return sop not in _NON_IMAGE_SOP and "Rows" in header and "Columns" in header


def _sop_name(header: Any) -> str:
    sop = str(header.get("SOPClassUID", ""))
    return _NON_IMAGE_SOP.get(sop, str(header.get("Modality", "")) or sop or "unknown")


@functools.lru_cache(maxsize=8)
def _pixels(path: str, mtime: int) -> np.ndarray:
    """The stored pixel values of a file (every frame), decoded once per process."""
    import pydicom

    array = np.asarray(pydicom.dcmread(path).pixel_array)
    array.flags.writeable = False
    return array


def _frame(path: str, mtime: int, frame: int | None) -> np.ndarray:
    array = _pixels(path, mtime)
    return array if frame is None else array[frame]


def _read_series(
    files: Sequence[str], path: str, uid: str, item_id: str | None
) -> tuple[list[_Slice], ItemInfo]:
    headers = [_header(f) for f in files]
    first = headers[0]
    label = f"{path} (series {uid})"
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise ItemReadError(
            f"item '{label}': {first.SamplesPerPixel} samples per pixel; segflow reads "
            "greyscale DICOM series (SamplesPerPixel 1)"
        )
    if len(headers) == 1 and int(first.get("NumberOfFrames", 1) or 1) > 1:
        slices, row_dir, col_dir, pixel_spacing = _frames_of(files[0], first, label)
    else:
        slices, row_dir, col_dir, pixel_spacing = _files_of(files, headers, label)
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s.position, normal)))
    positions = np.array([s.position for s in slices])
    step = _slice_step(positions, normal, label)
    rows, cols = int(first.Rows), int(first.Columns)
    dy, dx = pixel_spacing
    # The LPS voxel-to-world matrix in (col, row, slice) = (x, y, z) index order.
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = step if len(slices) > 1 else normal * _thickness(first)
    lps[:3, 3] = positions[0]
    affine = np.eye(4)
    affine[:3] = _LPS_TO_RAS @ lps[:3]
    linear = affine[:3, :3]
    axis_aligned = np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6)
    steps = np.diag(linear) if axis_aligned else np.linalg.norm(linear, axis=0)
    volume = len(slices) > 1
    dtype = _value_dtype(first, slices)
    name = series_name(path)
    import nibabel as nib

    attrs: dict[str, object] = {
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
        "dicom_series_instance_uid": uid,
        "dicom_study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "dicom_modality": str(first.get("Modality", "")),
        "dicom_series_description": str(first.get("SeriesDescription", "")),
        "dicom_image_orientation_patient": [float(v) for v in (*row_dir, *col_dir)],
        "dicom_first_image_position_patient": [float(v) for v in positions[0]],
        "dicom_slices": len(slices),
    }
    if any(s.slope != 1.0 or s.intercept != 0.0 for s in slices):
        attrs["dicom_rescale"] = "RescaleSlope / RescaleIntercept applied"
        if str(first.get("Modality", "")) == "CT":
            attrs["value_units"] = "HU"
    shape = (len(slices), rows, cols) if volume else (rows, cols)
    spacing = (float(steps[2]), float(steps[1]), float(steps[0]))
    origin = tuple(float(v) for v in affine[:3, 3][::-1])
    info = ItemInfo(
        id=item_id if item_id is not None else name,
        path=path,
        format="dicom",
        shape=shape,
        dtype=str(dtype),
        axes=("z", "y", "x") if volume else ("y", "x"),
        spacing=spacing if volume else spacing[1:],
        origin=origin if volume else origin[1:],
        units="mm",
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        fingerprint=_fingerprint(files),
        attrs=attrs,
    )
    return slices, info


def _files_of(
    files: Sequence[str], headers: Sequence[Any], label: str
) -> tuple[list[_Slice], np.ndarray, np.ndarray, tuple[float, float]]:
    first = headers[0]
    orientation = _floats(first, "ImageOrientationPatient", label, 6)
    spacing = _floats(first, "PixelSpacing", label, 2)
    slices = []
    for path, header in zip(files, headers, strict=True):
        if (int(header.Rows), int(header.Columns)) != (int(first.Rows), int(first.Columns)):
            raise ItemReadError(
                f"item '{label}': slice {os.path.basename(path)} is {header.Rows}x"
                f"{header.Columns}, the series' first slice {first.Rows}x{first.Columns}"
            )
        if not np.allclose(_floats(header, "ImageOrientationPatient", label, 6), orientation):
            raise ItemReadError(
                f"item '{label}': slice {os.path.basename(path)} has another "
                "ImageOrientationPatient than the first; a series must share one"
            )
        if not np.allclose(_floats(header, "PixelSpacing", label, 2), spacing):
            raise ItemReadError(
                f"item '{label}': slice {os.path.basename(path)} has PixelSpacing "
                f"{list(header.PixelSpacing)}, the first slice {list(first.PixelSpacing)}"
            )
        position = _floats(header, "ImagePositionPatient", label, 3)
        slices.append(
            _Slice(
                path,
                None,
                (float(position[0]), float(position[1]), float(position[2])),
                float(header.get("RescaleSlope", 1) or 1),
                float(header.get("RescaleIntercept", 0) or 0),
            )
        )
    row_dir, col_dir = _directions(orientation)
    return slices, row_dir, col_dir, (float(spacing[0]), float(spacing[1]))


def _frames_of(
    path: str, header: Any, label: str
) -> tuple[list[_Slice], np.ndarray, np.ndarray, tuple[float, float]]:
    """The frames of an enhanced multi-frame object, from its functional groups."""
    import pydicom

    full = pydicom.dcmread(path, stop_before_pixels=True)  # the groups, not cached headers
    shared = full.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = full.get("PerFrameFunctionalGroupsSequence")
    n_frames = int(full.NumberOfFrames)
    if per_frame is None or len(per_frame) != n_frames:
        raise ItemReadError(
            f"item '{label}': a multi-frame object of {n_frames} frames without per-frame "
            "positions (PerFrameFunctionalGroupsSequence); its slice geometry is unknown"
        )

    def group(frame: Any, name: str) -> Any:
        for source in (frame, shared):
            if source is not None and name in source:
                return source[name].value[0]
        raise ItemReadError(f"item '{label}': the multi-frame object has no {name}")

    orientation = _floats(group(per_frame[0], "PlaneOrientationSequence"),
                          "ImageOrientationPatient", label, 6)  # fmt: skip
    spacing = _floats(group(per_frame[0], "PixelMeasuresSequence"), "PixelSpacing", label, 2)
    slices = []
    for index, frame in enumerate(per_frame):
        position = _floats(group(frame, "PlanePositionSequence"), "ImagePositionPatient", label, 3)
        try:
            transform = group(frame, "PixelValueTransformationSequence")
            slope = float(transform.get("RescaleSlope", 1) or 1)
            intercept = float(transform.get("RescaleIntercept", 0) or 0)
        except ItemReadError:
            slope = float(full.get("RescaleSlope", 1) or 1)
            intercept = float(full.get("RescaleIntercept", 0) or 0)
        slices.append(
            _Slice(
                path,
                index,
                (float(position[0]), float(position[1]), float(position[2])),
                slope,
                intercept,
            )
        )
    row_dir, col_dir = _directions(orientation)
    return slices, row_dir, col_dir, (float(spacing[0]), float(spacing[1]))


def _floats(header: Any, name: str, label: str, n: int) -> np.ndarray:
    value = header.get(name) if header is not None else None
    if value is None or len(value) != n:
        raise ItemReadError(
            f"item '{label}': {name} is missing or malformed ({value!r}); the slice geometry "
            "is unknown"
        )
    return np.array([float(v) for v in value])


def _directions(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    row_dir, col_dir = orientation[:3], orientation[3:]
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)


def _slice_step(positions: np.ndarray, normal: np.ndarray, label: str) -> np.ndarray:
    """The one LPS vector from each slice to the next; refuses uneven steps and tilt."""
    if len(positions) < 2:
        return normal
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < 1e-6):
        k = int(np.argmin(np.abs(along)))
        raise ItemReadError(
            f"item '{label}': two slices share the position {positions[k].tolist()} "
            "(a repeated acquisition or two series with one SeriesInstanceUID)"
        )
    median = float(np.median(along))
    if np.max(np.abs(along - median)) > _SPACING_TOLERANCE * abs(median) + 1e-4:
        found = sorted({round(float(a), 4) for a in along})
        raise ItemReadError(
            f"item '{label}': uneven slice spacing along the normal ({found[:6]} mm); "
            "segflow needs evenly spaced slices: resample the series, or split it where "
            "the spacing changes"
        )
    mean = steps.mean(axis=0)
    sideways = np.linalg.norm(mean - (mean @ normal) * normal)
    if sideways > _SPACING_TOLERANCE * abs(median) + 1e-4:
        raise ItemReadError(
            f"item '{label}': the slices are offset sideways by {sideways:.3f} mm per "
            f"{abs(median):.3f} mm step (gantry tilt or a sheared volume); resample it to "
            "an orthogonal grid first"
        )
    return np.asarray(mean)


def _thickness(header: Any) -> float:
    value = header.get("SliceThickness") or header.get("SpacingBetweenSlices") or 1.0
    return float(value)


def _value_dtype(header: Any, slices: Sequence[_Slice]) -> np.dtype:
    """The dtype of rescaled values: the stored one, a wider integer, or float32."""
    bits = int(header.get("BitsStored", header.get("BitsAllocated", 16)))
    signed = int(header.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.dtype(f"{'int' if signed else 'uint'}{max(8, int(header.BitsAllocated))}")
    if all(s.slope == 1.0 and s.intercept == 0.0 for s in slices):
        return stored
    if not all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices):
        return np.dtype(np.float32)
    ends = [v * s.slope + s.intercept for s in slices for v in (low, high)]
    for candidate in (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= min(ends) and max(ends) <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float64)


def _fingerprint(files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(fingerprint_file(path).encode())
    return digest.hexdigest()[:16]

"""Write DICOM series for the reader tests: as a scanner exports them, from a numpy volume."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _new_dataset(sop_class: str) -> Dataset:
    """A dataset of ``sop_class`` with its file meta and a fresh SOP instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def _image_dataset(
    sop_class: str, series_uid: str, study_uid: str, rows: int, cols: int, **series: object
) -> Dataset:
    ds = _new_dataset(sop_class)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "segflow-test"
    ds.SeriesNumber = series.get("number", 3)
    ds.SeriesDescription = series.get("description", "CT CHEST")
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: Sequence[float],
    origin: Sequence[float],
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    transfer_syntax: str | None = None,
    number: int = 3,
    description: str = "CT CHEST",
    name: str = "IM{:04d}",
    positions: Sequence[Sequence[float]] | None = None,
) -> str:
    """Write ``hu`` (z, y, x Hounsfield units) as one CT file per slice, stored as unsigned
    12-bit values with intercept -1024, named in reverse slice order (so only positions
    order them). ``spacing`` is (dz, dy, dx) and ``origin`` the LPS position of the first
    slice's first pixel. Returns the series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    row_dir = np.array(orientation[:3], dtype=float)
    col_dir = np.array(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    stored = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16)
    n = len(hu)
    for k in range(n):
        ds = _image_dataset(
            CTImageStorage, series_uid, study_uid, *hu.shape[1:], number=number,
            description=description,
        )  # fmt: skip
        position = (
            np.asarray(positions[k], dtype=float)
            if positions is not None
            else np.asarray(origin, dtype=float) + k * spacing[0] * normal
        )
        ds.FrameOfReferenceUID = frame_uid
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
        ds.SliceThickness = f"{spacing[0]:.4f}"
        ds.InstanceNumber = n - k  # reversed: file order and numbers must not matter
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        _set_pixels(ds, stored[k], transfer_syntax)
        ds.save_as(folder / name.format(n - k), enforce_file_format=True)
    return str(series_uid)


def _set_pixels(ds: Dataset, frame: np.ndarray, transfer_syntax: str | None) -> None:
    if transfer_syntax == JPEGBaseline8Bit:  # lossy 8-bit: pydicom cannot encode it
        import imageio.v3 as iio

        eight = (frame >> 4).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.RescaleSlope, ds.RescaleIntercept = 16, -1024
        data = iio.imwrite("<bytes>", eight, extension=".jpg", quality=95)
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        return
    ds.PixelData = frame.tobytes()
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)


def write_non_image(folder: Path, name: str = "RS0001.dcm") -> None:
    """An RTSTRUCT-like object (no pixel data) in the folder, as exports carry them."""
    ds = _new_dataset(RTSTRUCT)
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.save_as(folder / name, enforce_file_format=True)


def write_multiframe(
    path: Path, hu: np.ndarray, *, spacing: Sequence[float], origin: Sequence[float]
) -> None:
    """``hu`` as one enhanced CT object, its frames in reverse slice order."""
    from pydicom.sequence import Sequence as DicomSequence

    ds = _image_dataset(ENHANCED_CT, generate_uid(), generate_uid(), *hu.shape[1:])
    n = len(hu)
    ds.NumberOfFrames = n
    ds.FrameOfReferenceUID = generate_uid()
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [spacing[1], spacing[2]]
    measures.SliceThickness = spacing[0]
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    order = list(range(n))[::-1]
    for k in order:
        group = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        group.PlanePositionSequence = DicomSequence([plane])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    stored = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16)[order]
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())

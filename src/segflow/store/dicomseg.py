"""Masks as a DICOM Segmentation object beside the arrays: ``STORE/ITEM/seg.dcm``.

For an item read from a DICOM series (``output.dicom_seg: true``), the output is also
written as one DICOM SEG instance (highdicom) in the source's frame of reference: a PACS
stores it with the study, and a DICOM viewer (3D Slicer, OHIF) shows it over the images.

What the segments are:

- the pipeline's output: labels or a mask as **one** segment ``foreground`` (every non-zero
  voxel; an instance label image with thousands of objects does not become thousands of
  segments), a class map as one segment per class (its ``classify`` name, else
  ``class N`` for each id found);
- every ``save_as`` class map with names (``classify`` with ``names``, as in
  ``configs/ct.yaml``): one segment per class, labelled ``NAME`` (the array's name is in
  the segment's tracking id, ``ARRAY/NAME``).

The segmentation type is ``BINARY`` (one bit per voxel and segment): segments may overlap
(the body and its bone), and it is the type SEG readers have supported longest; the newer
``LABELMAP`` type would not save segments either, since it also needs a description per
value.

Every frame is kept, empty or not, so the object has ``slices x segments`` frames: that is
what :func:`check_seg` verifies. The plane of segflow's slice ``k`` (the reader's order,
along the slice normal) becomes a frame that references the source instance of slice
``k`` (and its frame, for an enhanced multi-frame source), with that slice's position and
orientation. highdicom stores the frames segment by segment, each segment's frames sorted
along the normal in its own direction (for the axial test series, the reverse of ``z``):
readers place frames by their references and positions, never by their order.

Memory: the stored arrays are read one slice at a time, but highdicom builds the object
from one array in memory: ``slices x rows x columns x segments`` bytes (one byte per
voxel and segment), plus the encoded file (an eighth of that: one bit per voxel and
segment) two or three times over while writing; a 512 x 512 x 600 CT with four segments
takes about 0.7 GB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.errors import PlanError, StoreError

if TYPE_CHECKING:
    from segflow.io.base import ItemInfo

SEG_NAME = "seg.dcm"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# The outputs a SEG can hold: ids, not intensities or probabilities.
_SEGMENTABLE = ("labels", "mask", "classes")


@dataclass(frozen=True)
class Segment:
    """One segment of the SEG: the voxels of array ``array`` that are ``value`` (any
    non-zero value when None), shown as ``label`` in ``color`` (``#rrggbb``, optional)."""

    array: str
    value: int | None
    label: str
    color: str | None = None


def check_dicom_seg(info: ItemInfo, out_kind: str) -> None:
    """Refuse ``output.dicom_seg`` for an item it cannot apply to (callers name the item).

    Raises
    ------
    PlanError
        When the item is not a DICOM series, or the pipeline's output is no mask, labels
        or class map.
    """
    if info.format != "dicom":
        raise PlanError(
            f"`output.dicom_seg` (true) needs a DICOM series as input, this item is "
            f"{info.format!r}: a SEG references the source images; set output.dicom_seg: "
            "false for other formats"
        )
    if out_kind not in _SEGMENTABLE:
        raise PlanError(
            f"`output.dicom_seg` (true) needs a pipeline that ends in labels, a mask or a "
            f"class map, this one gives {out_kind}: set output.dicom_seg: false or end the "
            "pipeline with a threshold, classify or label step"
        )


def plan_segments(
    out_kind: str,
    out_categories: Sequence[tuple[int, str, str | None]],
    saved_categories: dict[str, Sequence[tuple[int, str, str | None]]],
    *,
    out_values: Sequence[int] = (),
) -> list[Segment]:
    """The segments of an item's SEG, in segment-number order (see the module note).

    ``out_values`` are the non-zero ids of an unnamed class-map output (found by a pass
    over it); ignored otherwise.

    Examples
    --------
    >>> [s.label for s in plan_segments("labels", (), {"classes": ((1, "air", None),)})]
    ['foreground', 'air']
    """
    segments: list[Segment] = []
    if out_kind == "classes":
        if out_categories:
            segments += [Segment(out_kind, v, n, c) for v, n, c in out_categories if v != 0]
        else:
            segments += [Segment(out_kind, int(v), f"class {int(v)}") for v in out_values]
    else:
        segments.append(Segment(out_kind, None, "foreground"))
    for name, categories in sorted(saved_categories.items()):
        segments += [Segment(name, v, n, c) for v, n, c in categories if v != 0]
    return segments


def class_values(reader: Any, shape: Sequence[int]) -> list[int]:
    """The non-zero values of a stored array, read one slice at a time."""
    found: set[int] = set()
    for region in _slices(shape):
        found.update(int(v) for v in np.unique(reader.read(region)))
    found.discard(0)
    return sorted(found)


def write_dicom_seg(
    path: str,
    *,
    sources: Sequence[tuple[str, int | None]],
    arrays: dict[str, Any],
    shape: Sequence[int],
    segments: Sequence[Segment],
    uid_seed: Sequence[str],
    software_version: str,
    algorithm_family: str = "rules",
) -> int:
    """Write the SEG of one item to ``path`` (any fsspec URL); return the frame count it
    must have (slices x segments).

    Parameters
    ----------
    path : str
        Where ``seg.dcm`` goes (local or an object store).
    sources : sequence of (str, int or None)
        Each slice's source file and frame, in the item's ``z`` order
        (:attr:`~segflow.io.dicom.DicomSeriesReader.slice_sources`).
    arrays : dict
        Array name to a reader of the stored array (``read(region)``, ``(z), y, x``).
    shape : sequence of int
        The item's spatial shape, ``(z, y, x)`` or ``(y, x)`` for a one-slice series.
    segments : sequence of Segment
        The segments, numbered from 1 in this order.
    uid_seed : sequence of str
        What names this output (series UID, fingerprint, config hash, code version): the
        SEG's series and instance UIDs derive from it, so a rerun of the same item with the
        same config and code writes the same UIDs.
    software_version : str
        segflow's code version, recorded as the software that made the object.
    algorithm_family : {"rules", "model"}
        ``model`` when a trained network made the masks (coded as artificial intelligence).

    Raises
    ------
    ValueError
        If ``sources`` does not have one entry per slice, or ``segments`` is empty.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    volume_shape = tuple(int(n) for n in shape)
    if len(volume_shape) == 2:
        volume_shape = (1, *volume_shape)
    if len(sources) != volume_shape[0]:
        raise ValueError(
            f"`sources` has {len(sources)} slices, the item {volume_shape[0]} (shape {shape})"
        )
    if not segments:
        raise ValueError("`segments` is empty: a SEG needs at least one segment")
    stack = _segment_stack(arrays, shape, volume_shape, segments)
    headers, stack = _source_headers(sources, stack)
    descriptions = _segment_descriptions(segments, uid_seed, software_version, algorithm_family)
    first = headers[0]
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=stack,  # (z, y, x, segment): stacked segments may overlap
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[*uid_seed, "series"]),
        series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(entropy_srcs=[*uid_seed, "instance"]),
        instance_number=1,
        manufacturer="segflow",
        manufacturer_model_name="segflow",
        software_versions=software_version,
        device_serial_number="none",
        content_description="segflow output",
        content_label="SEGFLOW",
        omit_empty_frames=False,  # frames = slices x segments, checked by check_seg
    )
    _save(seg, path)
    return volume_shape[0] * len(segments)  # every frame kept: what check_seg expects


def _segment_stack(
    arrays: dict[str, Any],
    shape: Sequence[int],
    volume_shape: tuple[int, ...],
    segments: Sequence[Segment],
) -> np.ndarray:
    """The segments' binary masks, ``(z, y, x, segment)`` uint8, read slice by slice from
    the stored ``arrays`` (``volume_shape`` is ``shape`` with a ``z`` axis)."""
    stack = np.zeros((*volume_shape, len(segments)), dtype=np.uint8)
    for k, region in enumerate(_slices(shape)):
        planes = {name: np.asarray(reader.read(region)) for name, reader in arrays.items()}
        for s, segment in enumerate(segments):
            plane = planes[segment.array].reshape(volume_shape[1:])
            stack[k, ..., s] = plane != 0 if segment.value is None else plane == segment.value
    return stack


def _source_headers(
    sources: Sequence[tuple[str, int | None]], stack: np.ndarray
) -> tuple[list[Any], np.ndarray]:
    """The source files' headers, one per file in slice order, and ``stack`` in the order
    highdicom pairs its planes with them."""
    import pydicom

    # In slice order, one header per file: highdicom pairs array plane k with source k...
    files = list(dict.fromkeys(file for file, _ in sources))
    headers = [_complete(pydicom.dcmread(file, stop_before_pixels=True), file) for file in files]
    if any(frame is not None for _, frame in sources):
        # ...or, for one enhanced multi-frame source, with its frame k.
        stack = stack[np.argsort([int(frame or 0) for _, frame in sources])]
    return headers, stack


def _segment_descriptions(
    segments: Sequence[Segment],
    uid_seed: Sequence[str],
    software_version: str,
    algorithm_family: str,
) -> list[Any]:
    """highdicom's description of each segment, numbered from 1, with segflow as the
    algorithm (``model``: artificial intelligence, else histogram analysis)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    family = (
        codes.cid7162.ArtificialIntelligence
        if algorithm_family == "model"
        else codes.cid7162.HistogramAnalysis
    )
    algorithm = hd.AlgorithmIdentificationSequence(
        name="segflow", family=family, version=software_version
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=codes.SCT.PhysicalObject,
            segmented_property_type=codes.SCT.PhysicalObject,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"{segment.array}/{segment.label}",
            tracking_uid=generate_uid(entropy_srcs=[*uid_seed, "segment", str(number)]),
            display_color=None
            if segment.color is None
            else hd.color.CIELabColor.from_string(segment.color),
        )
        for number, segment in enumerate(segments, start=1)
    ]


def _save(seg: Any, path: str) -> None:
    """Write ``seg`` to ``path`` (any fsspec URL) in one write."""
    import fsspec

    buffer = io.BytesIO()
    seg.save_as(buffer)
    with fsspec.open(path, "wb", auto_mkdir=True) as handle:
        handle.write(buffer.getbuffer())


def check_seg(path: str, item_id: str, frames: int) -> None:
    """The SEG at ``path`` is readable, a Segmentation, and has ``frames`` frames.

    Raises
    ------
    StoreError
        Naming the item and what is wrong.
    """
    import fsspec
    import pydicom

    try:
        with fsspec.open(path, "rb") as handle:
            header = pydicom.dcmread(handle, stop_before_pixels=True)
    except Exception as exc:
        raise StoreError(f"item '{item_id}': {SEG_NAME} is unreadable ({exc})") from exc
    if str(header.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise StoreError(
            f"item '{item_id}': {SEG_NAME} is no DICOM Segmentation (SOP class "
            f"{header.get('SOPClassUID', 'missing')})"
        )
    found = int(header.get("NumberOfFrames", 0) or 0)
    if found != frames:
        raise StoreError(f"item '{item_id}': {SEG_NAME} has {found} frames, expected {frames}")


# Type 2 attributes (present, possibly empty) of the Patient and General Study modules
# that the SEG copies from its source: anonymised exports sometimes drop them altogether.
_COPIED_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _complete(header: Any, path: str) -> Any:
    """``header`` with the type 2 attributes the SEG copies present (empty when missing);
    refuses a source without the frame of reference a SEG must share."""
    for keyword in _COPIED_TYPE_2:
        if keyword not in header:
            setattr(header, keyword, "")
    if not str(header.get("FrameOfReferenceUID", "")):
        raise ValueError(
            f"source image '{path}' has no FrameOfReferenceUID: a DICOM SEG is positioned "
            "in its source's frame of reference"
        )
    return header


def _slices(shape: Sequence[int]) -> list[tuple[slice, ...]]:
    """One region per slice of ``shape`` (the whole plane of a 2-D item)."""
    if len(shape) == 2:
        return [(slice(0, int(shape[0])), slice(0, int(shape[1])))]
    rows, cols = slice(0, int(shape[1])), slice(0, int(shape[2]))
    return [(slice(k, k + 1), rows, cols) for k in range(int(shape[0]))]

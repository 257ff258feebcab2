"""A DICOM series in, ``seg.dcm`` out: a DICOM SEG that references every source slice.

The SEG is read back with pydicom (frame by frame, through each frame's reference to its
source instance) and with highdicom (by source instance, in the reader's slice order), and
compared with the labels and class maps stored in the Zarr group.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import zarr
from _dicom import write_multiframe, write_series

from segflow.config import load_config, parse_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import PlanError, StoreError
from segflow.io import ArrayReader, open_item
from segflow.io.base import ItemInfo
from segflow.store.dicomseg import check_dicom_seg
from segflow.store.writers import WriteTarget, get_writer

ROOT = Path(__file__).resolve().parents[2]
LABEL_PIPELINE = [{"op": "threshold", "value": 100}, {"op": "label", "connectivity": 1}]


def _volume(slices: int, seed: int = 0) -> np.ndarray:
    """A (slices, 40, 50) HU volume: soft tissue, blobs of bone (many objects), some air."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 20, size=(slices, 40, 50))
    hu[:, :, :8] = -900  # air on the left
    for _ in range(12):
        z, y, x = rng.integers(0, slices), rng.integers(3, 37), rng.integers(12, 47)
        hu[z, y - 2 : y + 2, x - 2 : x + 2] = 700
    return np.round(hu)


def _segment(reader: object, pipeline: list[dict[str, object]], store: Path, **options: object):
    with LocalExecutor(2) as executor:
        return segment_item(
            reader,  # type: ignore[arg-type]
            pipeline,
            store=str(store),
            block_shape=[4, 32, 32][-len(reader.info.spatial_shape) :],  # type: ignore[attr-defined]
            executor=executor,
            dicom_seg=True,
            **options,  # type: ignore[arg-type]
        )


def _stored(store: Path, item_id: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(store), path=f"{item_id}/{name}", mode="r")[...])


def _verify_seg(store: Path, info: ItemInfo, *, frames: int) -> None:
    """The DICOM SEG writer's commit check of ``STORE/ITEM/seg.dcm``: ``frames`` frames."""
    writer = get_writer("dicom_seg")
    assert writer.verify is not None
    target = WriteTarget(str(store), info, "labels", None, states={"dicom_seg": frames})
    writer.verify(target, writer.settings(), ["seg.dcm"])


def _headers(reader: object) -> dict[str, pydicom.Dataset]:
    """The source headers by SOP instance UID."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in reader.files]  # type: ignore[attr-defined]
    return {str(h.SOPInstanceUID): h for h in headers}


@pytest.mark.parametrize("slices", [6, 1])
def test_a_labels_seg_references_every_source_slice_and_holds_the_foreground(
    tmp_path: Path, slices: int
) -> None:
    hu = _volume(slices)
    series_uid = write_series(tmp_path / "ct", hu, spacing=(2.5, 0.8, 0.7), origin=(-12, 30, 80))
    reader = open_item(str(sorted((tmp_path / "ct").iterdir())[0]))
    store = tmp_path / "out.zarr"

    result = _segment(reader, LABEL_PIPELINE, store)

    assert result.status == "done", result.error
    assert result.object_count is not None and result.object_count > 1  # many objects...
    labels = _stored(store, reader.info.id, "labels").reshape(slices, 40, 50)
    path = store / reader.info.id / "seg.dcm"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY" and len(ds.SegmentSequence) == 1  # ...one segment
    assert ds.SegmentSequence[0].SegmentLabel == "foreground"
    assert int(ds.NumberOfFrames) == slices
    sources = _headers(reader)
    first = next(iter(sources.values()))
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    (referenced,) = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series_uid
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(
        sources
    )
    # Each frame: its source instance, that instance's position, and the labels of the
    # slice the reader put that instance at.
    z_of = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: z
            for z, (f, _) in enumerate(reader.slice_sources)}  # fmt: skip
    frames = ds.pixel_array.reshape(slices, 40, 50)
    seen = []
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        (source,) = group.DerivationImageSequence[0].SourceImageSequence
        uid = source.ReferencedSOPInstanceUID
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
        np.testing.assert_array_equal(frames[k], labels[z_of[uid]] > 0)
        seen.append(uid)
    assert sorted(seen) == sorted(sources)  # every slice has its frame
    # highdicom, by source instance in the reader's (z) order, gives the volume back.
    seg = hd.seg.segread(path)
    in_z_order = sorted(z_of, key=z_of.__getitem__)
    volume = seg.get_pixels_by_source_instance(in_z_order, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(volume, labels > 0)
    _verify_seg(store, reader.info, frames=slices)


def test_named_class_maps_of_the_ct_config_become_named_segments(tmp_path: Path) -> None:
    hu = _volume(6, seed=3)
    write_series(tmp_path / "ct", hu, spacing=(2.0, 0.9, 0.9), origin=(0, 0, -40))
    reader = open_item(str(sorted((tmp_path / "ct").iterdir())[0]))
    config = load_config(ROOT / "configs" / "ct.yaml")
    pipeline = [
        {**step, "colors": ["#000000", "#ff8080", "#ffffff"]} if step["op"] == "classify" else step
        for step in config.pipeline
    ]
    store = tmp_path / "out.zarr"

    result = _segment(reader, pipeline, store)

    assert result.status == "done", result.error
    seg = hd.seg.segread(store / reader.info.id / "seg.dcm")
    names = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert names == ["foreground", "air", "soft_tissue", "bone"]
    assert seg.get_segment_description(4).tracking_id == "classes/bone"
    bone = seg.get_segment_description(4)  # the colour given to `classify`, in CIELab
    white = hd.color.CIELabColor.from_string("#ffffff").value
    assert tuple(bone.RecommendedDisplayCIELabValue) == white
    classes = _stored(store, reader.info.id, "classes")
    labels = _stored(store, reader.info.id, "labels")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for f, _ in reader.slice_sources]  # fmt: skip
    stack = seg.get_pixels_by_source_instance(uids)
    np.testing.assert_array_equal(stack[..., 0], labels > 0)
    for index, value in enumerate((1, 2, 3), start=1):
        np.testing.assert_array_equal(stack[..., index], classes == value)
    assert int(seg.NumberOfFrames) == 6 * 4


def test_an_unnamed_class_map_output_gives_a_segment_per_class_found(tmp_path: Path) -> None:
    hu = _volume(4, seed=7)
    hu[:, 20:, 20:] = 2000  # ids 1 (air), 2 and 3 present; 4 (>= 1000 HU) only here
    write_series(tmp_path / "ct", hu, spacing=(1, 1, 1), origin=(0, 0, 0))
    reader = open_item(str(sorted((tmp_path / "ct").iterdir())[0]))
    store = tmp_path / "out.zarr"

    result = _segment(reader, [{"op": "classify", "edges": [-400, 300, 1000]}], store)

    assert result.status == "done", result.error
    seg = hd.seg.segread(store / reader.info.id / "seg.dcm")
    names = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert names == ["class 1", "class 2", "class 3", "class 4"]
    classes = _stored(store, reader.info.id, "classes")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for f, _ in reader.slice_sources]  # fmt: skip
    labelmap = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(labelmap, classes)  # segment n holds class id n


def test_an_enhanced_multiframe_source_is_referenced_frame_by_frame(tmp_path: Path) -> None:
    hu = _volume(5, seed=5)
    write_multiframe(tmp_path / "enhanced.dcm", hu, spacing=(2.5, 0.8, 0.8), origin=(-5, 7, 100))
    reader = open_item(str(tmp_path / "enhanced.dcm"))
    store = tmp_path / "out.zarr"

    result = _segment(reader, LABEL_PIPELINE, store)

    assert result.status == "done", result.error
    labels = _stored(store, reader.info.id, "labels")
    source = pydicom.dcmread(tmp_path / "enhanced.dcm", stop_before_pixels=True)
    z_of = {frame: z for z, (_, frame) in enumerate(reader.slice_sources)}
    ds = pydicom.dcmread(store / reader.info.id / "seg.dcm")
    frames = ds.pixel_array
    assert int(ds.NumberOfFrames) == 5
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        (ref,) = group.DerivationImageSequence[0].SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame = int(ref.ReferencedFrameNumber) - 1  # DICOM frame numbers count from 1
        expected = source.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0]
        np.testing.assert_allclose(
            [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in expected.ImagePositionPatient],
        )
        np.testing.assert_array_equal(frames[k], labels[z_of[frame]] > 0)


def test_a_non_dicom_item_fails_naming_the_item_the_parameter_and_its_format(
    tmp_path: Path,
) -> None:
    reader = ArrayReader(_volume(3), "plain")
    store = tmp_path / "out.zarr"

    result = _segment(reader, LABEL_PIPELINE, store)

    assert result.status == "failed"
    assert result.error is not None
    assert "item 'plain'" in result.error
    assert "`output.dicom_seg` (true) needs a DICOM series as input, this item is 'array'" in (
        result.error
    )
    assert not (store / "plain").exists()  # refused before any block ran


def test_an_output_that_is_not_a_segmentation_is_refused() -> None:
    axes, spacing, origin = ("z", "y", "x"), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    info = ItemInfo("ct", "ct/IM1", "dicom", (4, 8, 8), "int16", axes, spacing, origin)
    check_dicom_seg(info, "labels")
    with pytest.raises(PlanError, match=r"`output.dicom_seg` \(true\) needs .* this one gives "
                       r"probabilities"):  # fmt: skip
        check_dicom_seg(info, "probabilities")


def test_the_writer_verifies_the_seg_frames_and_reruns_keep_the_uids(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", _volume(4), spacing=(1, 1, 1), origin=(0, 0, 0))
    reader = open_item(str(sorted((tmp_path / "ct").iterdir())[0]))
    store = tmp_path / "out.zarr"
    assert _segment(reader, LABEL_PIPELINE, store).status == "done"
    item = reader.info.id

    _verify_seg(store, reader.info, frames=4)
    uids = pydicom.dcmread(store / item / "seg.dcm", stop_before_pixels=True).SOPInstanceUID
    assert _segment(reader, LABEL_PIPELINE, store).status == "done"  # the same item again
    again = pydicom.dcmread(store / item / "seg.dcm", stop_before_pixels=True).SOPInstanceUID
    assert again == uids  # same input, config and code: the same UIDs
    with pytest.raises(StoreError, match=rf"item '{item}': seg.dcm has 4 frames, expected 5"):
        _verify_seg(store, reader.info, frames=5)
    (store / item / "seg.dcm").write_bytes(b"not dicom")
    with pytest.raises(StoreError, match=rf"item '{item}': seg.dcm is unreadable"):
        _verify_seg(store, reader.info, frames=4)


def test_dicom_seg_enters_the_config_hash_only_when_set() -> None:
    base = {"input": {"path": "in"}, "output": {"store": "out.zarr"}, "pipeline": [{"op": "otsu"}]}
    off = {**base, "output": {"store": "out.zarr", "dicom_seg": False}}
    on = {**base, "output": {"store": "out.zarr", "dicom_seg": True}}
    assert parse_config(off).config_hash() == parse_config(base).config_hash()
    assert parse_config(on).config_hash() != parse_config(base).config_hash()

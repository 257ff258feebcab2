"""The DICOM SEG writer: ``ITEM/seg.dcm`` (``output.dicom_seg``).

Once the blocks are written, the output (and the named class maps of ``save_as`` arrays)
go into one DICOM Segmentation that references the source series' images
(:mod:`segflow.store.dicomseg`), checked for every frame before the commit. Items read
from a DICOM series whose pipeline ends in labels, a mask or a class map only.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from segflow.errors import PlanError
from segflow.io.base import ItemInfo
from segflow.store.dicomseg import SEG_NAME, check_dicom_seg
from segflow.store.writers import Writer, WriteTarget


class DicomSegSettings(BaseModel):
    """``output.dicom_seg`` has no settings beyond turning it on."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check(info: ItemInfo, output_kind: str, settings: DicomSegSettings) -> None:
    check_dicom_seg(info, output_kind)


def finish(target: WriteTarget, settings: DicomSegSettings, parts: Sequence[object]) -> list[str]:
    """Write ``seg.dcm`` from the staged arrays; its frame count is the writer's state."""
    target.states["dicom_seg"] = write_seg(target)
    return [SEG_NAME]


def verify(target: WriteTarget, settings: DicomSegSettings, files: Sequence[str]) -> None:
    """The SEG is readable, a Segmentation, with every frame."""
    from segflow.store.dicomseg import check_seg

    path = f"{target.item_url}/{SEG_NAME}"
    check_seg(path, target.info.id, target.states["dicom_seg"])


def write_seg(target: WriteTarget) -> int:
    """Write ``ROOT/ITEM/seg.dcm`` from the staged arrays; return its frame count."""
    from segflow.engine.item import code_version
    from segflow.store.dicomseg import class_values, plan_segments, write_dicom_seg
    from segflow.store.layout import ZarrRegionWriter

    info, plan, root = target.info, target.plan, target.root
    sources = getattr(target.reader, "slice_sources", None)
    if sources is None:  # a reader of format "dicom" that does not say its slices
        raise PlanError(
            f"`output.dicom_seg` (true): the reader {type(target.reader).__name__} does not "
            "give the source slices (slice_sources) a SEG must reference"
        )
    spatial = info.spatial_shape
    output = ZarrRegionWriter(root, info.id, plan.out_kind)
    values = (
        class_values(output, spatial)
        if plan.out_kind == "classes" and not plan.out_categories
        else []
    )
    segments = plan_segments(
        plan.out_kind, plan.out_categories, dict(plan.saved_categories), out_values=values
    )
    arrays = {s.array: ZarrRegionWriter(root, info.id, s.array) for s in segments}
    has_model = any(s.op.name == "_model_infer" for s in plan.steps)
    return write_dicom_seg(
        f"{target.item_url}/{SEG_NAME}",
        sources=sources,
        arrays=arrays,
        shape=spatial,
        segments=segments,
        uid_seed=[
            str(info.attrs.get("dicom_series_instance_uid", info.path)),
            info.fingerprint,
            target.config_hash,
            code_version(),
        ],
        software_version=code_version(),
        algorithm_family="model" if has_model else "rules",
    )


DICOM_SEG = Writer(
    name="dicom_seg",
    settings=DicomSegSettings,
    check=check,
    finish=finish,
    verify=verify,
    switch="dicom_seg",
    summary="ITEM/seg.dcm: a DICOM Segmentation referencing the source series",
)

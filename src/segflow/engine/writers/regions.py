"""The region table writer: ``ITEM/regions.parquet``, one row per object (``output.regions``).

Its rows are measured in the blocks and merged through the stitch's relabel table
(:class:`~segflow.engine.kernels.RegionsSpec`): the writer prepares the table's sink,
gives it to the run as the receiver of the per-object rows, joins the parts when the
blocks are done (the item's index row gets the 5th, 50th and 95th percentiles of the
object areas) and checks one row per object before the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from segflow.errors import PlanError
from segflow.io.base import ItemInfo, Reader
from segflow.store.regions import REGIONS_NAME, check_regions
from segflow.store.writers import Writer, WriteTarget


class RegionsSettings(BaseModel):
    """``output.regions_intensity``: what the intensity columns summarise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intensity: str | bool | None = Field(
        "input", description="'input' (or true), a `save_as` array's name, or null for none"
    )


def check(info: ItemInfo, output_kind: str, settings: RegionsSettings) -> None:
    check_regions(output_kind)


def prepare(target: WriteTarget, settings: RegionsSettings) -> Any:
    """The table's sink (emptied unless the item is resumed) with its intensity source."""
    from segflow.engine.kernels import RegionsSpec
    from segflow.engine.pipeline import region_extras
    from segflow.store.regions import ParquetRegionsSink

    info = target.info
    sink = ParquetRegionsSink(
        target.root,
        info.id,
        spacing=info.spacing,
        origin=info.origin,
        units=info.units,
        crs_wkt=info.crs_wkt,
        extras=region_extras(target.plan),
    )
    if not target.resuming:
        sink.clear()
    intensity = _intensity_source(settings.intensity, target.reader, target.plan, target.root)
    return RegionsSpec(sink, intensity=intensity)


def object_rows(state: Any) -> Any:
    return state


def finish(target: WriteTarget, settings: RegionsSettings, parts: Sequence[Any]) -> list[str]:
    """Join the parts into the table; the area percentiles go to the index row."""
    sink = target.states["regions"].sink
    sink.join()
    p05, p50, p95 = sink.area_percentiles((0.05, 0.5, 0.95))
    target.row.update(area_p05=p05, area_p50=p50, area_p95=p95)
    return [REGIONS_NAME]


def verify(target: WriteTarget, settings: RegionsSettings, files: Sequence[str]) -> None:
    """The table is readable with one row per object."""
    from segflow.store.commit import check_table_rows

    check_table_rows(target.root, target.info.id, REGIONS_NAME, target.object_count)


class _SavedArray:
    """A ``save_as`` array of this run, read like an item (channel axis first)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        data = np.asarray(self.writer.read(region))
        return data if data.ndim > len(region) else data[np.newaxis]


def _intensity_source(choice: str | bool | None, reader: Reader, plan: Any, store: str) -> Any:
    """What the regions' intensity columns read: the item, a saved array, or nothing."""
    from segflow.store.layout import ZarrRegionWriter

    if choice is None or choice is False:
        return None
    if choice is True or choice == "input":
        return reader
    if choice not in plan.saved:
        saved = ", ".join(sorted(plan.saved)) or "none"
        raise PlanError(
            f"`output.regions_intensity` {choice!r} is neither 'input' nor a `save_as` array "
            f"of the pipeline (saved: {saved})"
        )
    return _SavedArray(ZarrRegionWriter(store, reader.info.id, str(choice)))


REGIONS = Writer(
    name="regions",
    settings=RegionsSettings,
    check=check,
    prepare=prepare,
    object_rows=object_rows,
    finish=finish,
    verify=verify,
    switch="regions",
    output_fields={"regions_intensity": "intensity"},
    summary="ITEM/regions.parquet: per-object area, box, centroid and intensity",
)

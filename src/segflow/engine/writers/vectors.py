"""The vector table writer: ``ITEM/vectors.parquet`` (``output.vectors``).

Once the labels are written, a pass of its own polygonises them blockwise (each object's
polygon, holes kept, in the item's CRS: GeoParquet; :mod:`segflow.store.vectors`), joins
the region table's columns when the item has one, and checks one row per object before
the commit. 2-D items whose pipeline ends in labels only.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from segflow.io.base import ItemInfo
from segflow.store.vectors import VECTORS_NAME, check_vectors
from segflow.store.writers import Writer, WriteTarget


class VectorsSettings(BaseModel):
    """``output.vectors`` has no settings beyond turning it on."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check(info: ItemInfo, output_kind: str, settings: VectorsSettings) -> None:
    check_vectors(info, output_kind)


def finish(target: WriteTarget, settings: VectorsSettings, parts: Sequence[object]) -> list[str]:
    """Polygonise the written labels into the table (with the region table's columns)."""
    from segflow.store.layout import ZarrRegionWriter
    from segflow.store.vectors import ParquetVectorsSink, item_transform, write_vectors

    info = target.info
    regions = target.states.get("regions")  # the region writer's RegionsSpec, if on
    assert target.block_shape is not None
    write_vectors(
        ZarrRegionWriter(target.root, info.id, target.output),
        info.spatial_shape,
        block_shape=target.block_shape,
        executor=target.executor,
        sink=ParquetVectorsSink(
            target.root, info.id, transform=item_transform(info), crs_wkt=info.crs_wkt
        ),
        regions=None if regions is None else regions.sink.path,
        progress=target.progress,
    )
    return [VECTORS_NAME]


def verify(target: WriteTarget, settings: VectorsSettings, files: Sequence[str]) -> None:
    """The table is readable with one row per object."""
    from segflow.store.commit import check_table_rows

    check_table_rows(target.root, target.info.id, VECTORS_NAME, target.object_count)


def collect(
    store: str, settings: VectorsSettings | None, items: Sequence[str] | None
) -> tuple[str | None, str]:
    """The collection's ``STORE/vectors.parquet/`` folder: a part per item the run did
    (:func:`segflow.store.vector_dataset.compact_vectors`); a run without vectors only
    refreshes a folder an earlier run made."""
    from segflow.store.vector_dataset import compact_vectors

    return compact_vectors(store, refresh_only=settings is None, items=items)


VECTORS = Writer(
    name="vectors",
    settings=VectorsSettings,
    check=check,
    finish=finish,
    verify=verify,
    collect=collect,
    switch="vectors",
    summary="ITEM/vectors.parquet: each object's polygon in the item's CRS (GeoParquet)",
)

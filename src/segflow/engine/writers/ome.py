"""The OME-Zarr view writer: ``ITEM/NAME_pyramid``, a multiscale image napari opens
(``output.ome``, with ``output.pyramid`` capping its levels).

It gives the output's layout (:class:`~segflow.store.output.OmeZarrLayout`): the output's
sink builds the pyramid's levels as the blocks write (:mod:`segflow.store.pyramid`); the
finish step completes the storage units that span blocks and writes the view's metadata,
and the commit check verifies every level's storage units like the output's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from segflow.store.output import OmeZarrLayout
from segflow.store.writers import Writer, WriteTarget


class OmeSettings(BaseModel):
    """``output.pyramid``: the pyramid's levels beyond full resolution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    levels: int | None = Field(
        None, ge=0, description="at most this many levels (None: until a level fits a chunk)"
    )


def layout(settings: OmeSettings, blocks: tuple[int, ...]) -> OmeZarrLayout:
    return OmeZarrLayout(max_levels=settings.levels, blocks=tuple(blocks))


def finish(target: WriteTarget, settings: OmeSettings, parts: Sequence[Any]) -> list[str]:
    """Finish the pyramid from the written output; the levels (path -> dtype, shape) are
    the writer's state, for the commit check."""
    derived = {}
    if target.output_spec is not None:
        assert target.block_shape is not None
        derived = layout(settings, target.block_shape).finalize_item(
            target.root, target.info, output=target.output_spec, executor=target.executor
        )
    target.states["ome"] = derived
    return sorted(derived)


def verify(target: WriteTarget, settings: OmeSettings, files: Sequence[str]) -> None:
    """Every level exists with its shape and dtype and every storage unit on disk."""
    from segflow.store.commit import check_array

    for path, (dtype, shape) in target.states["ome"].items():
        check_array(target.root, target.info.id, path, dtype, shape, suffix=False)


OME = Writer(
    name="ome",
    settings=OmeSettings,
    layout=layout,
    finish=finish,
    verify=verify,
    switch="ome",
    output_fields={"pyramid": "levels"},
    summary="ITEM/NAME_pyramid: the OME-Zarr 0.5 multiscale view of the output",
)

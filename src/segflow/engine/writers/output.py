"""The output writer: the pipeline's output (``labels``, ``mask``, ``classes``, ...) and its
``save_as`` arrays in the xarray/CF layout (:class:`~segflow.store.output.XarrayLayout`).

Always on. It gives the layout the engine creates the item group and its arrays with (a
later writer may give one that extends it: the OME-Zarr view) and, before the commit,
checks every array the run wrote: shape, dtype and every storage unit on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from segflow.store.output import XarrayLayout
from segflow.store.writers import Writer, WriteTarget


class OutputSettings(BaseModel):
    """The output's storage settings (``output.chunks``, ``output.shards``) shape the
    blocks too, so the engine reads them itself; the writer has none of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def layout(settings: OutputSettings, blocks: tuple[int, ...]) -> XarrayLayout:
    return XarrayLayout()


def verify(target: WriteTarget, settings: OutputSettings, files: Sequence[str]) -> None:
    """Every array of the run (``target.arrays``) is whole on disk."""
    from segflow.store.commit import check_item

    info = target.info
    check_item(target.root, info.id, shape=info.spatial_shape, arrays=target.arrays)


OUTPUT = Writer(
    name="output",
    settings=OutputSettings,
    layout=layout,
    verify=verify,
    always=True,
    summary="ITEM/NAME: the pipeline's output and its save_as arrays (xarray/CF layout)",
)

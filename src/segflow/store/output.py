"""How the engine writes an item: the :class:`OutputLayout` protocol and its layouts.

The engine (:func:`segflow.engine.item.segment_item`) calls a layout the same way whatever
the store looks like: ``create_item`` once, ``create_array`` for each output array (which
returns the sink the blocks write to), and, once every block is written, ``finalize_item``,
which adds what is derived from the written arrays (an OME-Zarr pyramid) and says which
arrays it wrote, so the commit check (:func:`segflow.store.commit.check_item`) verifies them
too. Everything happens inside the item's staging group, before the check and the commit.

- :class:`XarrayLayout`: the CF/xarray layout (:mod:`segflow.store.cf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from segflow.io.base import ItemInfo
from segflow.store.layout import (
    ArraySpec,
    ZarrRegionWriter,
    create_item_group,
    create_output_array,
)

# path (relative to the item group) -> (dtype name, shape) of an array a layout derived
DerivedArrays = dict[str, tuple[str, tuple[int, ...]]]


class OutputLayout(Protocol):
    """What the engine asks of an output layout (all paths are Zarr roots or URLs)."""

    def create_item(self, root: str, info: ItemInfo) -> None:
        """Create (or replace) the item group ``ROOT/ITEM``."""
        ...

    def create_array(self, root: str, info: ItemInfo, spec: ArraySpec) -> ZarrRegionWriter:
        """Create (or replace) array ``spec`` of the item; return the sink blocks write to."""
        ...

    def finalize_item(
        self,
        root: str,
        info: ItemInfo,
        *,
        output: ArraySpec,
        executor: Any,
    ) -> DerivedArrays:
        """After every block is written: derive what the layout adds from the ``output``
        array (its final spec) on ``executor``; return the derived arrays to check."""
        ...


@dataclass(frozen=True)
class XarrayLayout:
    """The CF/xarray layout: coordinates, grid mapping, dimension names; nothing derived.

    Examples
    --------
    >>> XarrayLayout().finalize_item("", None, output=None, executor=None)
    {}
    """

    def create_item(self, root: str, info: ItemInfo) -> None:
        create_item_group(root, info, overwrite=True)

    def create_array(self, root: str, info: ItemInfo, spec: ArraySpec) -> ZarrRegionWriter:
        create_output_array(root, info, spec, overwrite=True)
        return ZarrRegionWriter(root, info.id, spec.name)

    def finalize_item(
        self, root: str, info: ItemInfo, *, output: ArraySpec, executor: Any
    ) -> DerivedArrays:
        return {}

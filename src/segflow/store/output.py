"""How the engine writes an item: the :class:`OutputLayout` protocol and its layouts.

The engine (:func:`segflow.engine.item.segment_item`) calls a layout the same way whatever
the store looks like: ``create_item`` once, ``create_array`` for each output array (which
returns the sink the blocks write to), and, once every block is written, ``finalize_item``,
which adds what is derived from the written arrays (an OME-Zarr pyramid) and says which
arrays it wrote, so the commit check (:func:`segflow.store.commit.check_item`) verifies them
too. Everything happens inside the item's staging group, before the check and the commit.

- :class:`XarrayLayout`: the CF/xarray layout (:mod:`segflow.store.cf`).
- :class:`OmeZarrLayout`: the same, plus the OME-Zarr 0.5 view (:mod:`segflow.store.ome`).
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


@dataclass(frozen=True)
class OmeZarrLayout(XarrayLayout):
    """The xarray layout plus an OME-Zarr 0.5 multiscale view of the item's output.

    ``max_levels`` caps the pyramid's levels beyond level 0 (None: until one chunk holds a
    level; 0: level 0 only). See :mod:`segflow.store.ome` for the layout and its reasons.
    """

    max_levels: int | None = None

    def finalize_item(
        self, root: str, info: ItemInfo, *, output: ArraySpec, executor: Any
    ) -> DerivedArrays:
        from segflow.store.ome import write_pyramid

        return write_pyramid(
            root,
            info,
            output.name,
            executor=executor,
            categories=output.categories,
            kind=output.name,
            max_levels=self.max_levels,
        )


def output_layout(*, ome: bool = True, pyramid: int | None = None) -> OutputLayout:
    """The layout of ``output.ome`` and ``output.pyramid``.

    Examples
    --------
    >>> output_layout(ome=False)
    XarrayLayout()
    >>> output_layout(pyramid=2)
    OmeZarrLayout(max_levels=2)
    """
    return OmeZarrLayout(max_levels=pyramid) if ome else XarrayLayout()

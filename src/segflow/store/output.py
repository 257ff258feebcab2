"""How the engine writes an item: the :class:`OutputLayout` protocol and its layouts.

The engine (:func:`segflow.engine.item.segment_item`) calls a layout the same way whatever
the store looks like: ``create_item`` once, ``create_array`` for each ``save_as`` array and
``create_output`` for the pipeline's output (each returns the sink the blocks write to; a
resumed item reopens its output with ``open_output``), and, once every block is written,
``finalize_item``, which finishes what is derived from the output (an OME-Zarr pyramid,
built by the output's sink as the blocks write) and says which arrays it wrote, so the
commit check (the OME-Zarr writer's, :mod:`segflow.engine.writers.ome`) verifies them
too. Everything happens inside the item's staging group, before the check and the commit.

- :class:`XarrayLayout`: the CF/xarray layout (:mod:`segflow.store.cf`).
- :class:`OmeZarrLayout`: the same, plus the OME-Zarr 0.5 view (:mod:`segflow.store.ome`).
"""

from __future__ import annotations

from collections.abc import Sequence
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

    def create_output(self, root: str, info: ItemInfo, spec: ArraySpec) -> Any:
        """Create (or replace) the output array ``spec`` and what the layout derives from
        it while the blocks write; return the sink blocks write the output to."""
        ...

    def open_output(self, root: str, info: ItemInfo, spec: ArraySpec) -> Any:
        """The sink of an output a resumed item created before (with what the layout
        derives from it), or None where something is missing: then create it anew."""
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

    def create_output(self, root: str, info: ItemInfo, spec: ArraySpec) -> Any:
        return self.create_array(root, info, spec)

    def open_output(self, root: str, info: ItemInfo, spec: ArraySpec) -> Any:
        return ZarrRegionWriter(root, info.id, spec.name)

    def finalize_item(
        self, root: str, info: ItemInfo, *, output: ArraySpec, executor: Any
    ) -> DerivedArrays:
        return {}


@dataclass(frozen=True)
class OmeZarrLayout(XarrayLayout):
    """The xarray layout plus an OME-Zarr 0.5 multiscale view of the item's output.

    ``max_levels`` caps the pyramid's levels beyond level 0 (None: until one chunk holds a
    level; 0: level 0 only). ``blocks`` is the block shape the engine writes the output in
    (None: its storage unit): the output's sink builds the pyramid as the blocks write
    (:mod:`segflow.store.pyramid`), and ``finalize_item`` finishes the storage units that
    span blocks. An output created with ``create_array`` instead gets its pyramid by reading
    it back (:func:`segflow.store.ome.write_pyramid`). See :mod:`segflow.store.ome` for the
    layout and its reasons.
    """

    max_levels: int | None = None
    blocks: tuple[int, ...] | None = None

    def _plan(self, root: str, info: ItemInfo, name: str) -> tuple[Any, Any]:
        import zarr

        from segflow.store.ome import BaseArray
        from segflow.store.pyramid import plan_pyramid

        array = zarr.open_array(root, path=f"{info.id}/{name}", mode="r", zarr_format=3)
        base = BaseArray.of(array, len(info.spatial_shape))
        plan = plan_pyramid(root, info, name, base, grid=self.blocks, max_levels=self.max_levels)
        return plan, base

    def create_output(self, root: str, info: ItemInfo, spec: ArraySpec) -> Any:
        from segflow.store.pyramid import PyramidSink, prepare_pyramid

        create_output_array(root, info, spec, overwrite=True)
        plan, base = self._plan(root, info, spec.name)
        prepare_pyramid(plan, info, base)
        return PyramidSink(plan)

    def open_output(self, root: str, info: ItemInfo, spec: ArraySpec) -> Any:
        from segflow.store.pyramid import PyramidSink, is_prepared

        plan, _ = self._plan(root, info, spec.name)
        return PyramidSink(plan) if is_prepared(plan) else None

    def finalize_item(
        self, root: str, info: ItemInfo, *, output: ArraySpec, executor: Any
    ) -> DerivedArrays:
        from segflow.store.ome import write_pyramid
        from segflow.store.pyramid import finish_pyramid, is_prepared

        plan, base = self._plan(root, info, output.name)
        if is_prepared(plan):
            return finish_pyramid(
                plan,
                info,
                base,
                executor=executor,
                categories=output.categories,
                kind=output.name,
            )
        return write_pyramid(
            root,
            info,
            output.name,
            executor=executor,
            categories=output.categories,
            kind=output.name,
            max_levels=self.max_levels,
        )


def output_layout(
    *, ome: bool = True, pyramid: int | None = None, blocks: Sequence[int] | None = None
) -> OutputLayout:
    """The layout of ``output.ome`` and ``output.pyramid``, for blocks of shape ``blocks``.

    Examples
    --------
    >>> output_layout(ome=False)
    XarrayLayout()
    >>> output_layout(pyramid=2, blocks=(256, 256))
    OmeZarrLayout(max_levels=2, blocks=(256, 256))
    """
    if not ome:
        return XarrayLayout()
    return OmeZarrLayout(max_levels=pyramid, blocks=None if blocks is None else tuple(blocks))

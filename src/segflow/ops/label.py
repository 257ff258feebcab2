"""Connected-component labelling; the cross-block merge lives in ``segflow.stitch``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi
from skimage import measure

from segflow.ops.registry import Done, OpContext, Operation, OpParams, register

#: The ``connectivity`` parameter of every operation that joins neighbouring pixels.
Connectivity = Annotated[
    int, Field(ge=1, le=3, description="neighbours: 1 = faces (4/6), ndim = all (8/26)")
]

#: ``connectivity`` where the reference's default is full connectivity (``None``: ndim).
OptionalConnectivity = Annotated[
    int | None,
    Field(ge=1, le=3, description="neighbours: 1 = faces (4/6), ndim = all (8/26, the default)"),
]


def resolve_connectivity(connectivity: int | None, ndim: int) -> int:
    """``connectivity``, or ``ndim`` (every neighbour) where it is ``None``."""
    return ndim if connectivity is None else int(connectivity)


class LabelParams(OpParams):
    connectivity: Connectivity = 1
    classes: bool = Field(
        False,
        description="components per class of a class map (neighbours join only if their "
        "values are equal) instead of components of the non-zero pixels",
    )


def connectivity_structure(connectivity: int, ndim: int) -> np.ndarray:
    """The ``scipy.ndimage`` structuring element for a connectivity (1..ndim)."""
    if connectivity > ndim:
        raise ValueError(f"`connectivity` ({connectivity}) must not exceed the {ndim} spatial axes")
    return ndi.generate_binary_structure(ndim, connectivity)


def label_block(mask: np.ndarray, params: LabelParams, ctx: OpContext) -> np.ndarray:
    """Label the foreground (non-zero) pixels of one block, 1..n, 0 = background.

    On its own this is ``scipy.ndimage.label``; the engine stitches the block labels into
    item-wide ids (position-derived offsets, face pairs, union-find, relabel tables).
    """
    structure = connectivity_structure(params.connectivity, ctx.spatial_ndim)
    if not params.classes:
        labels, _ = ndi.label(mask[0], structure=structure)
        return labels[np.newaxis]
    # Neighbours with equal values join: components of every class in one pass.
    labels = measure.label(mask[0], background=0, connectivity=params.connectivity)
    return labels.astype(np.int32, copy=False)[np.newaxis]


def _check_classes(params: LabelParams, dtype: np.dtype) -> np.dtype:
    if params.classes and np.dtype(dtype).kind not in "uib":
        raise ValueError(f"`classes: true` needs an integer class map, got {np.dtype(dtype)}")
    return np.dtype(np.uint32)


register(
    Operation(
        name="label",
        kind="connectivity",
        params=LabelParams,
        apply=label_block,
        summary="connected components, stitched across blocks into consecutive ids",
        halo_rule="0 (faces are merged globally)",
        out_dtype=_check_classes,
        needs_single_channel=True,
        by_class=lambda p: p.classes,
        classes_in=lambda p: p.classes,
    )
)


# --- relabel ---------------------------------------------------------------------------------


class DistinctIds:
    """Each block's sorted distinct ids; the client ranks their union and hands every block
    the ranks of its own ids only (``Done.per_block``), never the whole table."""

    def start(self) -> Any:
        return None

    def map(self, core: np.ndarray, state: Any) -> np.ndarray:
        return np.unique(core[0])

    def combine(self, partials: Sequence[np.ndarray], state: Any) -> Done:
        ids = np.unique(np.concatenate(partials))
        if len(ids) and ids[0] < 0:  # skimage.segmentation.relabel_sequential refuses them
            raise ValueError(f"label ids must not be negative, got {ids[0]}")
        objects = ids[ids != 0]
        per_block = [
            (own, np.where(own == 0, 0, np.searchsorted(objects, own) + 1)) for own in partials
        ]
        return Done(len(objects), per_block=per_block)


def relabel_sequential(image: np.ndarray, params: OpParams, ctx: OpContext) -> np.ndarray:
    """Renumber the ids of a label image to ``1..n`` in increasing order of the old ids; 0
    stays background. Equals ``skimage.segmentation.relabel_sequential(labels)[0]`` on the
    whole item: the ids are ranked among the item's distinct ids (one pass over the blocks).

    Unlike ``label``, pixels keep their object when its parts do not touch (an id spread
    over several places stays one object); use it for label images made by another tool.
    """
    own, ranks = ctx.stat
    index = np.searchsorted(own, image[0])
    return ranks.astype(np.uint64)[index][np.newaxis]


def _integer_labels(params: OpParams, dtype: np.dtype) -> np.dtype:
    if np.dtype(dtype).kind not in "uib":
        raise ValueError(f"relabel needs an integer label image, got {np.dtype(dtype)}")
    return np.dtype(np.uint64)


register(
    Operation(
        name="relabel",
        kind="global",
        params=OpParams,
        apply=relabel_sequential,
        statistic=lambda p: DistinctIds(),
        summary="renumber a label image's ids to consecutive 1..n, keeping their order "
        "(skimage.segmentation.relabel_sequential), from per-block tables",
        out_dtype=_integer_labels,
        needs_single_channel=True,
        makes_labels=True,
    )
)

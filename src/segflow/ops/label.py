"""Connected-component labelling; the cross-block merge lives in ``segflow.stitch``."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi
from skimage import measure

from segflow.ops.registry import OpContext, Operation, OpParams, register

#: The ``connectivity`` parameter of every operation that joins neighbouring pixels.
Connectivity = Annotated[
    int, Field(ge=1, le=3, description="neighbours: 1 = faces (4/6), ndim = all (8/26)")
]


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


def _check_classes(dtype: np.dtype, params: LabelParams) -> np.dtype:
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
    )
)

"""Flow-field targets for a Cellpose-style head, and their augmentation.

Each object's flow points, at every one of its pixels, towards the object's centre along
the object itself: the normalised gradient of a heat map diffused from the centre pixel
with the object as the only conductor (Stringer et al. 2021, "Cellpose"). Following the
flows from any pixel leads to its object's centre, so touching objects separate where the
flows part (see the ``flow_dynamics`` step). The centre is the object's pixel nearest its
mean position (a bent object's mean may lie outside it).

The head's targets are ``(5 * flow_y, 5 * flow_x, foreground)`` in 2-D (Cellpose's scale:
unit flows times 5), ``(5 * flow_z, 5 * flow_y, 5 * flow_x, foreground)`` in 3-D.

Examples
--------
>>> labels = np.zeros((7, 9), int); labels[1:6, 1:8] = 1
>>> flows = label_flows(labels)
>>> flows.shape, flows.dtype
((2, 7, 9), dtype('float32'))
>>> bool(flows[1, 3, 2] > 0.9), bool(flows[1, 3, 6] < -0.9)  # x flows point to the centre
(True, True)
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse

#: Cellpose's scale of the flows a network is trained on (unit vectors times this).
FLOW_SCALE = 5.0


def _centres(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per id, the coordinates of its pixel nearest its mean position."""
    means = np.asarray(ndi.center_of_mass(np.ones(labels.shape), labels, ids)).reshape(
        len(ids), labels.ndim
    )
    lookup = np.zeros((int(labels.max()) + 1, labels.ndim))
    lookup[ids] = means
    grid = np.indices(labels.shape, dtype=np.float64)
    squared = sum((grid[a] - lookup[labels, a]) ** 2 for a in range(labels.ndim))
    positions = ndi.minimum_position(squared, labels, ids)
    return tuple(np.array([p[a] for p in positions], dtype=np.intp) for a in range(labels.ndim))


def _shifted(array: np.ndarray, offset: tuple[int, ...]) -> np.ndarray:
    """``array`` moved so that ``out[p] = array[p + offset]`` (0 beyond the edge)."""
    out = np.zeros_like(array)
    dst, src = [], []
    for o, n in zip(offset, array.shape, strict=True):
        dst.append(slice(max(0, -o), n - max(0, o)))
        src.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def heat_map(labels: np.ndarray) -> np.ndarray:
    """Heat diffused from each object's centre within the object (0 outside objects).

    ``2 * (largest object extent)`` steps of: add 1 at every centre, then replace each object
    pixel by the mean of its ``3^ndim`` neighbourhood, counting only pixels of its own object
    (the others are 0). The neighbourhood sums run over the object pixels only, as one sparse
    matrix product per step whose terms are added in the neighbours' raster order: the same
    bits as summing the ``3^ndim`` shifted images in that order, in a fraction of the time.
    """
    labels = np.asarray(labels)
    ids = np.unique(labels[labels > 0])
    heat = np.zeros(labels.shape, dtype=np.float64)
    if ids.size == 0:
        return heat
    centres = np.ravel_multi_index(_centres(labels, ids), labels.shape)
    extent = max(max(s.stop - s.start for s in box) for box in ndi.find_objects(labels) if box)
    neighbours, inside = _neighbour_matrix(labels)
    position = np.zeros(labels.size, dtype=np.intp)
    position[inside] = np.arange(inside.size)
    at_centres = position[centres]
    values = np.zeros(inside.size, dtype=np.float64)
    count = float(3**labels.ndim)
    for _ in range(2 * extent):
        values[at_centres] += 1.0
        values = neighbours @ values / count
    heat.ravel()[inside] = values
    return heat


def _neighbour_matrix(labels: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The object pixels (flat indices, ascending) and the matrix of ones that sums, for each,
    its ``3^ndim`` neighbours of the same object, columns in raster order."""
    inside = np.flatnonzero(labels.ravel() > 0)
    flat = np.full(labels.size, -1, dtype=np.intp)
    flat[inside] = np.arange(inside.size)
    position = flat.reshape(labels.shape)
    rows, cols = [], []
    for offset in itertools.product((-1, 0, 1), repeat=labels.ndim):
        same = (_shifted(labels, offset) == labels) & (labels > 0)
        rows.append(position[same])
        cols.append(_shifted(position, offset)[same])
    row, col = np.concatenate(rows), np.concatenate(cols)
    matrix = sparse.csr_matrix((np.ones(row.size), (row, col)), shape=(inside.size, inside.size))
    matrix.sort_indices()
    return matrix, inside


def label_flows(labels: np.ndarray) -> np.ndarray:
    """Unit flows ``(ndim, *shape)`` float32 towards each object's centre (0 outside)."""
    labels = np.asarray(labels)
    heat = heat_map(labels)
    grads = []
    for axis in range(labels.ndim):
        ahead = tuple(1 if a == axis else 0 for a in range(labels.ndim))
        behind = tuple(-1 if a == axis else 0 for a in range(labels.ndim))
        forward = np.where(_shifted(labels, ahead) == labels, _shifted(heat, ahead), 0.0)
        backward = np.where(_shifted(labels, behind) == labels, _shifted(heat, behind), 0.0)
        grads.append(forward - backward)
    flows = np.stack(grads)
    norm = np.sqrt((flows**2).sum(0))
    # A gradient at rounding level (a centre on an axis of symmetry) is no direction: 0.
    clear = norm > 1e-9 * heat
    flows = np.where(clear, flows / np.where(clear, norm, 1.0), 0.0)
    flows[:, labels == 0] = 0.0
    return flows.astype(np.float32)


def flow_targets(labels: np.ndarray) -> np.ndarray:
    """The flow head's targets: ``FLOW_SCALE *`` flows, then the foreground (float32)."""
    flows = FLOW_SCALE * label_flows(labels)
    return np.concatenate([flows, (np.asarray(labels) > 0)[np.newaxis].astype(np.float32)])


def flip_flows(targets: np.ndarray, axis: int) -> np.ndarray:
    """``targets`` (flows first, then others) flipped along spatial ``axis`` (negative,
    from the end): the image flipped and the flow component along that axis negated."""
    ndim = targets.ndim - 1
    out = np.flip(targets, axis).copy()
    out[ndim + axis] *= -1  # the flow component of that axis (flows are the first ndim)
    return out


def rotate_flows(targets: np.ndarray, k: int) -> np.ndarray:
    """``targets`` rotated as ``np.rot90(targets, k, axes=(-2, -1))``, the (y, x) flow
    vectors turned with them: one quarter turn maps a flow ``(dy, dx)`` to ``(-dx, dy)``."""
    ndim = targets.ndim - 1
    y, x = ndim - 2, ndim - 1  # the channels of the y and x flows
    out = np.rot90(targets, k, axes=(-2, -1)).copy()
    for _ in range(k % 4):
        out[y], out[x] = -out[x].copy(), out[y].copy()
    return out

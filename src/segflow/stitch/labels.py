"""Stitch block-local labels into item-wide consecutive ids.

1. Each block labels its core alone (``1..n_b``). A label's provisional global id is
   ``(block.linear << 32) | local``: it depends only on the block's grid position, so blocks
   never wait for each other (no serial offset chain).
2. Each block keeps its 1-voxel face slabs. For every pair of neighbouring blocks (faces,
   edges and corners, as the connectivity allows) the voxel pairs that touch across the
   boundary give label pairs.
3. On one node, the pairs (small: they live on faces) are merged with
   ``scipy.sparse.csgraph.connected_components``; every component keeps the id of its first
   member in block scan order.
4. Each block gets a compact relabel table ``local -> final`` that holds only what that block
   needs, and relabels its core in the same task that writes it.

Final ids are consecutive from 1, in the order of the first voxel of each object when blocks
are scanned in C order (and voxels in C order within a block).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Faces = tuple[tuple[np.ndarray, np.ndarray], ...]  # per axis: (first slab, last slab)

_SHIFT = np.uint64(32)


def block_faces(labels: np.ndarray) -> Faces:
    """The first and last slab of ``labels`` along every axis, copied (small)."""
    return tuple(
        (np.take(labels, 0, axis=a).copy(), np.take(labels, -1, axis=a).copy())
        for a in range(labels.ndim)
    )


def neighbor_offsets(ndim: int, connectivity: int) -> list[tuple[int, ...]]:
    """Grid offsets to the neighbours a block must be stitched with, one of each +/- pair.

    A neighbour across ``k`` axes at once (an edge or corner) matters only when voxels can
    touch across ``k`` axes, i.e. ``k <= connectivity``.
    """
    offsets = []
    for d in itertools.product((-1, 0, 1), repeat=ndim):
        nonzero = [x for x in d if x != 0]
        if not nonzero or len(nonzero) > connectivity:
            continue
        if nonzero[0] == 1:  # keep one of d and -d
            offsets.append(d)
    return offsets


def _boundary(faces: Faces, d: Sequence[int], side: int) -> np.ndarray:
    """Voxels of a block at its boundary towards ``side * d``, over the axes where d == 0."""
    axes = [a for a, x in enumerate(d) if x != 0]
    first = axes[0]
    slab = faces[first][0 if d[first] * side < 0 else 1]
    index: list[slice | int] = []
    for a in range(len(d)):
        if a == first:
            continue
        if d[a] == 0:
            index.append(slice(None))
        else:
            index.append(0 if d[a] * side < 0 else -1)
    return slab[tuple(index)]


def face_pairs(
    linear: int,
    faces: Faces,
    neighbors: Sequence[tuple[tuple[int, ...], int, Faces]],
    connectivity: int,
) -> np.ndarray:
    """Provisional-id pairs of labels that touch across this block's boundaries.

    Parameters
    ----------
    linear, faces
        This block's linear grid number and its :func:`block_faces`.
    neighbors
        ``(d, linear, faces)`` of the neighbours at offsets ``d`` from
        :func:`neighbor_offsets`.
    connectivity
        1 (faces only) up to ``ndim`` (faces, edges and corners).

    Returns
    -------
    numpy.ndarray
        ``(P, 2)`` uint64 array of distinct pairs.
    """
    found = []
    for d, other_linear, other_faces in neighbors:
        mine = _boundary(faces, d, +1)
        theirs = _boundary(other_faces, d, -1)
        crossing = sum(1 for x in d if x != 0)
        free = mine.ndim
        for t in itertools.product((-1, 0, 1), repeat=free):
            if crossing + sum(1 for x in t if x != 0) > connectivity:
                continue
            a_index = tuple(
                slice(max(-s, 0), n - max(s, 0)) for s, n in zip(t, mine.shape, strict=True)
            )
            b_index = tuple(
                slice(max(s, 0), n - max(-s, 0)) for s, n in zip(t, mine.shape, strict=True)
            )
            a, b = mine[a_index], theirs[b_index]
            touching = (a != 0) & (b != 0)
            if not touching.any():
                continue
            pairs = np.stack([a[touching], b[touching]], axis=1).astype(np.uint64)
            pairs = np.unique(pairs, axis=0)
            pairs[:, 0] |= np.uint64(linear) << _SHIFT
            pairs[:, 1] |= np.uint64(other_linear) << _SHIFT
            found.append(pairs)
    if not found:
        return np.empty((0, 2), dtype=np.uint64)
    return np.unique(np.concatenate(found), axis=0)


@dataclass(frozen=True)
class BlockRelabel:
    """What one block needs to turn its local labels into final ids (small)."""

    base: int  # final id of local label k, before merges, is base + k - (merged before k)
    merged: np.ndarray  # sorted local labels of this block that join an earlier object
    merged_to: np.ndarray  # their final ids

    def table(self, n_local: int, dtype: np.dtype) -> np.ndarray:
        """Dense ``local -> final`` table of ``n_local + 1`` entries (0 stays 0)."""
        local = np.arange(n_local + 1, dtype=np.int64)
        table = self.base + local - np.searchsorted(self.merged, local, side="left")
        table[self.merged] = self.merged_to
        table[0] = 0
        return table.astype(dtype)


@dataclass(frozen=True)
class MergeResult:
    n_labels: int
    relabels: tuple[BlockRelabel, ...]


def merge_labels(counts: Sequence[int], pairs: Sequence[np.ndarray]) -> MergeResult:
    """Union-find the face pairs and give every block its compact relabel table.

    Parameters
    ----------
    counts
        Number of local labels of each block, by linear block number.
    pairs
        Provisional-id pairs from every block's :func:`face_pairs`.
    """
    counts_arr = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts_arr)[:-1]])  # labels before each block
    edges = np.concatenate(pairs) if pairs else np.empty((0, 2), np.uint64)
    empty = np.empty(0, np.int64)
    if len(edges) == 0:
        plain = tuple(BlockRelabel(int(s), empty, empty) for s in starts)
        return MergeResult(int(counts_arr.sum()), plain)

    nodes, inverse = np.unique(edges.ravel(), return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    graph = coo_matrix(
        (np.ones(len(inverse), dtype=np.int8), (inverse[:, 0], inverse[:, 1])),
        shape=(len(nodes), len(nodes)),
    )
    _, component = connected_components(graph, directed=False)
    # Scan position of every node: labels of earlier blocks, then the local number.
    node_block = (nodes >> _SHIFT).astype(np.int64)
    node_local = (nodes & np.uint64(0xFFFFFFFF)).astype(np.int64)
    position = starts[node_block] + node_local  # 1-based scan position
    # Nodes are sorted by provisional id, which sorts them by block then local label, i.e. by
    # scan position: the first node seen of each component is its root.
    first = np.full(component.max() + 1, len(nodes), dtype=np.int64)
    np.minimum.at(first, component, np.arange(len(nodes)))
    root = first[component]
    is_merged = root != np.arange(len(nodes))
    merged_positions = np.sort(position[is_merged])
    # Final id of a root/singleton = its position minus the merged labels scanned before it.
    root_final = position[root] - np.searchsorted(merged_positions, position[root], side="left")

    relabels = []
    merged_blocks = node_block[is_merged]
    merged_local = node_local[is_merged]
    merged_final = root_final[is_merged]
    by_block = np.argsort(merged_blocks, kind="stable")
    merged_blocks, merged_local, merged_final = (
        merged_blocks[by_block],
        merged_local[by_block],
        merged_final[by_block],
    )
    bounds = np.searchsorted(merged_blocks, np.arange(len(counts_arr) + 1), side="left")
    for b, start in enumerate(starts):
        lo, hi = bounds[b], bounds[b + 1]
        local = merged_local[lo:hi]
        order_local = np.argsort(local)
        before = int(np.searchsorted(merged_positions, start + 1, side="left"))
        relabels.append(
            BlockRelabel(
                base=int(start) - before,
                merged=local[order_local],
                merged_to=merged_final[lo:hi][order_local],
            )
        )
    return MergeResult(int(counts_arr.sum()) - int(is_merged.sum()), tuple(relabels))


def smallest_label_dtype(n_labels: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids ``0..n_labels``."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_labels <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise OverflowError(f"{n_labels} labels do not fit in 64 bits")

"""Stable ids for a growing scene: objects keep the ids they had in the previous version.

A fresh run numbers objects ``1..n`` in scan order of their first pixel
(:mod:`segflow.stitch.labels`). A scene that grew is stitched again over all its blocks, so
its objects are exactly a fresh run's (the same partition), but numbered so that ids last:

- each object claims the smallest id its pixels had in the previous version (none when
  every pixel of it is new, or was background);
- an id claimed by several objects (an old object that the new tiles split) stays with the
  one whose first pixel comes first in scan order;
- every other object gets a new id after the previous version's largest id (ids of objects
  that have since gone included: an id is never given to another object), in scan order of
  first pixels.

An object the new tiles do not reach keeps its id; two old objects that a new tile joins are
one object with the smaller id; ids are no longer consecutive (``max_label`` says how
large they go).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from segflow.stitch.labels import (
    NO_PIXEL,
    BlockObjects,
    BlockRelabel,
    MergeResult,
    join_nodes,
)

_NONE = np.iinfo(np.int64).max  # "claims no id", sorts after every id


def merge_keeping_ids(
    blocks: Sequence[BlockObjects], pairs: Sequence[np.ndarray], previous_max: int
) -> MergeResult:
    """:func:`~segflow.stitch.labels.merge_objects` (every object kept) with the ids of the
    module note; each block's :class:`BlockObjects` carries its claims (``node_claims``,
    ``own_claims``: the previous id of each node and of each label it kept, 0 for none)."""
    nodes = join_nodes(blocks, pairs)
    n_components = nodes.n_components
    node_claims = np.concatenate(
        [_claims(b.node_claims, len(b.nodes)) for b in blocks] or [np.empty(0, np.int64)]
    )
    claim = np.full(n_components, _NONE, dtype=np.int64)
    np.minimum.at(claim, nodes.component, node_claims)
    first = np.full(n_components, NO_PIXEL, dtype=np.int64)
    np.minimum.at(first, nodes.component, nodes.first)
    own_first = [b.kept_first for b in blocks]
    own_claim = [_claims(b.own_claims, len(b.kept_first)) for b in blocks]
    ids = assign_ids(
        np.concatenate([first, *own_first]), np.concatenate([claim, *own_claim]), previous_max
    )
    node_ids = ids[:n_components][nodes.component]
    bounds = np.cumsum([n_components, *(len(f) for f in own_first)])
    block_nodes = np.searchsorted(nodes.block, np.arange(len(blocks) + 1))
    relabels = tuple(
        BlockRelabel(ids[bounds[i] : bounds[i + 1]], nodes.local[lo:hi], node_ids[lo:hi])
        for i, (lo, hi) in enumerate(itertools.pairwise(block_nodes))
    )
    largest = int(ids.max()) if len(ids) else 0
    return MergeResult(len(ids), relabels, max_label=max(int(previous_max), largest))


def _claims(values: np.ndarray | None, n: int) -> np.ndarray:
    """Claims as int64, "none" (0) as :data:`_NONE`."""
    if values is None:
        return np.full(n, _NONE, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    return np.where(values > 0, values, _NONE)


def assign_ids(first: np.ndarray, claim: np.ndarray, previous_max: int) -> np.ndarray:
    """The id of each object from its ``first`` pixel and its ``claim`` (the module note's
    rule; a claim of :data:`_NONE` is none).

    Examples
    --------
    >>> none = np.iinfo(np.int64).max
    >>> assign_ids(np.array([5, 1, 9, 3]), np.array([2, 2, none, 7]), 7).tolist()
    [8, 2, 9, 7]
    """
    ids = np.zeros(len(first), dtype=np.int64)
    claimed = np.flatnonzero(claim != _NONE)
    order = claimed[np.lexsort((first[claimed], claim[claimed]))]
    if len(order):
        wins = np.concatenate([[True], claim[order][1:] != claim[order][:-1]])
        ids[order[wins]] = claim[order[wins]]
    rest = np.flatnonzero(ids == 0)
    rest = rest[np.argsort(first[rest], kind="stable")]
    ids[rest] = int(previous_max) + 1 + np.arange(len(rest), dtype=np.int64)
    return ids

"""K-means clustering of pixel features: centres from a sample of the whole item.

The sample does not depend on the block layout: a pixel is in it when a hash of its item-wide
linear index falls below a rate chosen from the item's size, and the sample is sorted by that
index before fitting. Fitting is deterministic (seeded), so every layout gets the same centres,
and the assignment is pointwise: blockwise output equals a whole-array assignment with the
same centres, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from segflow.ops.registry import Done, OpContext, Operation, OpParams, register
from segflow.ops.statistics import nan_pixels

_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a cheap, well-spread index hash
_FULL_LIMIT = 200_000  # above this many samples, fit with mini-batches


class KMeansParams(OpParams):
    k: int = Field(3, ge=2, le=254, description="number of clusters; output classes 1..k")
    sample: int = Field(100_000, ge=10, description="pixels drawn from the whole item to fit")
    position: float = Field(
        0.0, ge=0, description="weight of the pixel position (item-relative, 0..1) as features"
    )
    seed: int = Field(0, description="seed of the sample and of the fit")
    max_iter: int = Field(50, ge=1, description="iterations of the fit")
    batch: int = Field(4096, ge=16, description="mini-batch size for samples above 200,000")


def feature_columns(
    image: np.ndarray,
    box: tuple[slice, ...],
    shape: tuple[int, ...],
    position: float,
    chosen: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The features as float64 columns: every channel, then the weighted position; only the
    pixels at the flat indices ``chosen`` when given."""
    flat = image.reshape(len(image), -1)
    columns = [(c if chosen is None else c[chosen]).astype(np.float64) for c in flat]
    if position > 0:
        local = np.unravel_index(
            np.arange(flat.shape[1]) if chosen is None else chosen, image.shape[1:]
        )
        for axis, (s, n) in enumerate(zip(box, shape, strict=True)):
            columns.append(position * ((local[axis] + s.start) / max(n - 1, 1)))
    return columns


def features(
    image: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], position: float
) -> np.ndarray:
    """``(pixels, features)`` float64: every channel, then the weighted position."""
    return np.stack(feature_columns(image, box, shape, position), axis=1)


def _linear_index(box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    return np.ravel_multi_index(tuple(grids), shape).ravel().astype(np.uint64)


def _hash_unit(index: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per item pixel index."""
    mixed = (index + np.uint64(seed & 0xFFFFFFFF)) * _MIX
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class _Rate:
    rate: float


@dataclass(frozen=True)
class KMeansCentres:
    """Pass 1 counts the item's pixels, pass 2 draws the sample, then the client fits."""

    params: KMeansParams
    positional = True

    def start(self) -> Any:
        return None

    def map(
        self,
        core: np.ndarray,
        state: Any,
        *,
        box: tuple[slice, ...] = (),
        shape: tuple[int, ...] = (),
    ) -> Any:
        missing = nan_pixels(core)  # a pixel with a NaN feature has no value: left out
        if state is None:
            size = int(np.prod(core.shape[1:]))
            return size if missing is None else size - int(np.count_nonzero(missing))
        index = _linear_index(box, shape)
        drawn = _hash_unit(index, self.params.seed) < state.rate
        if missing is not None:
            drawn &= ~missing.ravel()
        chosen = np.flatnonzero(drawn)
        columns = feature_columns(core, box, shape, self.params.position, chosen)
        return index[chosen], np.stack(columns, axis=1)

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if state is None:
            total = sum(partials)
            return _Rate(min(1.0, self.params.sample / max(total, 1)))
        index = np.concatenate([p[0] for p in partials])
        data = np.concatenate([p[1] for p in partials])
        order = np.argsort(index, kind="stable")
        return Done(fit_kmeans(data[order], self.params))


def fit_kmeans(data: np.ndarray, params: KMeansParams) -> np.ndarray:
    """Centres ``(k, features)``: k-means++ seeding, then Lloyd (or mini-batch) iterations."""
    from scipy.cluster.vq import kmeans2  # 0.3 s to import: only where k-means runs

    rng = np.random.default_rng(params.seed)
    if len(data) < params.k:
        raise ValueError(f"k-means needs at least k={params.k} samples, the item gave {len(data)}")
    if len(data) <= _FULL_LIMIT:
        centres, _ = kmeans2(data, params.k, iter=params.max_iter, minit="++", rng=rng)
        return np.asarray(centres)
    start = data[rng.choice(len(data), params.batch, replace=False)]
    centres, _ = kmeans2(start, params.k, iter=1, minit="++", rng=rng)
    counts = np.zeros(params.k)
    for _ in range(params.max_iter):  # Sculley's mini-batch k-means
        batch = data[rng.integers(0, len(data), params.batch)]
        nearest = assign(batch, centres)
        for j in range(params.k):
            members = batch[nearest == j]
            if len(members):
                counts[j] += len(members)
                centres[j] += (members.sum(axis=0) - len(members) * centres[j]) / counts[j]
    return np.asarray(centres)


def nearest_centre(columns: Sequence[np.ndarray], centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (squared distance summed feature by feature, in order)
    for each pixel of the feature ``columns``; the first centre on ties."""
    n = len(columns[0])
    best = np.full(n, np.inf)
    nearest = np.zeros(n, dtype=np.intp)
    distance, term = np.empty(n), np.empty(n)
    for j, centre in enumerate(centres):
        np.subtract(columns[0], centre[0], out=distance)
        np.square(distance, out=distance)
        for column, value in zip(columns[1:], centre[1:], strict=True):
            np.subtract(column, value, out=term)
            np.square(term, out=term)
            distance += term
        closer = distance < best
        np.copyto(best, distance, where=closer)
        nearest[closer] = j
    return nearest


def assign(data: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each row of ``(pixels, features)`` data."""
    return nearest_centre([data[:, j] for j in range(data.shape[1])], centres)


def kmeans_classes(image: np.ndarray, params: KMeansParams, ctx: OpContext) -> np.ndarray:
    """Class ``1..k`` of the nearest centre for every pixel (centres from the whole item);
    0 where a feature is NaN (such pixels are not sampled either)."""
    spatial = image.shape[1:]
    box = ctx.box if ctx.box else tuple(slice(0, n) for n in spatial)
    shape = ctx.shape if ctx.shape else spatial
    columns = feature_columns(image, box, shape, params.position)
    nearest = nearest_centre(columns, np.asarray(ctx.stat))
    classes = (nearest.reshape(spatial) + 1).astype(np.uint8)
    missing = nan_pixels(image)
    if missing is not None:
        classes[missing] = 0
    return classes[np.newaxis]


register(
    Operation(
        name="kmeans",
        kind="global",
        params=KMeansParams,
        apply=kmeans_classes,
        summary="k-means classes 1..k of the pixel features (all bands, optionally the "
        "position); centres fitted on a layout-independent sample of the whole item",
        statistic=lambda p: KMeansCentres(p),
        out_channels=lambda p, channels: 1,
        out_dtype=lambda p, dtype: np.dtype(np.uint8),
    )
)

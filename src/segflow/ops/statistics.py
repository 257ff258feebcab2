"""Global statistics reduced over every block of an item (histograms, exact percentiles).

Each statistic follows :class:`segflow.ops.registry.GlobalStatistic`: ``map`` runs on a block
core where the block lives, ``combine`` runs on the small partials. Nothing here ever holds
more than one block plus a histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow.ops.registry import Done


@dataclass(frozen=True)
class _Range:
    """First pass: the item's minimum and maximum."""


@dataclass(frozen=True)
class _Histogram:
    low: Any
    high: Any
    nbins: int
    integer: bool


def _block_range(core: np.ndarray) -> tuple[Any, Any] | None:
    if core.size == 0:
        return None
    return core.min(), core.max()


def _merge_ranges(partials: Sequence[tuple[Any, Any] | None]) -> tuple[Any, Any]:
    ranges = [p for p in partials if p is not None]
    lows, highs = zip(*ranges, strict=True)
    # min()/max() of numpy scalars keep the data dtype, which fixes the bin edges' dtype below.
    return min(lows), max(highs)


@dataclass(frozen=True)
class Histogram:
    """The item histogram, binned exactly as :func:`skimage.exposure.histogram` bins it.

    Integer images get one bin per integer value from the item's minimum to its maximum
    (``nbins`` is ignored, as in scikit-image); float images get ``nbins`` equal bins over
    ``[min, max]`` with edges in the image dtype, as ``numpy.histogram`` makes them when it
    finds the range itself. Counting each block core with the same edges and adding the counts
    gives the whole-item histogram exactly.

    The final value is ``(counts, bin_centers)``, or ``("constant", value)`` when every pixel
    of the item has the same value.
    """

    nbins: int = 256

    def start(self) -> Any:
        return _Range()

    def map(self, core: np.ndarray, state: Any) -> Any:
        if isinstance(state, _Range):
            return _block_range(core)
        if core.size == 0:
            return None
        if state.integer:
            shifted = core.astype(np.int64, copy=False).ravel() - int(state.low)
            return np.bincount(shifted, minlength=int(state.high) - int(state.low) + 1)
        counts, _ = np.histogram(core, bins=state.nbins, range=(state.low, state.high))
        return counts

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if isinstance(state, _Range):
            low, high = _merge_ranges(partials)
            if low == high:
                return Done(("constant", low))
            integer = np.issubdtype(np.asarray(low).dtype, np.integer)
            return _Histogram(low=low, high=high, nbins=self.nbins, integer=bool(integer))
        counts = np.sum([p for p in partials if p is not None], axis=0)
        if state.integer:
            centers = np.arange(int(state.low), int(state.high) + 1)
        else:
            probe = np.asarray([state.low])
            edges = np.histogram(probe, bins=state.nbins, range=(state.low, state.high))[1]
            centers = (edges[:-1] + edges[1:]) / 2.0
        return Done((counts, centers))


@dataclass(frozen=True)
class _Refine:
    """Histogram pass over ``[low, high]`` to narrow down where the wanted ranks lie."""

    low: float
    high: float
    ranks: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class _Gather:
    """Collect the distinct values (with counts) inside narrow intervals around each rank."""

    intervals: tuple[tuple[float, float], ...]
    ranks: tuple[int, ...]
    size: int


_REFINE_BINS = 4096
_GATHER_LIMIT = 2_000_000  # distinct candidate values we accept to gather on the client


@dataclass(frozen=True)
class Percentiles:
    """Exact percentiles of the whole item, as ``numpy.percentile(image, q)`` computes them.

    Pass 1 finds the range, pass 2 (repeated while needed) counts a histogram to find the bins
    that hold the wanted order statistics, pass 3 gathers the distinct values of those bins
    with their counts and counts the values below them. The order statistics are therefore
    exact, and the final linear interpolation uses numpy's own formula.
    """

    q: tuple[float, ...]

    def start(self) -> Any:
        return _Range()

    def map(self, core: np.ndarray, state: Any) -> Any:
        values = core.ravel()
        if isinstance(state, _Range):
            return (_block_range(core), values.size)
        if isinstance(state, _Refine):
            below = int(np.count_nonzero(values < state.low))
            # np.histogram leaves out the values outside its range: no filtered copy needed
            counts, _ = np.histogram(values, bins=_REFINE_BINS, range=(state.low, state.high))
            return below, counts
        result = []
        for low, high in state.intervals:
            below = int(np.count_nonzero(values < low))
            inside = values[(values >= low) & (values <= high)]
            uniques, counts = np.unique(inside, return_counts=True)
            result.append((below, uniques, counts))
        return result

    def _ranks(self, size: int) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        # numpy's "linear" method: virtual index = n*q + (1 + q*(1 - 1 - 1)) - 1.
        quantiles = np.true_divide(np.asarray(self.q, dtype=np.float64), 100)
        virtual = size * quantiles + (1 + quantiles * (1 - 1 - 1)) - 1
        previous = np.floor(virtual)
        previous = np.clip(previous, 0, size - 1).astype(np.int64)
        following = np.clip(previous + 1, 0, size - 1)
        gamma = np.asarray(virtual - previous, dtype=np.float64)
        ranks = tuple(sorted(set(previous.tolist()) | set(following.tolist())))
        return ranks, np.stack([previous, following]), gamma

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if isinstance(state, _Range):
            size = sum(n for _, n in partials)
            if size == 0:
                raise ValueError("percentiles of an empty item are undefined")
            low, high = _merge_ranges([r for r, _ in partials])
            ranks = self._ranks(size)[0]
            if low == high:
                return Done(tuple(np.asarray(low, dtype=np.float64) for _ in self.q))
            return _Refine(low=float(low), high=float(high), ranks=ranks, size=size)
        if isinstance(state, _Refine):
            below = sum(b for b, _ in partials)
            counts = np.sum([c for _, c in partials], axis=0)
            edges = np.linspace(state.low, state.high, _REFINE_BINS + 1)
            cumulative = below + np.cumsum(counts)
            intervals = []
            for rank in state.ranks:
                # The bin whose cumulative count first exceeds the rank holds it; widen by one
                # bin on each side so rounding in the binning can never put it outside.
                i = int(np.searchsorted(cumulative, rank, side="right"))
                lo_i, hi_i = max(i - 1, 0), min(i + 2, _REFINE_BINS)
                intervals.append((float(edges[lo_i]), float(edges[hi_i])))
            estimate = sum(
                counts[
                    max(int(np.searchsorted(edges, lo)) - 1, 0) : int(np.searchsorted(edges, hi))
                ].sum()
                for lo, hi in intervals
            )
            narrow = all(hi - lo < (state.high - state.low) for lo, hi in intervals)
            if estimate > _GATHER_LIMIT and narrow:
                # Too many candidates: zoom into the span of the intervals and count again.
                lo = min(lo for lo, _ in intervals)
                hi = max(hi for _, hi in intervals)
                return _Refine(low=lo, high=hi, ranks=state.ranks, size=state.size)
            return _Gather(intervals=tuple(intervals), ranks=state.ranks, size=state.size)
        values: dict[int, Any] = {}
        for k, rank in enumerate(state.ranks):
            below = sum(p[k][0] for p in partials)
            uniques = np.concatenate([p[k][1] for p in partials])
            counts = np.concatenate([p[k][2] for p in partials])
            order = np.argsort(uniques, kind="stable")
            uniques, counts = uniques[order], counts[order]
            cumulative = below + np.cumsum(counts)
            j = int(np.searchsorted(cumulative, rank, side="right"))
            if j >= len(uniques) or rank < below:
                raise RuntimeError(f"percentile search lost rank {rank}; please report this")
            values[rank] = uniques[j]
        _, pairs, gamma = self._ranks(state.size)
        out = []
        for k in range(len(self.q)):
            a = np.asarray(values[int(pairs[0, k])])
            b = np.asarray(values[int(pairs[1, k])])
            out.append(_lerp(a, b, gamma[k]))
        return Done(tuple(out))


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> Any:
    """numpy.percentile's interpolation, written out so the result matches it bit for bit."""
    t_arr = np.asarray(t, dtype=np.result_type(a.dtype, np.float64))
    diff = b - a
    result = np.add(a, diff * t_arr)
    if t >= 0.5:
        result = np.subtract(b, diff * (1 - t_arr))
    return result[()]

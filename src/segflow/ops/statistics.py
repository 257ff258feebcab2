"""Global statistics reduced over every block of an item (histograms, exact percentiles).

Each statistic follows :class:`segflow.ops.registry.GlobalStatistic`: ``map`` runs on a block
core where the block lives, ``combine`` runs on the small partials. Nothing here ever holds
more than one block plus a histogram.

NaN means "no value" (the usual nodata of float rasters): every statistic is taken over the
item's other values, as scikit-image / numpy would compute it on ``image[~np.isnan(image)]``.
An item with no other value is an error; so are infinite values where a histogram needs a
finite range.
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
    """The core's minimum and maximum, NaN left out; None when it has no other value."""
    if core.size == 0:
        return None
    low, high = core.min(), core.max()
    if core.dtype.kind == "f" and (np.isnan(low) or np.isnan(high)):
        low, high = np.fmin.reduce(core, axis=None), np.fmax.reduce(core, axis=None)
        if np.isnan(low):
            return None
    return low, high


def _merge_ranges(partials: Sequence[tuple[Any, Any] | None]) -> tuple[Any, Any]:
    ranges = [p for p in partials if p is not None]
    if not ranges:
        raise ValueError("the item has no values (every pixel is NaN or the item is empty)")
    lows, highs = zip(*ranges, strict=True)
    # min()/max() of numpy scalars keep the data dtype, which fixes the bin edges' dtype below.
    return min(lows), max(highs)


def _merge_optional_ranges(partials: Sequence[tuple[Any, Any] | None]) -> tuple[Any, Any] | None:
    return _merge_ranges(partials) if any(p is not None for p in partials) else None


def _sum_sparse(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sparse counts ``(indices, counts)`` added up."""
    size = max((int(f[-1]) + 1 for f, _ in parts if len(f)), default=0)
    total = np.zeros(size, dtype=np.int64)
    for filled, counts in parts:
        total[filled] += counts  # indices are distinct within a part
    filled = np.flatnonzero(total)
    return filled, total[filled]


def without_nan(values: np.ndarray) -> np.ndarray:
    """The values that are not NaN (the same array where there is none)."""
    if values.dtype.kind != "f" or values.size == 0 or not np.isnan(values.min()):
        return values
    return values[~np.isnan(values)]


def nan_pixels(image: np.ndarray) -> np.ndarray | None:
    """Where some channel of a ``(channels, ...)`` block is NaN; None where none is."""
    if image.dtype.kind != "f" or image.size == 0 or not np.isnan(image.min()):
        return None
    return np.isnan(image).any(axis=0)


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

    def merge(self, partials: Sequence[Any], state: Any) -> Any:
        """Several blocks' partials as one (on a worker: a tree reduction)."""
        if isinstance(state, _Range):
            return _merge_optional_ranges(partials)
        counts = [p for p in partials if p is not None]
        return np.sum(counts, axis=0) if counts else None

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if isinstance(state, _Range):
            low, high = _merge_ranges(partials)
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ValueError(
                    f"the item has infinite values (range {low} to {high}); a histogram "
                    "needs a finite range: clip them first, e.g. {op: clip, low: ..., high: ...}"
                )
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
        return Done((counts, centers), counted=int(counts.sum()))


@dataclass(frozen=True)
class _Select:
    """Narrow down the order statistics: each wanted rank lies among the values whose
    order-preserving key starts with ``prefixes[k]`` (``bits`` bits long; 0 bits at first)."""

    ranks: tuple[int, ...]
    prefixes: tuple[int, ...]
    bits: int
    dtype: np.dtype
    size: int
    low: Any = None  # the item's range, once known
    high: Any = None


@dataclass(frozen=True)
class _Gather:
    """Collect the distinct values (with counts) inside narrow intervals around each rank."""

    intervals: tuple[tuple[Any, Any], ...]
    ranks: tuple[int, ...]
    size: int


_DIGIT = 16  # key bits resolved per counting pass (65,536 counters)
_GATHER_LIMIT = 2_000_000  # candidate values we accept to gather on the client


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integer keys that sort like ``values``: integers with the sign bit flipped;
    floats with every bit flipped for negatives and the sign bit set for the rest (the IEEE
    754 order; -0.0 sorts just below 0.0)."""
    width = 8 * values.dtype.itemsize
    unsigned = np.dtype(f"uint{width}")
    bits = values.view(unsigned)
    sign = unsigned.type(1 << (width - 1))
    if values.dtype.kind == "f":
        negative = (bits >> unsigned.type(width - 1)).astype(bool)
        return np.where(negative, ~bits, bits | sign)
    if values.dtype.kind == "i":
        return bits ^ sign
    return bits


def _key_values(dtype: np.dtype, prefix: int, bits: int) -> tuple[Any, Any]:
    """The smallest and largest value (in ``dtype``) whose key starts with ``prefix``."""
    width = 8 * dtype.itemsize
    unsigned = np.dtype(f"uint{width}")
    rest = width - bits
    sign = 1 << (width - 1)

    def value(key: int) -> Any:
        if dtype.kind == "f":
            pattern = key ^ sign if key & sign else ~key & ((1 << width) - 1)
        elif dtype.kind == "i":
            pattern = key ^ sign
        else:
            pattern = key
        return np.array(pattern, dtype=unsigned).view(dtype)[()]

    low, high = value(prefix << rest), value(((prefix + 1) << rest) - 1)
    if dtype.kind == "f":  # keys past the infinities are NaN bit patterns
        low = dtype.type(-np.inf) if np.isnan(low) else low
        high = dtype.type(np.inf) if np.isnan(high) else high
    return low, high


def _count_digits(values: np.ndarray, prefixes: Sequence[int], bits: int) -> list[Any]:
    """For each distinct prefix: how many keys sort below it, and the counts of the next
    digit among the keys that start with it, sparse (digits, counts): real data fill few of
    the 65,536 counters, and every block sends its counts to the client."""
    width = 8 * values.dtype.itemsize
    keys = _sortable_keys(values)
    step = min(_DIGIT, width - bits)
    unsigned = keys.dtype.type
    head = keys >> unsigned(width - bits) if bits else np.zeros_like(keys)
    digit = (keys >> unsigned(width - bits - step)) & unsigned((1 << step) - 1)
    out = []
    for prefix in sorted(set(prefixes)):
        mine = head == unsigned(prefix)
        below = int(np.count_nonzero(head < unsigned(prefix)))
        counts = np.bincount(digit[mine], minlength=1 << step)
        filled = np.flatnonzero(counts)
        out.append((prefix, below, (filled, counts[filled])))
    return out


def _first_digit_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse counts of the first key digit (top 16 bits, all bits of 8-bit data): the raw
    top bits are counted as they are (a view of the high half-words, no key array), then the
    65,536 counters are put in key order."""
    width = 8 * values.dtype.itemsize
    step = min(_DIGIT, width)
    raw_type = np.dtype(f"uint{step}")
    if np.little_endian and width > step:
        top = values.view(raw_type)[width // step - 1 :: width // step]
    else:
        top = values.view(f"uint{width}") >> np.uint64(width - step).astype(f"uint{width}")
    counts = np.bincount(top, minlength=1 << step)
    # The key transform is bitwise, so the top bits' key is the key of the top bits read as
    # a value of the same kind (float16 for floats: sign bit first, like the wider types).
    patterns = np.arange(1 << step, dtype=raw_type).view(f"{values.dtype.kind}{step // 8}")
    order = _sortable_keys(patterns).astype(np.int64)
    ordered = np.zeros_like(counts)
    ordered[order] = counts
    filled = np.flatnonzero(ordered)
    return filled, ordered[filled]


@dataclass(frozen=True)
class Percentiles:
    """Exact percentiles of the whole item, as ``numpy.percentile(image, q)`` computes them
    (``numpy.nanpercentile``: NaN is left out).

    A radix selection on an order-preserving integer key of the values: the first pass
    counts the top 16 key bits of every value (and the item's range); while the bin that
    holds a wanted order statistic has more than ``_GATHER_LIMIT`` values, another pass counts
    the next 16 bits inside it (at most 3 more for 64-bit data, usually none); the last pass
    gathers the distinct values of each bin with their counts and the number of values below.
    The counts are exact integers, so are the order statistics; the final linear
    interpolation uses numpy's own formula.
    """

    q: tuple[float, ...]

    def start(self) -> Any:
        return None

    def map(self, core: np.ndarray, state: Any) -> Any:
        values = core.ravel()
        if values.dtype == np.bool_:
            values = values.view(np.uint8)
        values = without_nan(values)
        if state is None:
            return _block_range(values), values.size, values.dtype, _first_digit_counts(values)
        if isinstance(state, _Select):
            return _count_digits(values, state.prefixes, state.bits)
        result = []
        for low, high in state.intervals:
            below = int(np.count_nonzero(values < low))
            inside = values[(values >= low) & (values <= high)]
            uniques, counts = np.unique(inside, return_counts=True)
            result.append((below, uniques, counts))
        return result

    def merge(self, partials: Sequence[Any], state: Any) -> Any:
        """Several blocks' partials as one (on a worker: a tree reduction)."""
        if state is None:
            extent = _merge_optional_ranges([p[0] for p in partials])
            size = sum(p[1] for p in partials)
            return extent, size, partials[0][2], _sum_sparse([p[3] for p in partials])
        if isinstance(state, _Select):
            merged: dict[int, tuple[int, list[Any]]] = {}
            for part in partials:
                for prefix, below, counts in part:
                    before, parts = merged.get(prefix, (0, []))
                    merged[prefix] = (before + below, [*parts, counts])
            return [(k, below, _sum_sparse(parts)) for k, (below, parts) in sorted(merged.items())]
        out = []
        for k in range(len(state.intervals)):
            below = sum(p[k][0] for p in partials)
            values, inverse = np.unique(
                np.concatenate([p[k][1] for p in partials]), return_inverse=True
            )
            counts = np.zeros(len(values), dtype=np.int64)
            np.add.at(counts, inverse, np.concatenate([p[k][2] for p in partials]))
            out.append((below, values, counts))
        return out

    def _ranks(self, size: int) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        # numpy's "linear" method: virtual index = (n - 1) * q, written as numpy writes it
        # (the general alpha/beta formula rounds differently).
        quantiles = np.true_divide(np.asarray(self.q, dtype=np.float64), 100)
        virtual = (size - 1) * quantiles
        previous = np.floor(virtual)
        previous = np.clip(previous, 0, size - 1).astype(np.int64)
        following = np.clip(previous + 1, 0, size - 1)
        gamma = np.asarray(virtual - previous, dtype=np.float64)
        ranks = tuple(sorted(set(previous.tolist()) | set(following.tolist())))
        return ranks, np.stack([previous, following]), gamma

    def combine(self, partials: Sequence[Any], state: Any) -> Any:
        if state is None:
            size = sum(p[1] for p in partials)
            if size == 0:
                raise ValueError(
                    "percentiles are undefined: the item has no values (every pixel is NaN "
                    "or the item is empty)"
                )
            low, high = _merge_ranges([p[0] for p in partials])
            ranks = self._ranks(size)[0]
            if low == high:
                return Done(tuple(np.asarray(low, dtype=np.float64) for _ in self.q))
            dtype = np.dtype(partials[0][2])
            start = _Select(ranks, (0,) * len(ranks), 0, dtype, size, low, high)
            counted = [[(0, 0, p[3])] for p in partials]  # the first digits, counted
            return self._narrow(start, counted)
        if isinstance(state, _Select):
            return self._narrow(state, partials)
        return self._finish(state, partials)

    def _narrow(self, state: _Select, partials: Sequence[Any]) -> Any:
        """One more digit of each rank's key; gather once every bin is small enough."""
        width = 8 * state.dtype.itemsize
        step = min(_DIGIT, width - state.bits)
        merged: dict[int, tuple[int, np.ndarray]] = {}
        for part in partials:
            for prefix, below, (filled, counts) in part:
                before, total = merged.get(prefix, (0, np.zeros(1 << step, dtype=np.int64)))
                np.add.at(total, filled, counts)
                merged[prefix] = (before + below, total)
        prefixes, sizes = [], {}
        for rank, prefix in zip(state.ranks, state.prefixes, strict=True):
            below, counts = merged[prefix]
            cumulative = below + np.cumsum(counts)
            digit = int(np.searchsorted(cumulative, rank, side="right"))
            chosen = (prefix << step) | digit
            prefixes.append(chosen)
            sizes[chosen] = int(counts[digit])
        bits = state.bits + step
        if sum(sizes.values()) > _GATHER_LIMIT and bits < width:
            return _Select(state.ranks, tuple(prefixes), bits, state.dtype, state.size,
                           state.low, state.high)  # fmt: skip
        intervals = []
        for prefix in prefixes:
            low, high = _key_values(state.dtype, prefix, bits)
            intervals.append((max(low, state.low), min(high, state.high)))
        return _Gather(intervals=tuple(intervals), ranks=state.ranks, size=state.size)

    def _finish(self, state: _Gather, partials: Sequence[Any]) -> Done:
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
    """numpy.percentile's interpolation, written out so the result matches it bit for bit;
    between two equal infinities, that infinity (where numpy gives NaN)."""
    if a == b and np.isinf(a):
        return a[()]
    t_arr = np.asarray(t, dtype=np.result_type(a.dtype, np.float64))
    with np.errstate(invalid="ignore"):  # next to an infinity: NaN, as numpy gives (warning)
        diff = b - a
        result = np.add(a, diff * t_arr)
        if t >= 0.5:
            result = np.subtract(b, diff * (1 - t_arr))
    return result[()]

"""The exact percentile statistic, driven directly over random splits into blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflow.ops import statistics
from segflow.ops.registry import Done
from segflow.ops.statistics import Percentiles

DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint64"]


def _reduce(statistic: Percentiles, blocks: list[np.ndarray]) -> Any:
    state = statistic.start()
    while True:
        result = statistic.combine([statistic.map(b[np.newaxis], state) for b in blocks], state)
        if isinstance(result, Done):
            return result.value
        state = result


def _values(dtype: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("float"):
        values = (rng.standard_normal(n) * 100).astype(dtype)
        values[rng.random(n) < 0.2] = 0  # ties
        values[rng.random(n) < 0.05] = -0.0
        return values
    info = np.iinfo(dtype)
    wide = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    narrow = rng.integers(0, 5, n).astype(dtype)  # many ties in one coarse bin
    return np.where(rng.random(n) < 0.5, wide, narrow)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(DTYPES),
    st.integers(1, 3000),
    st.integers(0, 2**32 - 1),
    st.lists(st.floats(0, 100), min_size=1, max_size=3),
    st.booleans(),
    st.booleans(),
)
def test_percentiles_equal_numpy_for_every_dtype(
    dtype: str, n: int, seed: int, q: list[float], few_gathered: bool, special: bool
) -> None:
    """Bit-exact ``numpy.percentile`` whatever the split, through the gather path and, with
    a tiny gather limit, through the refining histogram passes; with NaN (left out, as
    ``numpy.nanpercentile``) and infinities among float values when ``special``."""
    values = _values(dtype, n, seed)
    if special and values.dtype.kind == "f":
        rng = np.random.default_rng(seed + 1)
        draw = rng.random(n)
        values[draw < 0.1] = np.nan
        values[(draw >= 0.1) & (draw < 0.13)] = np.inf
        values[(draw >= 0.13) & (draw < 0.15)] = -np.inf
        # NaN with the sign bit set, and with payload bits: NaN whatever its bit pattern
        values[(draw >= 0.15) & (draw < 0.17)] = -np.nan
    cuts = np.sort(np.random.default_rng(seed).integers(0, n, 3))
    blocks = [b for b in np.split(values, cuts) if b.size]
    with pytest.MonkeyPatch.context() as patch:
        if few_gathered:
            patch.setattr(statistics, "_GATHER_LIMIT", 8)
        if np.isnan(values).all():
            with pytest.raises(ValueError, match="no values"):
                _reduce(Percentiles(tuple(q)), blocks)
            return
        result = _reduce(Percentiles(tuple(q)), blocks)
    with np.errstate(invalid="ignore"):  # next to an infinity numpy interpolates to NaN
        expected = np.nanpercentile(values, q)
    # ... even between two equal infinities, where the percentile is that infinity
    ordered = np.sort(values[~np.isnan(values)])
    below = np.floor((len(ordered) - 1) * np.asarray(q) / 100).astype(int)
    low, high = ordered[below], ordered[np.minimum(below + 1, len(ordered) - 1)]
    expected = np.where(np.isnan(expected) & (low == high), low, expected)
    np.testing.assert_array_equal(np.asarray(result, dtype=np.float64), expected)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["otsu", "li", "yen", "multi_otsu", "threshold_percentile", "canny"]),
    st.sampled_from(["uint8", "uint16", "float32"]),
    st.integers(0, 2**32 - 1),
    st.integers(2, 4),
)
def test_statistics_merged_as_a_tree_on_the_workers(
    op: str, dtype: str, seed: int, fan_in: int
) -> None:
    """With many blocks, partials are merged in groups of FAN_IN before the client sees them;
    the result equals the whole-array reference, and progress still counts every block."""
    from scipy import ndimage as ndi
    from skimage import feature, filters

    from segflow import segment
    from segflow.engine import run

    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(rng.random((48, 40)), 1.0)
    if dtype != "float32":
        # scikit-image's multi-Otsu search is quadratic in the integer levels present (one
        # bin each): 40,000 levels take seconds on each side, 2,000 still go past uint8.
        top = 200 if dtype == "uint8" else 2000 if op == "multi_otsu" else 40000
        image = (image * top).astype(dtype)
    else:
        image = image.astype(dtype)
        image[rng.random(image.shape) < 0.05] = np.nan
    values = image[~np.isnan(image)] if dtype == "float32" else image.ravel()
    if len(np.unique(values)) < 4:
        return
    step: dict[str, Any] = {"op": op}
    if op == "li":
        step["tolerance"] = 1e-4 if dtype == "float32" else None
    if op == "threshold_percentile":
        step["q"] = 37.5
    if op == "canny":
        image = np.nan_to_num(image.astype(np.float32), nan=0.0)
        step.update(sigma=1.0, low=0.3, high=0.8, use_quantiles=True)
    merges, seen = [], []
    merge = run.merge_partials

    def counted(partials: list[Any], **kwargs: Any) -> Any:
        merges.append(len(partials))
        return merge(partials, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "FAN_IN", fan_in)
        patch.setattr(run, "merge_partials", counted)
        pipeline = [step]
        if op == "canny":  # the candidates, then edge tracking = skimage.feature.canny
            pipeline.append({"op": "hysteresis", "low": 0.5, "high": 1.5, "connectivity": 2})
        result = segment(image, pipeline, block_shape=(7, 6), progress=lambda *a: seen.append(a))
    assert merges and max(merges) <= fan_in
    assert any(total == 7 * 7 for _, _, total in seen)  # 7 x 7 blocks reported
    finite = values.astype(np.float64) if dtype == "float32" else values
    reference = {
        "otsu": lambda: image > filters.threshold_otsu(finite.astype(image.dtype)),
        "li": lambda: (
            image > filters.threshold_li(finite.astype(image.dtype), tolerance=1e-4)
            if dtype == "float32"
            else image > filters.threshold_li(image)
        ),
        "yen": lambda: image > filters.threshold_yen(finite.astype(image.dtype)),
        "multi_otsu": lambda: np.where(
            np.isnan(image) if dtype == "float32" else False,
            0,
            np.digitize(image, filters.threshold_multiotsu(finite.astype(image.dtype))) + 1,
        ),
        "threshold_percentile": lambda: image > np.percentile(finite, 37.5),
        "canny": lambda: feature.canny(
            image, sigma=1.0, low_threshold=0.3, high_threshold=0.8, use_quantiles=True
        ),
    }[op]()
    np.testing.assert_array_equal(result, reference)

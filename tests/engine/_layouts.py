"""Hypothesis strategies and test images shared by the engine's equivalence tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from scipy import ndimage as ndi


@st.composite
def layouts(
    draw: st.DrawFn, ndim: int = 2, max_side: int = 40
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    blocks = tuple(draw(st.integers(1, n)) for n in shape)
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, blocks, seed


def smooth_noise(shape: tuple[int, ...], seed: int, sigma: float = 1.5) -> np.ndarray:
    """Random blobs: noise smoothed so thresholds make objects of several pixels."""
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), sigma).astype(np.float32)

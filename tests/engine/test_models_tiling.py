"""The global tile grid: nnU-Net's placement rule, the halo a block needs, the blend weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segflow.models.tiling import (
    MIN_WEIGHT,
    plan_tiles,
    tile_halo,
    tile_starts,
    tile_weights,
)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 300),
    tile=st.integers(1, 64),
    overlap=st.floats(0.0, 0.95),
)
def test_tile_starts_follow_the_nnunet_rule(size: int, tile: int, overlap: float) -> None:
    starts = tile_starts(size, tile, overlap)
    if size <= tile:
        # One tile, centred: the item sits in its middle (the extra pixel goes after).
        assert starts == (-((tile - size) // 2),)
        return
    max_step = max(1, math.floor(tile * (1 - overlap)))
    steps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == size - tile
    assert (steps >= 1).all() and (steps <= max_step).all()
    # As few tiles as the step allows: one fewer could not cover the axis.
    assert (len(starts) - 2) * max_step < size - tile
    # Evenly spread: steps differ by at most one pixel (rounding).
    assert steps.max() - steps.min() <= 1


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    tile=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    data=st.data(),
)
def test_window_lies_within_the_halo(
    shape: tuple[int, int], tile: tuple[int, int], overlap: float, data: st.DataObject
) -> None:
    grid = plan_tiles(shape, tile=tile, overlap=overlap)
    halo = grid.halo
    assert all(0 <= h <= max(t - 1, 0) for h, t in zip(halo, tile, strict=True))
    region = []
    for n in shape:
        start = data.draw(st.integers(0, n - 1))
        region.append(slice(start, data.draw(st.integers(start + 1, n))))
    window = grid.window(tuple(region))
    tiles = grid.overlapping(tuple(region))
    for r, w, h, n in zip(region, window, halo, shape, strict=True):
        assert max(r.start - h, 0) <= w.start <= r.start
        assert r.stop <= w.stop <= min(r.stop + h, n)
    # The tiles listed are exactly those of the whole grid that touch the region.
    expected = [
        s
        for s in grid.all_tiles()
        if all(a < r.stop and a + t > r.start for a, t, r in zip(s, tile, region, strict=True))
    ]
    assert tiles == expected


def test_halo_is_reached_by_some_one_pixel_block() -> None:
    grid = plan_tiles((50, 9), tile=(16, 16), overlap=0.5)
    needed = [0, 0]
    for y in range(50):
        for x in range(9):
            w = grid.window((slice(y, y + 1), slice(x, x + 1)))
            needed[0] = max(needed[0], y - w[0].start, w[0].stop - y - 1)
            needed[1] = max(needed[1], x - w[1].start, w[1].stop - x - 1)
    assert tuple(needed) == grid.halo == (15, 8)
    assert tile_halo((50, 9), tile=(16, 16), overlap=0.5) == (15, 8)


def test_gaussian_weights_have_sigma_an_eighth_of_the_tile() -> None:
    w = tile_weights((9,), window="gaussian")
    sigma = 9 / 8
    np.testing.assert_allclose(w[5] / w[4], np.exp(-0.5 / sigma**2), rtol=1e-6)
    assert w[4] == 1.0 and (w == w[::-1]).all()
    corner = tile_weights((64, 64, 64), window="gaussian")
    # Without the clamp the corner would be exp(-3 * 0.5 * (31.5 / 8) ** 2), about 8e-11.
    assert corner.min() == np.float32(MIN_WEIGHT)
    cosine = tile_weights((16, 16), window="cosine")
    assert cosine.min() > 0 and cosine.max() == 1.0
    assert not cosine.flags.writeable


def test_bad_grid_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"`overlap` \(1.0\) must be in \[0, 1\)"):
        plan_tiles((10, 10), tile=(4, 4), overlap=1.0)
    with pytest.raises(ValueError, match=r"`tile` \(4,\) has 1 axes, the item has 2"):
        plan_tiles((10, 10), tile=(4,), overlap=0.5)
    with pytest.raises(ValueError, match=r"`tile` \(0, 4\) and `shape` \(10, 10\) must be"):
        plan_tiles((10, 10), tile=(0, 4), overlap=0.5)
    grid = plan_tiles((10, 10), tile=(4, 4), overlap=0.5)
    with pytest.raises(ValueError, match=r"`region` .* must be non-empty boxes"):
        grid.window((slice(3, 3), slice(0, 4)))
    with pytest.raises(ValueError, match=r"`region` has 1 axes, the item has 2"):
        grid.overlapping((slice(0, 3),))
    with pytest.raises(
        ValueError, match=r"`window` \('hann'\) must be 'gaussian', 'cosine', 'constant'"
    ):
        tile_weights((4, 4), window="hann")  # type: ignore[arg-type]

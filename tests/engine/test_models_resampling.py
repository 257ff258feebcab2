"""Resampling to a model's spacing and back equals nnU-Net's own functions, and any part of
it computed on its own equals the same part of the whole."""

from __future__ import annotations

import numpy as np
import pytest
from _layouts import layouts
from hypothesis import given, settings
from hypothesis import strategies as st

from segflow.models.resampling import (
    PREFILTER_HALO,
    halo,
    new_shape,
    plan_resampling,
    positions,
    read_box,
    resample_region,
    separate_axis,
)


def _whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _resample(data: np.ndarray, shape: tuple[int, ...], orders: tuple[int, ...]) -> np.ndarray:
    return resample_region(data, _whole(data.shape[1:]), data.shape[1:], shape, _whole(shape),
                           orders)  # fmt: skip


# Spacings: anisotropic item (z resampled on its own, order 0), anisotropic model, neither.
CASES = [((3.0, 0.8, 0.8), (2.0, 1.0, 1.0)), ((1.0, 0.7, 0.9), (4.0, 1.0, 1.0)),
         ((1.6, 0.7, 1.3), (1.0, 1.1, 0.8))]  # fmt: skip


@pytest.mark.parametrize(("spacing", "target"), CASES)
def test_equals_nnunets_resampling_both_ways(
    spacing: tuple[float, ...], target: tuple[float, ...]
) -> None:
    nnunet = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 1.0, (2, 9, 14, 11))
    grid = plan_resampling(image.shape[1:], spacing, target)
    assert grid is not None
    assert grid.model == tuple(nnunet.compute_new_shape(image.shape[1:], spacing, target))
    theirs = nnunet.resample_data_or_seg_to_shape(image, grid.model, spacing, target, False, 3, 0,
                                                  None)  # fmt: skip
    ours = _resample(image, grid.model, grid.forward)
    # skimage clips its output to its input's range: each channel's, or with z resampled on
    # its own (order 0), each slice's (segflow clips to a CT window only; see the module)
    if grid.forward == (3, 3, 3):
        low, high = image.min(axis=(1, 2, 3)), image.max(axis=(1, 2, 3))
        ours = np.clip(ours, low[:, None, None, None], high[:, None, None, None])
    else:
        assert grid.forward == (0, 3, 3)
        z = np.clip(np.floor(positions(0, grid.model[0], image.shape[1], grid.model[0]) + 0.5),
                    0, image.shape[1] - 1).astype(int)  # fmt: skip
        low, high = image.min(axis=(2, 3))[:, z], image.max(axis=(2, 3))[:, z]
        ours = np.clip(ours, low[..., None, None], high[..., None, None])
    # Both are float64 B-splines of the same coefficients; the sums run in another order.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    logits = rng.normal(0.0, 3.0, (3, *grid.model))
    theirs = nnunet.resample_data_or_seg_to_shape(logits, image.shape[1:], target, spacing,
                                                  False, 1, 0, None)  # fmt: skip
    np.testing.assert_allclose(_resample(logits, image.shape[1:], grid.back), theirs, rtol=0,
                               atol=1e-12)  # fmt: skip


def test_the_grid_and_the_separate_axis_are_nnunets() -> None:
    nnunet = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    for current, new in [*CASES, ((0.24, 1.25, 1.25), (1.0, 1.0, 1.0)),
                         ((5.0, 5.0, 1.0), (1.0, 1.0, 1.0))]:  # fmt: skip
        for force in (None, True, False):
            do, axis = nnunet.determine_do_sep_z_and_axis(force, current, new)
            assert separate_axis(current, new, force) == (axis if do else None)
    assert new_shape((9, 14, 11), (3.0, 0.8, 0.8), (2.0, 1.0, 1.0)) == (14, 11, 9)
    assert plan_resampling((10, 10), (1.0, 1.04), (1.0, 1.0)) is None  # same shape: as is


@given(
    layout=layouts(2, max_side=90),
    scale=st.sampled_from([(0.37, 1.0), (2.6, 1.7), (1.0, 0.5)]),
    orders=st.sampled_from([(3, 3), (1, 1), (0, 3), (3, 0)]),
)
@settings(max_examples=25, deadline=None)
def test_a_part_equals_the_same_part_of_the_whole(
    layout: tuple[tuple[int, ...], tuple[int, ...], int],
    scale: tuple[float, float],
    orders: tuple[int, int],
) -> None:
    shape, blocks, seed = layout
    image = np.random.default_rng(seed).normal(0.0, 100.0, (1, *shape))
    target = new_shape(shape, scale, (1.0, 1.0))
    whole = _resample(image, target, orders)
    for y in range(0, target[0], max(1, blocks[0] * target[0] // shape[0])):
        for x in range(0, target[1], max(1, blocks[1] * target[1] // shape[1])):
            region = (
                slice(y, min(target[0], y + blocks[0])),
                slice(x, min(target[1], x + blocks[1])),
            )
            box = read_box(region, shape, target, orders)
            part = resample_region(image[(slice(None), *box)], box, shape, target, region, orders)
            # The spline coefficients of a part leave out pixels more than PREFILTER_HALO
            # away, which weigh |sqrt(3) - 2| ** 24 < 2e-14 of them: 1e-9 of a range of ~800.
            np.testing.assert_allclose(part, whole[(slice(None), *region)], rtol=0, atol=1e-9)


def test_a_part_whose_data_lacks_pixels_is_refused() -> None:
    image = np.zeros((1, 100))
    box = read_box((slice(40, 50),), (100,), (50,), (3,))
    assert box[0] == slice(80 - 1 - PREFILTER_HALO, 100)  # pixel 40 lies at 80.5
    with pytest.raises(ValueError, match=r"resampling axis 0: pixels 40..50 of 50 read 55..100 "
                       r"of 100, the data holds 60..100"):  # fmt: skip
        resample_region(image[:, 60:], (slice(60, 100),), (100,), (50,), (slice(40, 50),), (3,))


@pytest.mark.parametrize("tile", [1, 2, 8, 17])
@pytest.mark.parametrize(("spacing", "target"), [(0.7, 1.9), (2.5, 1.0), (1.0, 1.02)])
def test_the_halo_covers_what_a_core_reads(tile: int, spacing: float, target: float) -> None:
    """The item pixels a core's output reads through the tiles, for every core of many
    sizes, lie within the halo :func:`halo` gives (what the model step relies on)."""
    from segflow.models.tiling import plan_tiles

    (h,) = halo((tile,), (spacing,), (target,))
    for n in range(1, 400, 7):
        grid = plan_resampling((n,), (spacing,), (target,))
        if grid is None:  # one pixel either way
            continue
        tiles = plan_tiles(grid.model, tile=(tile,), overlap=0.5)
        for start in range(n):
            back = read_box((slice(start, start + 1),), grid.model, grid.item, grid.back)
            window = tiles.window(back)
            (source,) = read_box(window, grid.item, grid.model, grid.forward)
            assert source.start >= start - h and source.stop <= start + 1 + h, (n, start)

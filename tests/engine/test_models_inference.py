"""Tiled inference: any region of an item equals the whole item's sliding window."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segflow.errors import ModelError
from segflow.models.inference import predict_image, predict_region
from segflow.models.networks import NetworkSpec, build_network
from segflow.models.tiling import TileGrid, plan_tiles, tile_weights

torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more


def _plus_one(channels: int, spatial_dims: int) -> torch.nn.Module:
    """``x -> x + 1`` per channel as a fixed 1x1 convolution."""
    conv = (torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d)(channels, channels, 1)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[(c, c) + (0,) * spatial_dims] = 1.0
        conv.bias.fill_(1.0)
    return conv.eval()


def _predict_blocks(
    model: torch.nn.Module,
    image: np.ndarray,
    block: tuple[int, ...],
    grid: TileGrid,
    **options: object,
) -> np.ndarray:
    """The item assembled block by block, each block reading only its own window."""
    reads: list[tuple[slice, ...]] = []

    def read(box: tuple[slice, ...]) -> np.ndarray:
        reads.append(box)
        return image[(slice(None), *box)].copy()

    out: np.ndarray | None = None
    ranges = [range(0, n, b) for n, b in zip(grid.shape, block, strict=True)]
    for corner in itertools.product(*ranges):
        core = tuple(
            slice(c, min(c + b, n)) for c, b, n in zip(corner, block, grid.shape, strict=True)
        )
        part = predict_region(model, read, core, grid=grid, **options)  # type: ignore[arg-type]
        if out is None:
            out = np.empty((part.shape[0], *grid.shape), dtype=part.dtype)
        out[(slice(None), *core)] = part
        # Each block reads its window once, within its core grown by the grid's halo.
        window = reads[-1]
        for w, c, h in zip(window, core, grid.halo, strict=True):
            assert c.start - h <= w.start and w.stop <= c.stop + h
    assert out is not None
    return out


@st.composite
def _cases(draw: st.DrawFn, spatial_dims: int, max_side: int) -> dict[str, object]:
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(spatial_dims))
    return {
        "shape": shape,
        # Tiles from 1 pixel to larger than the item (padded and cropped back).
        "tile": tuple(draw(st.integers(1, max_side + 4)) for _ in range(spatial_dims)),
        "block": tuple(draw(st.integers(1, n)) for n in shape),
        "overlap": draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.9])),
        "window": draw(st.sampled_from(["gaussian", "cosine"])),
        "pad_mode": draw(st.sampled_from(["constant", "reflect", "edge"])),
        "channels": draw(st.integers(1, 3)),
        "batch_size": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@pytest.mark.parametrize(("spatial_dims", "max_side"), [(2, 40), (3, 14)])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pointwise_model_comes_back_exact(
    spatial_dims: int, max_side: int, data: st.DataObject
) -> None:
    case = data.draw(_cases(spatial_dims, max_side))
    shape = case["shape"]
    channels = case["channels"]
    assert isinstance(shape, tuple) and isinstance(channels, int)
    rng = np.random.default_rng(case["seed"])  # type: ignore[arg-type]
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    grid = plan_tiles(shape, tile=case["tile"], overlap=case["overlap"])  # type: ignore[arg-type]
    options = {k: case[k] for k in ("window", "pad_mode", "batch_size")}
    model = _plus_one(channels, spatial_dims)
    blocks = _predict_blocks(model, image, case["block"], grid, **options)  # type: ignore[arg-type]
    # Exact, not close: float64 sums of float32 products round back to the float32 value.
    np.testing.assert_array_equal(blocks, image + np.float32(1))
    whole = predict_image(model, image, tile=case["tile"], overlap=case["overlap"], **options)  # type: ignore[arg-type]
    np.testing.assert_array_equal(whole, image + np.float32(1))


def _reference_sliding_window(
    model: torch.nn.Module, image: np.ndarray, grid: TileGrid
) -> np.ndarray:
    """Whole-item sliding window written out plainly: every tile, one at a time."""
    pads = [(0, 0)] + [
        (max(-s[0], 0), max(s[-1] + t - n, 0))
        for s, t, n in zip(grid.starts, grid.tile, grid.shape, strict=True)
    ]
    padded = np.pad(image, pads)
    offset = [p[0] for p in pads[1:]]
    weights = tile_weights(grid.tile).astype(np.float64)
    num: np.ndarray | None = None
    den = np.zeros(padded.shape[1:])
    for start in grid.all_tiles():
        box = tuple(
            slice(s + o, s + o + t) for s, o, t in zip(start, offset, grid.tile, strict=True)
        )
        with torch.inference_mode():
            out = model(torch.from_numpy(padded[(slice(None), *box)][None].copy()))[0].numpy()
        if num is None:
            num = np.zeros((out.shape[0], *padded.shape[1:]))
        num[(slice(None), *box)] += out * weights
        den[box] += weights
    assert num is not None
    crop = tuple(slice(o, o + n) for o, n in zip(offset, grid.shape, strict=True))
    return (num[(slice(None), *crop)] / den[crop]).astype(np.float32)


@st.composite
def _unet_layouts(draw: st.DrawFn, spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    side = (12, 40) if spatial_dims == 2 else (6, 24)
    shape = tuple(draw(st.integers(*side)) for _ in range(spatial_dims))
    # At most 4 blocks per axis (the pointwise test covers 1-pixel blocks): each block runs
    # every tile it overlaps, and the network costs far more than the x + 1 model.
    block = tuple(draw(st.integers(-(-n // 4), n)) for n in shape)
    return shape, block


# Measured over 16 drawn layouts (torch 2.13 CPU, one thread): blockwise equals predict_image
# (same batch size) bit for bit, and differs from the batch-1 reference by at most 3.0e-6 in
# 2-D and 3.6e-6 in 3-D, on outputs up to about 5. Tile outputs differ in their last bits when a
# tile is run in a batch of 3 rather than alone (oneDNN picks other kernels); blending adds
# nothing (same tiles, same order). A later draw (CI, 2026-12-07: a 34 x 27 image in 9 x 7
# blocks, 32 x 16 tiles) differed by 2.7e-5 with one thread or two: BasicUNet's instance
# normalisation at its deepest level sees 2 x 1 positions of a 32 x 16 tile, whose variance
# magnifies those last bits. 1e-4 absolute is still far below anything an argmax could notice
# (and the argmax check below skips near-ties).
UNET_ATOL = 1e-4


@pytest.mark.parametrize(("spatial_dims", "tile"), [(2, (32, 16)), (3, (16, 16, 32))])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_unet_by_regions_equals_the_whole_sliding_window(
    spatial_dims: int, tile: tuple[int, ...], data: st.DataObject
) -> None:
    shape, block = data.draw(_unet_layouts(spatial_dims))
    torch.manual_seed(0)
    spec = NetworkSpec("basic_unet", spatial_dims, 2, 3, {"features": [4, 4, 8, 8, 16, 4]})
    model = build_network(spec).eval()
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    grid = plan_tiles(shape, tile=tile, overlap=0.5)
    blocks = _predict_blocks(model, image, block, grid, batch_size=3)
    reference = _reference_sliding_window(model, image, grid)
    np.testing.assert_allclose(blocks, reference, rtol=0, atol=UNET_ATOL)
    # The batch-1 reference rounds differently (other kernels): where its top two classes
    # are within the tolerance of each other the argmax may flip, legitimately.
    top2 = np.sort(reference, axis=0)[-2:]
    decided = top2[1] - top2[0] > 2 * UNET_ATOL
    np.testing.assert_array_equal(blocks.argmax(0)[decided], reference.argmax(0)[decided])
    whole = predict_image(model, image, tile=tile, overlap=0.5, batch_size=3)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=UNET_ATOL)
    # A tile's output can move by float32 rounding with its batch neighbours: compare the
    # class maps where the whole item's top two classes are further apart than that.
    top2 = np.sort(whole, axis=0)[-2:]
    decided = top2[1] - top2[0] > 2 * UNET_ATOL
    np.testing.assert_array_equal(blocks.argmax(0)[decided], whole.argmax(0)[decided])


@pytest.mark.parametrize("name", ["deeplab", "segnet", "unet"])
def test_other_networks_by_regions_equal_the_whole(name: str) -> None:
    torch.manual_seed(0)
    params = {
        "deeplab": {"features": [4, 8, 8], "aspp_channels": 4},
        "segnet": {"features": [4, 8]},
        "unet": {"channels": [4, 8, 8], "strides": [2, 2], "num_res_units": 1},
    }[name]
    model = build_network(NetworkSpec(name, 2, 1, 2, params)).eval()
    image = np.random.default_rng(2).normal(size=(1, 37, 29)).astype(np.float32)
    grid = plan_tiles((37, 29), tile=(16, 16), overlap=0.5)
    blocks = _predict_blocks(model, image, (10, 13), grid, batch_size=2)
    whole = predict_image(model, image, tile=(16, 16), overlap=0.5, batch_size=2)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=UNET_ATOL)  # see UNET_ATOL


def test_tta_averages_the_flipped_outputs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1).eval()  # not flip-equivariant
    image = np.random.default_rng(3).normal(size=(1, 8, 8)).astype(np.float32)
    out = predict_image(model, image, tile=(8, 8), overlap=0.5, tta=True, activation="softmax")
    x = torch.from_numpy(image[None])
    expected = torch.zeros(1, 2, 8, 8)
    with torch.no_grad():
        for axes in [(), (2,), (3,), (2, 3)]:
            y = torch.softmax(model(torch.flip(x, axes) if axes else x), 1)
            expected += torch.flip(y, axes) if axes else y
    # One tile: blending divides w * p by w, a relative rounding of a few float32 units.
    np.testing.assert_allclose(out, expected[0].numpy() / 4, rtol=1e-6, atol=1e-7)
    plain = predict_image(model, image, tile=(8, 8), overlap=0.5, activation="softmax")
    assert np.abs(out - plain).max() > 1e-3  # the augmentation did change something


def test_inference_errors_name_the_problem() -> None:
    image = np.zeros((1, 8, 8), np.float32)
    grid = plan_tiles((8, 8), tile=(8, 8), overlap=0.5)
    region = (slice(0, 8), slice(0, 8))
    training = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ModelError, match=r"`model` is in training mode: call model.eval\(\)"):
        predict_region(training, lambda box: image, region, grid=grid)
    shrinking = torch.nn.Conv2d(1, 1, 3).eval()
    with pytest.raises(ModelError, match=r"output has shape \(1, 6, 6\) per tile, expected"):
        predict_region(shrinking, lambda box: image, region, grid=grid)
    with pytest.raises(ValueError, match=r"`read` returned shape \(8, 8\) for window"):
        predict_region(training.eval(), lambda box: image[0], region, grid=grid)
    with pytest.raises(ValueError, match=r"`batch_size` \(0\) must be at least 1"):
        predict_region(training.eval(), lambda box: image, region, grid=grid, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match=r"`device` 'cuda' was asked but no CUDA GPU"):
            predict_region(training.eval(), lambda box: image, region, grid=grid, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_agrees_with_cpu_float32() -> None:
    torch.manual_seed(0)
    model = build_network(NetworkSpec("basic_unet", 2, 1, 3)).eval()
    image = np.random.default_rng(4).normal(size=(1, 150, 130)).astype(np.float32)
    cpu = predict_image(model, image, tile=(64, 64), overlap=0.5, activation="softmax")
    gpu = predict_image(
        model.cuda(), image, tile=(64, 64), overlap=0.5, activation="softmax", device="cuda"
    )
    # bf16 keeps 8 bits of mantissa: probabilities agree to about 1e-2.
    np.testing.assert_allclose(gpu, cpu, atol=3e-2)
    grid = plan_tiles((150, 130), tile=(64, 64), overlap=0.5)
    blocks = _predict_blocks(model, image, (50, 70), grid, activation="softmax", device="cuda")
    np.testing.assert_allclose(blocks, gpu, atol=1e-5)

"""Tiled inference of any region of an item: the tiles of the global grid, blended.

:func:`predict_region` computes the model output for one region (a block core) of an item: it
runs exactly the tiles of the item's global grid (:func:`~segflow.models.tiling.plan_tiles`)
that overlap the region, reads the input they need once, batches them with a fixed batch size
under :func:`torch.inference_mode` and blends them as ``sum(w * p) / sum(w)``. The terms of
each pixel's sums are the same tiles in the same order whatever the region, so a block's output
equals the whole item's sliding-window output (:func:`predict_image`) and no seam appears at
block or tile borders.

The sums are accumulated in float64 (tile outputs stay float32): a product of two float32
numbers is exact in float64 and the few rounding errors of the sums are far below float32's
resolution, so a pointwise model comes back exact through tiling and blending (float32 sums
would be off by one unit in the last place on some pixels). The cost is 8 bytes per output
value of the block, the accumulator only.

Axes are ``c, (z), y, x``: channels first, then the spatial axes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from segflow.errors import ModelError
from segflow.models.tiling import BlendWindow, Box, TileGrid, plan_tiles, tile_weights

Device = Literal["cpu", "cuda", "auto"]
Activation = Literal["none", "softmax", "sigmoid"]
PadMode = Literal["constant", "reflect", "edge"]
Reader = Callable[[Box], np.ndarray]


def resolve_device(device: Device) -> torch.device:
    """The torch device for ``cpu``, ``cuda`` or ``auto`` (CUDA when available).

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "`device` 'cuda' was asked but no CUDA GPU is visible: use 'cpu' or 'auto'"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"`device` ({device!r}) must be 'cpu', 'cuda' or 'auto'")
    return torch.device(device)


def _activate(out: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(out, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(out)
    return out


def _forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    *,
    activation: Activation,
    tta: bool,
    flows: bool = False,
) -> torch.Tensor:
    """The model's (activated) output for a batch; with ``tta``, the mean over every
    combination of flipped spatial axes (4 passes in 2-D, 8 in 3-D). With ``flows``, the
    output leads with one flow component per spatial axis: a flip also negates the
    component along the flipped axis."""
    if not tta:
        return _activate(model(batch), activation).float()
    spatial = range(2, batch.ndim)
    flips = [axes for k in range(len(spatial) + 1) for axes in itertools.combinations(spatial, k)]
    total: torch.Tensor | None = None
    for axes in flips:
        x = torch.flip(batch, axes) if axes else batch
        y = _activate(model(x), activation).float()
        y = torch.flip(y, axes) if axes else y
        if flows and axes:
            sign = torch.ones(y.shape[1], dtype=y.dtype, device=y.device)
            sign[[axis - 2 for axis in axes]] = -1.0
            y = y * sign.view(1, -1, *(1,) * (y.ndim - 2))
        total = y if total is None else total + y
    assert total is not None
    return total / len(flips)


def _read_tile(
    data: np.ndarray, window: Box, start: Sequence[int], grid: TileGrid, pad_mode: PadMode
) -> np.ndarray:
    """One tile's input cut from ``data`` (the item's ``window``), padded where the tile
    reaches outside the item (only an axis shorter than the tile does)."""
    inner = []
    pads = [(0, 0)]
    for s, t, n, w in zip(start, grid.tile, grid.shape, window, strict=True):
        lo, hi = max(s, 0), min(s + t, n)
        inner.append(slice(lo - w.start, hi - w.start))
        pads.append((lo - s, s + t - hi))
    tile = data[(slice(None), *inner)]
    if any(p != (0, 0) for p in pads):
        tile = np.pad(tile, pads, mode=pad_mode)
    return tile


def _check_model(model: Callable[[torch.Tensor], torch.Tensor]) -> None:
    if (
        isinstance(model, torch.nn.Module)
        and model.training
        and not isinstance(model, torch.fx.GraphModule)
    ):
        raise ModelError(
            "`model` is in training mode: call model.eval() first (batch norm and dropout "
            "would make a tile's output depend on the other tiles of its batch)"
        )


def predict_region(
    model: Callable[[torch.Tensor], torch.Tensor],
    read: Reader,
    region: Box,
    *,
    grid: TileGrid,
    window: BlendWindow = "gaussian",
    batch_size: int = 4,
    activation: Activation = "none",
    tta: bool = False,
    pad_mode: PadMode = "constant",
    device: Device = "cpu",
    flows: bool = False,
) -> np.ndarray:
    """Blended model output over ``region`` of an item, from the item's global tile grid.

    Parameters
    ----------
    model : callable
        Maps a float32 tensor ``(batch, c_in, *tile)`` to ``(batch, c_out, *tile)``; a
        :class:`torch.nn.Module` must be in eval mode and on ``device``.
    read : callable
        ``read(box)`` returns the item's normalised input over ``box`` (spatial slices inside
        the item) as an array ``(c_in, *box shape)``. Called once, with ``grid.window(region)``.
    region : tuple of slice
        The spatial box of the item to predict (a block core).
    grid : TileGrid
        The item's tile grid, from :func:`~segflow.models.tiling.plan_tiles`.
    window : {'gaussian', 'cosine'}
        Blending weights (:func:`~segflow.models.tiling.tile_weights`).
    batch_size : int
        Tiles per forward pass; the last batch is filled up with copies of its last tile so
        that every pass has the same shape.
    activation : {'none', 'softmax', 'sigmoid'}
        Applied to each tile's output (softmax over channels) before averaging and blending.
    tta : bool
        Test-time augmentation: average each tile's outputs over all flips of its axes.
    flows : bool
        The output leads with a flow (vector) component per spatial axis (a flow head):
        ``tta`` negates a component when it flips its axis.
    pad_mode : {'constant', 'reflect', 'edge'}
        How an axis shorter than the tile is padded (``numpy.pad`` modes; constant is 0).
    device : {'cpu', 'cuda', 'auto'}
        Where the model runs. CPU runs float32; CUDA runs under bf16 autocast.

    Returns
    -------
    numpy.ndarray
        float32, ``(c_out, *region shape)``.

    Examples
    --------
    >>> net = torch.nn.Conv2d(1, 1, 1).eval()
    >>> _ = torch.nn.init.ones_(net.weight), torch.nn.init.ones_(net.bias)
    >>> image = np.arange(30, dtype=np.float32).reshape(1, 5, 6)
    >>> grid = plan_tiles((5, 6), tile=(4, 4), overlap=0.5)
    >>> out = predict_region(
    ...     net, lambda box: image[(slice(None), *box)], (slice(1, 3), slice(2, 6)), grid=grid
    ... )
    >>> out
    array([[[ 9., 10., 11., 12.],
            [15., 16., 17., 18.]]], dtype=float32)
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` ({batch_size}) must be at least 1")
    _check_model(model)
    torch_device = resolve_device(device)
    weights = tile_weights(grid.tile, window=window).astype(np.float64)
    starts = grid.overlapping(region)
    region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, grid.shape, strict=True))
    box = grid.window(region)
    data = np.asarray(read(box))
    expected = tuple(b.stop - b.start for b in box)
    if data.ndim != grid.ndim + 1 or data.shape[1:] != expected:
        raise ValueError(
            f"`read` returned shape {data.shape} for window {box}: expected (channels, *{expected})"
        )
    data = data.astype(np.float32, copy=False)
    region_shape = tuple(r.stop - r.start for r in region)
    numerator: np.ndarray | None = None
    denominator = np.zeros(region_shape, dtype=np.float64)
    cuda = torch_device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def accumulate(chunk: Sequence[tuple[int, ...]], out: torch.Tensor) -> None:
        nonlocal numerator
        outputs = out.float().cpu().numpy()  # waits for this batch's forward pass
        if outputs.ndim != grid.ndim + 2 or outputs.shape[2:] != grid.tile:
            raise ModelError(
                f"the model's output has shape {outputs.shape[1:]} per tile, expected "
                f"(channels, *{grid.tile}): a model for tiled inference keeps the tile's "
                "spatial shape"
            )
        if numerator is None:
            numerator = np.zeros((outputs.shape[1], *region_shape), dtype=np.float64)
        for start, output in zip(chunk, outputs, strict=False):
            in_tile = []
            in_region = []
            for s, t, r in zip(start, grid.tile, region, strict=True):
                lo, hi = max(s, r.start), min(s + t, r.stop)
                in_tile.append(slice(lo - s, hi - s))
                in_region.append(slice(lo - r.start, hi - r.start))
            w = weights[tuple(in_tile)]
            numerator[(slice(None), *in_region)] += output[(slice(None), *in_tile)] * w
            denominator[tuple(in_region)] += w

    # On CUDA the forward pass runs asynchronously: batch k+1 is cut, pinned and launched
    # before batch k's output is fetched and blended, so the GPU is busy while the CPU
    # prepares. On CPU this is the plain loop (same order of sums, same result).
    pending: tuple[Sequence[tuple[int, ...]], torch.Tensor] | None = None
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        tiles = [_read_tile(data, box, s, grid, pad_mode) for s in chunk]
        tiles += [tiles[-1]] * (batch_size - len(tiles))
        batch = torch.from_numpy(np.stack(tiles))
        batch = batch.pin_memory().to(torch_device, non_blocking=True) if cuda else batch
        with torch.inference_mode(), autocast:
            out = _forward(model, batch, activation=activation, tta=tta, flows=flows)
        if pending is not None:
            accumulate(*pending)
        pending = (chunk, out)
    if pending is not None:
        accumulate(*pending)
    assert numerator is not None
    return (numerator / denominator).astype(np.float32)


def predict_image(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    *,
    tile: Sequence[int],
    overlap: float,
    window: BlendWindow = "gaussian",
    batch_size: int = 4,
    activation: Activation = "none",
    tta: bool = False,
    pad_mode: PadMode = "constant",
    device: Device = "cpu",
    flows: bool = False,
) -> np.ndarray:
    """Sliding-window output of a whole in-memory ``image`` ``(c, (z), y, x)``.

    The same computation as :func:`predict_region` over the whole item; see there for the
    parameters. Returns float32 ``(c_out, (z), y, x)``.

    Examples
    --------
    >>> net = torch.nn.Conv3d(2, 3, 1).eval()
    >>> predict_image(net, np.zeros((2, 5, 9, 9), np.float32), tile=(4, 8, 8), overlap=0.25).shape
    (3, 5, 9, 9)
    """
    image = np.asarray(image)
    grid = plan_tiles(image.shape[1:], tile=tile, overlap=overlap)
    return predict_region(
        model,
        lambda box: image[(slice(None), *box)],
        tuple(slice(0, n) for n in grid.shape),
        grid=grid,
        window=window,
        batch_size=batch_size,
        activation=activation,
        tta=tta,
        pad_mode=pad_mode,
        device=device,
        flows=flows,
    )

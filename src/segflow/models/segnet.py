"""A small SegNet: an encoder-decoder whose decoder upsamples with the encoder's max-pool indices.

Badrinarayanan, Kendall and Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder Architecture
for Image Segmentation", IEEE TPAMI 39(12), 2017. No library of this stack ships it, so it is
written here, in 2-D and 3-D: each encoder stage is ``convs`` 3x3 convolutions (+ norm + ReLU)
then a 2x max-pool that remembers where each maximum came from; each decoder stage puts its
values back at those positions (max-unpool, zeros elsewhere) and convolves. There are no skip
connections of features, only of indices, which keeps it light.

Input sides must be multiples of ``2 ** len(features)`` (one halving per stage). Receptive
field: each stage adds ``convs * 2`` pixels at its resolution on the encoder side and again on
the decoder side; with the defaults (3 stages, 2 convolutions) it spans 64 pixels per axis
(:func:`segnet_receptive_field`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "instance"]


def _conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, convs: int, norm: Norm
) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norms: dict[str, type[nn.Module]] = (
        {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}
        if spatial_dims == 2
        else {"batch": nn.BatchNorm3d, "instance": nn.InstanceNorm3d}
    )
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(conv(in_channels if i == 0 else out_channels, out_channels, 3, padding=1))
        layers.append(norms[norm](out_channels, affine=True))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """SegNet-style encoder-decoder in 2-D or 3-D (see the module docstring).

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels, out_channels : int
    features : sequence of int
        Channels of each encoder stage; the decoder mirrors them.
    convs : int
        Convolutions per stage.
    norm : {'batch', 'instance'}

    Examples
    --------
    >>> net = SegNet(2, 1, 3, features=(4, 8)).eval()
    >>> net(torch.zeros(1, 1, 8, 12)).shape
    torch.Size([1, 3, 8, 12])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        features: Sequence[int] = (16, 32, 64),
        convs: int = 2,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        unpool = nn.MaxUnpool2d if spatial_dims == 2 else nn.MaxUnpool3d
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        features = tuple(features)
        self.encoders = nn.ModuleList(
            _conv_block(spatial_dims, c_in, c_out, convs, norm)
            for c_in, c_out in zip((in_channels, *features[:-1]), features, strict=True)
        )
        # Decoder stage i undoes encoder stage i: unpool to its resolution, then convolve down
        # to the channels of the stage above (the first stage keeps its own).
        self.decoders = nn.ModuleList(
            _conv_block(spatial_dims, c_in, c_out, convs, norm)
            for c_in, c_out in zip(features, (features[0], *features[:-1]), strict=True)
        )
        self.pool = pool(2, stride=2, return_indices=True)
        self.unpool = unpool(2, stride=2)
        self.head = conv(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = []
        sizes = []
        for encoder in self.encoders:
            x = encoder(x)
            sizes.append(x.shape)
            x, index = self.pool(x)
            indices.append(index)
        for decoder, index, size in zip(
            reversed(self.decoders), reversed(indices), reversed(sizes), strict=True
        ):
            x = decoder(self.unpool(x, index, output_size=size))
        return self.head(x)


def segnet_receptive_field(n_stages: int, convs: int) -> int:
    """Receptive field (pixels per axis) of a :class:`SegNet`'s output pixel.

    Summed along the path from input to output as ``1 + sum((kernel - 1) * jump)``: at level
    ``k`` (resolution ``2**k`` times coarser) each 3x3 convolution of the encoder and of the
    decoder adds ``2 * 2**k`` and the 2x max-pool adds ``2**k``; unpooling puts each value back
    in one place and adds nothing.

    Examples
    --------
    >>> segnet_receptive_field(3, 2)
    64
    """
    return 1 + sum(2**k * (4 * convs + 1) for k in range(n_stages))

"""A light DeepLab-style network: atrous (dilated) convolutions, an ASPP head and a small decoder.

After Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation" (DeepLabv3+, ECCV 2018), scaled down for tiles of microscopy and volumes and
written for 2-D and 3-D:

* encoder: a full-resolution convolution block (the decoder's low-level features), two
  stride-2 blocks (output stride 4) and ``len(atrous)`` dilated 3x3 blocks that widen the
  context without losing resolution;
* head: atrous spatial pyramid pooling, MONAI's :class:`monai.networks.blocks.SimpleASPP`
  (parallel convolutions with dilations ``aspp_dilations``, fused by a 1x1 convolution);
* decoder: upsample by 4 (bi/trilinear), concatenate the low-level features, one convolution
  block and a 1x1 classifier.

Input sides must be multiples of 4 (two halvings, undone by the upsampling). MONAI is needed
(``pip install 'segflow[ml]'``); it is imported when a network is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Norm = Literal["batch", "instance"]


def _block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: Norm,
    *,
    stride: int = 1,
    dilation: int = 1,
) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm_layer = {
        ("batch", 2): nn.BatchNorm2d,
        ("instance", 2): nn.InstanceNorm2d,
        ("batch", 3): nn.BatchNorm3d,
        ("instance", 3): nn.InstanceNorm3d,
    }[(norm, spatial_dims)]
    return nn.Sequential(
        conv(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation),
        norm_layer(out_channels, affine=True),
        nn.ReLU(inplace=True),
    )


class DeepLab(nn.Module):
    """DeepLab-style network with an ASPP head (see the module docstring).

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels, out_channels : int
    features : sequence of 3 int
        Channels at full resolution, at 1/2 and at 1/4.
    atrous : sequence of int
        Dilations of the encoder's atrous blocks at 1/4 resolution.
    aspp_channels : int
        Channels of each ASPP branch (four branches).
    aspp_dilations : sequence of 4 int
        Dilations of the ASPP branches (kernel sizes 1, 3, 3, 3).
    norm : {'batch', 'instance'}

    Examples
    --------
    >>> net = DeepLab(2, 1, 2, features=(4, 8, 8), aspp_channels=4).eval()
    >>> net(torch.zeros(1, 1, 16, 12)).shape
    torch.Size([1, 2, 16, 12])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        features: Sequence[int] = (16, 32, 64),
        atrous: Sequence[int] = (2, 4),
        aspp_channels: int = 16,
        aspp_dilations: Sequence[int] = (1, 2, 4, 6),
        norm: Norm = "batch",
    ) -> None:
        from monai.networks.blocks import SimpleASPP

        super().__init__()
        f0, f1, f2 = features
        self.low = _block(spatial_dims, in_channels, f0, norm)
        self.down = nn.Sequential(
            _block(spatial_dims, f0, f1, norm, stride=2),
            _block(spatial_dims, f1, f2, norm, stride=2),
            *(_block(spatial_dims, f2, f2, norm, dilation=d) for d in atrous),
        )
        self.aspp = SimpleASPP(
            spatial_dims,
            f2,
            aspp_channels,
            kernel_sizes=(1, 3, 3, 3),
            dilations=tuple(aspp_dilations),
            norm_type=norm.upper(),
        )
        self.fuse = _block(spatial_dims, 4 * aspp_channels + f0, f0, norm)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv(f0, out_channels, 1)
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        context = self.aspp(self.down(low))
        context = F.interpolate(context, size=low.shape[2:], mode=self.mode, align_corners=False)
        return self.head(self.fuse(torch.cat([context, low], dim=1)))

"""Network architectures built from their card spec: shapes, sizes, tile checks, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from segflow.errors import ModelError
from segflow.models.networks import NetworkSpec, build_network, check_tile, network_divisor
from segflow.models.segnet import segnet_receptive_field

torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more

SMALL = {
    "basic_unet": {"features": [4, 4, 8, 8, 16, 4]},
    "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "deeplab": {"features": [4, 8, 8], "aspp_channels": 4},
    "segnet": {"features": [4, 8, 8]},
}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_network_maps_channels_in_to_channels_out(name: str, spatial_dims: int) -> None:
    spec = NetworkSpec(name, spatial_dims, 3, 4, SMALL[name])
    divisor = network_divisor(spec)
    tile = check_tile(spec, (2 * divisor,) * spatial_dims)
    net = build_network(spec).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *tile))
    assert out.shape == (2, 4, *tile)
    assert torch.isfinite(out).all()


def test_basic_unet_default_size() -> None:
    net = build_network(NetworkSpec("basic_unet", 2, 1, 2))
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(1.95e6, rel=0.01)


def test_segnet_decoder_reuses_the_pool_indices() -> None:
    torch.manual_seed(0)
    net = build_network(NetworkSpec("segnet", 2, 1, 1, {"features": [2]})).eval()
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 3] = 5.0  # one bright pixel: the maximum of its 2x2 pool window
    encoder = net.encoders[0]
    with torch.no_grad():
        pooled, index = net.pool(encoder(image))
        unpooled = net.unpool(pooled, index, output_size=(1, 2, 8, 8))
    # Unpooling puts each maximum back where it came from and zeros the rest of its window.
    window = unpooled[0, :, 2:4, 2:4]
    assert ((window != 0).sum(dim=(1, 2)) <= 1).all()


def test_segnet_receptive_field_bounds_the_gradient() -> None:
    torch.manual_seed(0)
    net = build_network(NetworkSpec("segnet", 2, 1, 1, {"features": [4, 4, 4]})).eval()
    image = torch.randn(1, 1, 128, 128, requires_grad=True)
    # A 2x2 output window (one output pixel alone may sit on an unpooled zero): what it sees
    # spans at most the receptive field plus one.
    net(image)[0, 0, 64:66, 64:66].sum().backward()
    assert image.grad is not None
    rows = np.flatnonzero(image.grad[0, 0].abs().sum(1).numpy())
    extent = rows.max() - rows.min() + 1
    assert 32 < extent <= segnet_receptive_field(3, 2) + 1 == 65


def test_spec_round_trips_through_a_dict() -> None:
    spec = NetworkSpec("deeplab", 3, 2, 3, {"aspp_channels": 8})
    assert NetworkSpec.from_dict(spec.to_dict()) == spec


def test_network_errors_name_the_problem() -> None:
    with pytest.raises(ModelError, match=r"network 'vnet' is unknown: choose one of \["):
        build_network(NetworkSpec("vnet", 2, 1, 2))
    with pytest.raises(ModelError, match=r"network 'segnet' parameters: depth: Extra inputs"):
        build_network(NetworkSpec("segnet", 2, 1, 2, {"depth": 3}))
    with pytest.raises(ModelError, match=r"`spatial_dims` \(4\) must be 2 or 3"):
        build_network(NetworkSpec("segnet", 4, 1, 2))
    with pytest.raises(ModelError, match=r"channels in \(0\) and out \(2\) must be at least 1"):
        build_network(NetworkSpec("segnet", 2, 0, 2))
    with pytest.raises(ModelError, match=r"`strides` \(2,\) must have one entry fewer"):
        build_network(NetworkSpec("unet", 2, 1, 2, {"channels": [4, 8, 16], "strides": [2]}))
    with pytest.raises(ModelError, match=r"network spec lacks the key 'out_channels'"):
        NetworkSpec.from_dict({"name": "segnet", "spatial_dims": 2, "in_channels": 1})
    with pytest.raises(ModelError, match=r"network spec has unknown keys \['size'\]"):
        NetworkSpec.from_dict({"name": "segnet", "size": 3})
    spec = NetworkSpec("basic_unet", 2, 1, 2)
    with pytest.raises(
        ModelError, match=r"`tile` \(60, 64\) must be a multiple of 16 .*\(64, 64\)"
    ):
        check_tile(spec, (60, 64))
    with pytest.raises(ModelError, match=r"`tile` \(64,\) has 1 axes, network 'basic_unet' is 2-D"):
        check_tile(spec, (64,))
    with pytest.raises(ModelError, match=r"leaves one pixel at the coarsest level .* at least 32"):
        check_tile(spec, (16, 16))


def test_missing_monai_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "monai", None)  # what Python does for a blocked import
    with pytest.raises(ImportError, match=r"network 'basic_unet' needs MONAI.*segflow\[ml\]"):
        build_network(NetworkSpec("basic_unet", 2, 1, 2))
    build_network(NetworkSpec("segnet", 2, 1, 2))  # written here: no MONAI needed

"""Network architectures, chosen by name and built from a plain, JSON-friendly spec.

A :class:`NetworkSpec` (name, spatial dims, input and output channels, parameters) is what a
model card stores; :func:`build_network` turns it into a :class:`torch.nn.Module`. Each
architecture declares the multiple its input sides must be (:func:`network_divisor`) and tile
shapes are checked against it (:func:`check_tile`).

=============== ======================================================= ============
name            what it is                                              sides divide
=============== ======================================================= ============
``basic_unet``  MONAI ``BasicUNet``: 4 poolings, 5 levels, skip concat  16
``unet``        MONAI ``UNet``: strided residual units                  prod(strides)
``deeplab``     :class:`~segflow.models.deeplab.DeepLab` (atrous + ASPP) 4
``segnet``      :class:`~segflow.models.segnet.SegNet` (pool indices)   2**stages
=============== ======================================================= ============

The output channels are whatever the model card's head says: semantic classes, or an
instance-friendly head (background / foreground / boundary, or foreground + distance map).
``basic_unet``, ``unet`` and ``deeplab`` need MONAI (``pip install 'segflow[ml]'``), imported
only when such a network is built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from segflow.errors import ModelError

Norm = Literal["batch", "instance"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BasicUNetParams(_Params):
    features: tuple[int, int, int, int, int, int] = Field(
        (16, 32, 64, 128, 256, 16),
        description="channels of the five encoder levels, then after the last upsampling",
    )
    norm: Norm = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    upsample: Literal["deconv", "nontrainable", "pixelshuffle"] = "deconv"


class UNetParams(_Params):
    channels: tuple[int, ...] = Field((16, 32, 64, 128), min_length=2)
    strides: tuple[int, ...] = Field((2, 2, 2), min_length=1)
    num_res_units: int = Field(2, ge=0)
    norm: Norm = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class DeepLabParams(_Params):
    features: tuple[int, int, int] = (16, 32, 64)
    atrous: tuple[int, ...] = (2, 4)
    aspp_channels: int = Field(16, ge=1)
    aspp_dilations: tuple[int, int, int, int] = (1, 2, 4, 6)
    norm: Norm = "batch"


class SegNetParams(_Params):
    features: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    convs: int = Field(2, ge=1)
    norm: Norm = "batch"


@dataclass(frozen=True)
class NetworkSpec:
    """What a model card stores about its network: enough to rebuild it exactly.

    Examples
    --------
    >>> spec = NetworkSpec("segnet", spatial_dims=2, in_channels=1, out_channels=2,
    ...                    params={"features": [4, 8]})
    >>> NetworkSpec.from_dict(spec.to_dict()) == spec
    True
    """

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        unknown = set(data) - {"name", "spatial_dims", "in_channels", "out_channels", "params"}
        if unknown:
            raise ModelError(f"network spec has unknown keys {sorted(unknown)}")
        try:
            return cls(
                name=str(data["name"]),
                spatial_dims=int(data["spatial_dims"]),
                in_channels=int(data["in_channels"]),
                out_channels=int(data["out_channels"]),
                params=dict(data.get("params", {})),
            )
        except KeyError as exc:
            raise ModelError(f"network spec lacks the key {exc.args[0]!r}") from None


@dataclass(frozen=True)
class Architecture:
    """One registry entry: its parameters, how to build it and its input-side divisor."""

    params: type[BaseModel]
    build: Callable[[NetworkSpec, Any], nn.Module]
    divisor: Callable[[Any], int]
    needs_monai: bool


def _monai_norm(norm: Norm) -> tuple[str, dict[str, Any]]:
    return ("instance", {"affine": True}) if norm == "instance" else ("batch", {})


def _build_basic_unet(spec: NetworkSpec, p: BasicUNetParams) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        features=p.features,
        norm=_monai_norm(p.norm),
        dropout=p.dropout,
        upsample=p.upsample,
    )


def _build_unet(spec: NetworkSpec, p: UNetParams) -> nn.Module:
    from monai.networks.nets import UNet

    if len(p.strides) != len(p.channels) - 1:
        raise ModelError(
            f"unet: `strides` {p.strides} must have one entry fewer than `channels` {p.channels}"
        )
    return UNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=p.channels,
        strides=p.strides,
        num_res_units=p.num_res_units,
        norm=_monai_norm(p.norm),
        dropout=p.dropout,
    )


def _build_deeplab(spec: NetworkSpec, p: DeepLabParams) -> nn.Module:
    from segflow.models.deeplab import DeepLab

    return DeepLab(
        spec.spatial_dims,
        spec.in_channels,
        spec.out_channels,
        features=p.features,
        atrous=p.atrous,
        aspp_channels=p.aspp_channels,
        aspp_dilations=p.aspp_dilations,
        norm=p.norm,
    )


def _build_segnet(spec: NetworkSpec, p: SegNetParams) -> nn.Module:
    from segflow.models.segnet import SegNet

    return SegNet(
        spec.spatial_dims,
        spec.in_channels,
        spec.out_channels,
        features=p.features,
        convs=p.convs,
        norm=p.norm,
    )


ARCHITECTURES: dict[str, Architecture] = {
    "basic_unet": Architecture(BasicUNetParams, _build_basic_unet, lambda p: 16, True),
    "unet": Architecture(UNetParams, _build_unet, lambda p: math.prod(p.strides), True),
    "deeplab": Architecture(DeepLabParams, _build_deeplab, lambda p: 4, True),
    "segnet": Architecture(SegNetParams, _build_segnet, lambda p: 2 ** len(p.features), False),
}


# Another package adds a network without touching segflow: an entry point in this group
# naming its Architecture, e.g. ``[project.entry-points."segflow.architectures"]``
# ``swin_unet = "my_package.nets:SWIN_UNET"``.
ENTRY_POINT_GROUP = "segflow.architectures"


def find_architecture(name: str) -> Architecture | None:
    """The architecture registered as ``name`` (built in, or from an entry point of
    :data:`ENTRY_POINT_GROUP`), or None."""
    if name not in ARCHITECTURES:
        _load_entry_points()
    return ARCHITECTURES.get(name)


@functools.cache
def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        arch = entry.load()
        where = f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP!r}"
        if not isinstance(arch, Architecture):
            raise TypeError(f"{where} must name an Architecture, got {type(arch).__name__}")
        if ARCHITECTURES.get(entry.name, arch) is not arch:
            raise ValueError(f"{where}: the network name {entry.name!r} is taken")
        ARCHITECTURES[entry.name] = arch


def _parse(spec: NetworkSpec) -> tuple[Architecture, Any]:
    arch = find_architecture(spec.name)
    if arch is None:
        raise ModelError(f"network {spec.name!r} is unknown: choose one of {sorted(ARCHITECTURES)}")
    if spec.spatial_dims not in (2, 3):
        raise ModelError(
            f"network {spec.name!r}: `spatial_dims` ({spec.spatial_dims}) must be 2 or 3"
        )
    if spec.in_channels < 1 or spec.out_channels < 1:
        raise ModelError(
            f"network {spec.name!r}: channels in ({spec.in_channels}) and out "
            f"({spec.out_channels}) must be at least 1"
        )
    try:
        params = arch.params.model_validate(dict(spec.params))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelError(f"network {spec.name!r} parameters: {problems}") from None
    return arch, params


def build_network(spec: NetworkSpec) -> nn.Module:
    """A freshly initialised network for ``spec`` (seed torch first for reproducible weights).

    Examples
    --------
    >>> import torch
    >>> net = build_network(NetworkSpec("basic_unet", spatial_dims=2, in_channels=1,
    ...                                 out_channels=2))
    >>> round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
    1.95
    >>> build_network(NetworkSpec("segnet", 3, 2, 3, {"features": [4]}))(
    ...     torch.zeros(1, 2, 4, 4, 6)).shape
    torch.Size([1, 3, 4, 4, 6])
    """
    arch, params = _parse(spec)
    if arch.needs_monai:
        try:
            import monai  # noqa: F401
        except ImportError:
            raise ImportError(
                f"network {spec.name!r} needs MONAI, which is not installed: "
                "pip install 'segflow[ml]' (or 'monai>=1.6.1,<1.7')"
            ) from None
    return arch.build(spec, params)


def network_divisor(spec: NetworkSpec) -> int:
    """The number every input side must be a multiple of.

    Examples
    --------
    >>> network_divisor(NetworkSpec("unet", 3, 1, 2, {"strides": [2, 2]}))
    4
    """
    arch, params = _parse(spec)
    return arch.divisor(params)


def check_tile(spec: NetworkSpec, tile: Sequence[int]) -> tuple[int, ...]:
    """``tile`` as a tuple, after checking it fits the network (axes and divisor).

    Examples
    --------
    >>> spec = NetworkSpec("basic_unet", 2, 1, 2)
    >>> check_tile(spec, [64, 128])
    (64, 128)
    >>> check_tile(spec, [60, 64])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    segflow.errors.ModelError: `tile` (60, 64) must be a multiple of 16 on every axis ...
    """
    tile = tuple(int(t) for t in tile)
    if len(tile) != spec.spatial_dims:
        raise ModelError(
            f"`tile` {tile} has {len(tile)} axes, network {spec.name!r} is {spec.spatial_dims}-D"
        )
    arch, params = _parse(spec)
    divisor = arch.divisor(params)
    if any(t < divisor or t % divisor for t in tile):
        fixed = tuple(max(divisor, -(-t // divisor) * divisor) for t in tile)
        raise ModelError(
            f"`tile` {tile} must be a multiple of {divisor} on every axis for network "
            f"{spec.name!r}: e.g. {fixed}"
        )
    if getattr(params, "norm", None) == "instance" and math.prod(t // divisor for t in tile) < 2:
        # Instance norm over a single value at the coarsest level is undefined (torch refuses).
        raise ModelError(
            f"`tile` {tile} leaves one pixel at the coarsest level of network {spec.name!r} "
            f"with instance norm: use at least {2 * divisor} on one axis"
        )
    return tile

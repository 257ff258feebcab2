"""Trained encoder-decoders as engine pieces: networks, checkpoints, tiled inference, training.

See DESIGN.md, "Deep-learning inference". Everything here works on in-memory arrays and
explicit arguments; the pipeline op, the per-worker model cache and the flows build on it.
"""

from segflow.models.inference import predict_image, predict_region, resolve_device
from segflow.models.networks import (
    ARCHITECTURES,
    NetworkSpec,
    build_network,
    check_tile,
    network_divisor,
)
from segflow.models.tiling import TileGrid, plan_tiles, tile_halo, tile_starts, tile_weights

__all__ = [
    "ARCHITECTURES",
    "NetworkSpec",
    "TileGrid",
    "build_network",
    "check_tile",
    "network_divisor",
    "plan_tiles",
    "predict_image",
    "predict_region",
    "resolve_device",
    "tile_halo",
    "tile_starts",
    "tile_weights",
]

"""Trained encoder-decoders as engine pieces: networks, checkpoints, tiled inference, training.

See DESIGN.md, "Deep-learning inference". Everything here works on in-memory arrays and
explicit arguments; the pipeline op, the per-worker model cache and the flows build on it.
"""

from segflow.models.card import (
    ChannelCard,
    ModelCard,
    Normalization,
    check_item,
    item_statistics,
    normalize_image,
)
from segflow.models.checkpoint import (
    LoadedModel,
    load_checkpoint,
    load_exported,
    load_model,
    load_torchscript,
    model_hash,
    read_card,
    save_checkpoint,
)
from segflow.models.inference import predict_image, predict_region, resolve_device
from segflow.models.networks import (
    ARCHITECTURES,
    NetworkSpec,
    build_network,
    check_tile,
    network_divisor,
)
from segflow.models.tiling import TileGrid, plan_tiles, tile_halo, tile_starts, tile_weights
from segflow.models.train import (
    EpochReport,
    TrainConfig,
    TrainResult,
    foreground_iou,
    make_targets,
    predict_mask,
    split_validation,
    train_model,
)

__all__ = [
    "ARCHITECTURES",
    "ChannelCard",
    "EpochReport",
    "LoadedModel",
    "ModelCard",
    "NetworkSpec",
    "Normalization",
    "TileGrid",
    "TrainConfig",
    "TrainResult",
    "build_network",
    "check_item",
    "check_tile",
    "foreground_iou",
    "item_statistics",
    "load_checkpoint",
    "load_exported",
    "load_model",
    "load_torchscript",
    "make_targets",
    "model_hash",
    "network_divisor",
    "normalize_image",
    "plan_tiles",
    "predict_image",
    "predict_mask",
    "predict_region",
    "read_card",
    "resolve_device",
    "save_checkpoint",
    "split_validation",
    "tile_halo",
    "tile_starts",
    "tile_weights",
    "train_model",
]

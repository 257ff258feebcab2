"""The ``segflow train`` configuration: image + reference pairs, the model card, the loop.

Config is data: the model is a :class:`~segflow.models.card.ModelCard` (without weights),
the loop a :class:`~segflow.models.train.TrainConfig`, and the data a glob of images with a
reference per image (a label image, or GeoJSON polygons rasterised on the image's grid as
``segflow evaluate`` does).
"""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segflow.errors import ConfigError
from segflow.ops.intensity import to_luma


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainData(_Model):
    images: str = Field(description="glob of training images (relative to the config file)")
    references: str = Field(
        description="each image's reference: a path template with {dir} (the image's folder) "
        "and {stem} (its name without extension), e.g. '{dir}/labels.tif' or "
        "'refs/{stem}.geojson'"
    )
    channels: Literal["as_is", "luma"] = Field(
        "as_is",
        description="luma: RGB(A) images become one channel (BT.601 weights, alpha dropped); "
        "single-channel images stay as they are (the pipeline's `luma` op does the same "
        "before the model)",
    )
    validation: list[str] = Field(
        default_factory=list,
        description="stems of the images kept for validation (default: a seeded split)",
    )


class TrainLoop(_Model):
    """The training loop's options (:class:`segflow.models.train.TrainConfig`)."""

    patch: list[int] | None = None
    batch_size: int = Field(8, ge=1)
    steps_per_epoch: int = Field(20, ge=1)
    max_epochs: int = Field(50, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    foreground_fraction: float = Field(0.5, ge=0, le=1)
    patience: int = Field(8, ge=1)
    min_delta: float = 1e-3
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    validation_split: Literal["pairs", "strips"] = Field(
        "pairs",
        description="without data.validation: hold out whole images (pairs) or the last "
        "validation_fraction of every image's longest axis (strips)",
    )
    augment: bool = True
    seed: int = 0


class TrainFile(_Model):
    """A whole ``segflow train`` config (see ``configs/train/nuclei-unet.yaml``)."""

    name: str = "train"
    data: TrainData
    model: dict[str, Any] = Field(description="the model card (architecture, channels, ...)")
    training: TrainLoop = Field(default_factory=lambda: TrainLoop.model_validate({}))
    output: str = Field(description="folder for best/ (the checkpoint) and last/ (resume)")

    def card(self) -> Any:
        from segflow.models.card import ModelCard

        return ModelCard.model_validate({"name": self.name, **self.model})

    def loop(self) -> Any:
        from segflow.models.train import TrainConfig

        values = self.training.model_dump()
        values["patch"] = None if values["patch"] is None else tuple(values["patch"])
        return TrainConfig(**values)


def load_train_config(path: str | Path, base_dir: Path | None = None) -> TrainFile:
    """Read and validate a train config; relative paths resolve against its folder.

    Raises
    ------
    ConfigError
        One line per problem, naming the key and the value.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError([f"config {str(path)!r}: cannot read it ({error.strerror})"]) from None
    return parse_train_config(data or {}, base_dir=base_dir or path.resolve().parent)


def parse_train_config(data: Mapping[str, Any], *, base_dir: Path) -> TrainFile:
    from segflow.config import _describe

    try:
        config = TrainFile.model_validate(dict(data))
        config.card()
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    data_ = config.data.model_copy(
        update={
            "images": str(base_dir / config.data.images),
            "references": str(base_dir / config.data.references)
            if not config.data.references.startswith("{dir}")
            else config.data.references,
        }
    )
    return config.model_copy(update={"data": data_, "output": str(base_dir / config.output)})


def find_pairs(data: TrainData) -> list[tuple[str, str]]:
    """``(image, reference)`` paths; an image without its reference is an error naming it."""
    images = sorted(glob.glob(data.images, recursive=True))
    if not images:
        raise ConfigError([f"data.images: no file matches {data.images!r}"])
    pairs = []
    for image in images:
        p = Path(image)
        stem = p.name.split(".")[0]
        reference = data.references.format(dir=str(p.parent), stem=stem)
        if not Path(reference).is_file():
            raise ConfigError([f"data.references: image {image!r} has no reference {reference!r}"])
        pairs.append((image, reference))
    return pairs


def read_pairs(
    pairs: Sequence[tuple[str, str]], *, channels: str = "as_is"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images ``(c, ...)`` and their reference labels ``(...)`` in memory."""
    from segflow.evaluate import open_reference
    from segflow.io import open_item

    out = []
    for image_path, reference_path in pairs:
        reader = open_item(image_path)
        whole = tuple(slice(0, n) for n in reader.info.spatial_shape)
        image = np.asarray(reader.read(whole))
        if channels == "luma":
            image = to_luma(image)
        labels = np.asarray(open_reference(reference_path, reader.info).read(whole))
        labels = labels[0] if labels.ndim == image.ndim else labels
        if labels.shape != image.shape[1:]:
            raise ValueError(
                f"reference {reference_path!r} is {labels.shape}, image {image_path!r} is "
                f"{image.shape[1:]}"
            )
        out.append((image, labels.astype(np.int64)))
    return out


def train_from_config(
    config: TrainFile, *, stop_after: int | None = None, resume: bool = True
) -> Any:
    """Run (or continue) the training ``config`` describes with
    :func:`segflow.models.train.train_model`; returns its ``TrainResult``."""
    from segflow.models.train import train_model

    pairs = find_pairs(config.data)
    data = read_pairs(pairs, channels=config.data.channels)
    validation = None
    train = data
    if config.data.validation:
        keep = set(config.data.validation)
        is_val = [Path(image).parent.name in keep or Path(image).stem in keep for image, _ in pairs]
        validation = [d for d, v in zip(data, is_val, strict=True) if v]
        train = [d for d, v in zip(data, is_val, strict=True) if not v]
    return train_model(
        train,
        card=config.card(),
        out_dir=config.output,
        config=config.loop(),
        validation=validation,
        resume=resume,
        stop_after=stop_after,
    )


def draw_loss_curve(losses: Sequence[float], scores: Sequence[float]) -> np.ndarray:
    """A small RGB plot (no plotting library): loss (blue, scaled to its maximum) and
    validation score (orange, 0..1) per epoch, on a white 480 x 240 canvas."""
    from skimage.draw import line

    height, width, margin = 240, 480, 20
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[height - margin, margin : width - margin] = 0  # x axis
    canvas[margin : height - margin, margin] = 0  # y axis
    n = len(losses)
    if n == 0:
        return canvas
    top = max(max(losses), 1e-12)
    xs = np.linspace(margin, width - margin - 1, max(n, 2)).astype(int)[:n]

    def y(value: float) -> int:
        value = min(max(value, 0.0), 1.0)
        return round(height - margin - value * (height - 2 * margin - 1))

    for values, colour in (([v / top for v in losses], (31, 119, 180)), (scores, (255, 127, 14))):
        points = [(y(v), x) for v, x in zip(values, xs, strict=False)]
        for (r0, c0), (r1, c1) in zip(points, points[1:] or points, strict=False):
            rr, cc = line(r0, c0, r1, c1)
            canvas[rr, cc] = colour
    return canvas

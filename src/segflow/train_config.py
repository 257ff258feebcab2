"""The ``segflow train`` configuration: image + reference pairs, the model card, the loop.

Config is data: the model is a :class:`~segflow.models.card.ModelCard` (without weights),
the loop a :class:`~segflow.models.train.TrainConfig`, and the data a glob of images with a
reference per image (a label image, GeoJSON polygons rasterised on the image's grid as
``segflow evaluate`` does, or one COCO JSON file for all images: its polygons and RLE
masks, one instance per annotation; :mod:`segflow.io.coco`).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segflow.engine.pipeline import parse_steps
from segflow.errors import ConfigError, ModelError
from segflow.ops.intensity import to_luma


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


SyntheticKind = Literal["fluorescence", "brightfield", "stained"]


class SyntheticData(_Model):
    """Synthetic nuclei images drawn from a seed (:mod:`segflow.models.synthetic`)."""

    count: int = Field(ge=1, description="training images drawn")
    validation: int = Field(
        0,
        ge=0,
        description="more images drawn (other seeds) for choosing the best epoch, added to "
        "the validation pairs",
    )
    shape: list[int] = Field(default_factory=lambda: [256, 256], min_length=2, max_length=2)
    kinds: list[SyntheticKind] = Field(
        default_factory=lambda: list[SyntheticKind](["fluorescence"]),
        min_length=1,
        description="image kinds, drawn in turn: fluorescence (bright nuclei, 1 band), "
        "brightfield (dark nuclei, 1 band), stained (purple on pink, RGB: use channels: luma)",
    )
    radius: list[float] = Field(
        default_factory=lambda: [4.0, 16.0],
        min_length=2,
        max_length=2,
        description="[low, high]: each image's typical nucleus radius in pixels, drawn "
        "log-uniformly",
    )
    dtype: Literal["uint8", "uint16"] = "uint16"
    seed: int = 0


class TrainData(_Model):
    images: str | list[str] = Field(
        default_factory=list,
        description="glob(s) of training images (relative to the config file); a list is the "
        "union of its globs; empty: synthetic images only",
    )
    references: str = Field(
        "{dir}/labels.tif",
        description="each image's reference: a path template with {dir} (the image's folder) "
        "and {stem} (its name without extension), e.g. '{dir}/labels.tif' or "
        "'refs/{stem}.geojson', or one COCO JSON file for every image ('annotations.json'); "
        "a template with a glob ('{dir}/../masks/*.png', the DSB2018 / BBBC038 layout) "
        "names one mask file per instance: instance k is the k-th file in sorted order",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="images left out: each entry a glob (fnmatch) of an image's folder name "
        "or file stem, e.g. held-out images' ids",
    )
    synthetic: SyntheticData | None = Field(
        None, description="synthetic nuclei added to the training (and validation) pairs"
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
    reference_values: dict[int, int] | None = Field(
        None,
        description="map each reference value to a class id (e.g. {0: 0, 255: 1} for a 0/255 "
        "mask); a value the map does not name is an error. Default: values are class ids "
        "(semantic head) or instance ids",
    )
    crop: list[list[int | None]] | None = Field(
        None,
        description="train on a window of every image: one [start, stop] per spatial axis "
        "(null: the whole axis), e.g. [[0, 450], [null, null]] for the top 450 rows",
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
    sample_by: Literal["images", "area"] = Field(
        "images",
        description="which image each patch comes from: every image equally often (images) "
        "or in proportion to its pixels (area: large images of a rare kind weigh as their "
        "pixels do)",
    )
    select_by: Literal["foreground_iou", "ap50"] = Field(
        "foreground_iou",
        description="how the best epoch is chosen: the validation images' foreground IoU, or "
        "their mean AP50 with the instances `instances` make (instance heads: a foreground "
        "that merges touching objects scores low only by AP50)",
    )
    instances: list[dict[str, Any]] = Field(
        default_factory=list,
        description="with select_by ap50: pipeline steps that turn the network's raw output "
        "into instances, as the inference config's (e.g. [{op: flow_dynamics, "
        "flow_threshold: 0.4}])",
    )
    patience: int = Field(8, ge=1)
    min_delta: float = 1e-3

    @property
    def score_name(self) -> str:
        """The validation score as logs and tables name it."""
        return "AP50" if self.select_by == "ap50" else "foreground IoU"

    validation_fraction: float = Field(0.2, ge=0, lt=1)
    validation_split: Literal["pairs", "strips"] = Field(
        "pairs",
        description="without data.validation: hold out whole images (pairs) or the last "
        "validation_fraction of every image's longest axis (strips)",
    )
    augment: bool = True
    zoom: list[float] = Field(
        default_factory=lambda: [1.0, 1.0],
        min_length=2,
        max_length=2,
        description="[low, high]: each patch is scaled by a factor drawn log-uniformly from "
        "this range (objects of other sizes than the training images'); [1, 1]: off",
    )
    gamma: list[float] = Field(
        default_factory=lambda: [1.0, 1.0],
        min_length=2,
        max_length=2,
        description="[low, high]: a gamma drawn log-uniformly from this range bends the "
        "normalised intensities (dim and bright objects); [1, 1]: off",
    )
    noise: float = Field(0.0, ge=0, description="Gaussian noise, sigma drawn from [0, noise]")
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
        values["zoom"], values["gamma"] = tuple(values["zoom"]), tuple(values["gamma"])
        values["instances"] = tuple(values["instances"])
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
    try:
        config.loop()
    except ModelError as error:
        raise ConfigError([f"training: {error}"]) from None
    if config.training.instances:
        try:
            parse_steps(config.training.instances)
        except ConfigError as error:
            raise ConfigError([f"training.instances: {line}" for line in error.problems]) from None

    def resolve(path: str) -> str:  # "configs/train/../../outputs" reads as "outputs"
        return os.path.normpath(base_dir / path)

    images = config.data.images
    data_ = config.data.model_copy(
        update={
            "images": resolve(images) if isinstance(images, str) else [resolve(i) for i in images],
            "references": resolve(config.data.references)
            if not config.data.references.startswith("{dir}")
            else config.data.references,
        }
    )
    return config.model_copy(update={"data": data_, "output": resolve(config.output)})


def find_pairs(data: TrainData) -> list[tuple[str, str]]:
    """``(image, reference)`` paths; an image without its reference is an error naming it."""
    patterns = [data.images] if isinstance(data.images, str) else data.images
    images = sorted({path for p in patterns for path in glob.glob(p, recursive=True)})
    if not patterns and data.synthetic is not None:
        return []
    if not images:
        raise ConfigError([f"data.images: no file matches {data.images!r}"])
    images = [i for i in images if not _excluded(i, data.exclude)]
    if not images:
        raise ConfigError([f"data.exclude: {data.exclude} leaves none of {data.images!r}"])
    pairs = []
    for image in images:
        p = Path(image)
        stem = p.name.split(".")[0]
        reference = data.references.format(dir=str(p.parent), stem=stem)
        found = glob.glob(reference) if is_mask_glob(reference) else [reference]
        if not found or not Path(found[0]).is_file():
            raise ConfigError([f"data.references: image {image!r} has no reference {reference!r}"])
        pairs.append((image, reference))
    if problems := coco_problems(pairs):
        raise ConfigError(problems)
    return pairs


def _excluded(image: str, patterns: Sequence[str]) -> bool:
    """Whether ``patterns`` name the image's folder or file stem (fnmatch globs)."""
    p = Path(image)
    names = (p.parent.name, p.name.split(".")[0])
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def is_mask_glob(reference: str) -> bool:
    """Whether a reference path is a glob of one mask file per instance."""
    return glob.has_magic(reference)


def read_instance_masks(pattern: str, shape: tuple[int, ...]) -> np.ndarray:
    """Instance labels from one mask file per instance (the files ``pattern`` matches, in
    sorted order: the k-th non-empty file's non-zero pixels are instance k). A pixel two
    masks claim belongs to the later one, as in a painted label image.

    Examples
    --------
    >>> import tempfile, imageio.v3 as iio
    >>> folder = Path(tempfile.mkdtemp())
    >>> a = np.zeros((3, 4), np.uint8); a[0, :2] = 255
    >>> b = np.zeros((3, 4), np.uint8); b[2, 1:] = 1
    >>> iio.imwrite(folder / "a.png", a); iio.imwrite(folder / "b.png", b)
    >>> read_instance_masks(str(folder / "*.png"), (3, 4))
    array([[1, 1, 0, 0],
           [0, 0, 0, 0],
           [0, 2, 2, 2]])
    """
    import imageio.v3 as iio

    labels = np.zeros(shape, np.int64)
    k = 0
    for path in sorted(glob.glob(pattern)):
        mask = np.asarray(iio.imread(path))
        mask = mask[..., 0] if mask.ndim == len(shape) + 1 else mask
        if mask.shape != shape:
            raise ConfigError(
                [f"data.references: mask {path!r} is {mask.shape}, its image {shape}"]
            )
        if mask.any():
            k += 1
            labels[mask != 0] = k
    return labels


def coco_problems(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One line per image whose COCO reference has no image for it, or one of another size
    (checked before training: the images' headers are read, not their pixels)."""
    from segflow.errors import EvaluationError
    from segflow.io import open_item
    from segflow.io.coco import CocoReference, is_coco

    problems = []
    for image, reference in pairs:
        if not is_coco(reference):
            continue
        try:
            CocoReference(reference, open_item(image).info)
        except EvaluationError as error:
            problems.append(f"data.references: image {image!r}: {error}")
    return problems


def coco_extra_lines(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One line per COCO reference file naming its images that are not training images."""
    from segflow.io import open_item
    from segflow.io.coco import is_coco, load_coco, unmatched_images, unmatched_line

    lines = []
    for reference in sorted({r for _, r in pairs if is_coco(r)}):
        items = [(open_item(i).info.id, i) for i, r in pairs if r == reference]
        if extra := unmatched_images(load_coco(reference), items):
            lines.append(unmatched_line(reference, extra))
    return lines


def read_pairs(
    pairs: Sequence[tuple[str, str]],
    *,
    channels: str = "as_is",
    reference_values: Mapping[int, int] | None = None,
    crop: Sequence[Sequence[int | None]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images ``(c, ...)`` and their reference labels ``(...)`` in memory, with
    ``reference_values`` mapped to class ids and cut to the ``crop`` window."""
    from segflow.evaluate import open_reference
    from segflow.io import open_item

    out = []
    for image_path, reference_path in pairs:
        reader = open_item(image_path)
        shape = reader.info.spatial_shape
        if crop is not None and len(crop) != len(shape):
            raise ConfigError(
                [f"data.crop: {list(crop)} has {len(crop)} axes, {image_path!r} has {len(shape)}"]
            )
        window = tuple(
            slice(*slice(*(crop[axis] if crop else (None, None))).indices(n)[:2])
            for axis, n in enumerate(shape)
        )
        if any(w.stop <= w.start for w in window):
            raise ConfigError([f"data.crop: {list(crop or [])} is empty on {image_path!r} {shape}"])
        image = np.asarray(reader.read(window))
        if channels == "luma":
            image = to_luma(image)
        if is_mask_glob(reference_path):
            labels = read_instance_masks(reference_path, tuple(shape))[window]
        else:
            labels = np.asarray(open_reference(reference_path, reader.info).read(window))
        labels = labels[0] if labels.ndim == image.ndim else labels
        if labels.shape != image.shape[1:]:
            raise ValueError(
                f"reference {reference_path!r} is {labels.shape}, image {image_path!r} is "
                f"{image.shape[1:]}"
            )
        if reference_values is not None:
            labels = _map_values(labels, reference_values, reference_path)
        out.append((image, labels.astype(np.int64)))
    return out


def _map_values(labels: np.ndarray, mapping: Mapping[int, int], path: str) -> np.ndarray:
    """``labels`` with every value replaced by ``mapping[value]``.

    Examples
    --------
    >>> _map_values(np.array([0, 255, 255]), {0: 0, 255: 1}, "mask.png")
    array([0, 1, 1])
    """
    values, inverse = np.unique(labels, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in mapping]
    if unknown:
        raise ConfigError(
            [
                f"data.reference_values: reference {path!r} has the value(s) {unknown[:5]} "
                f"that the map {dict(mapping)} does not name"
            ]
        )
    return np.array([mapping[int(v)] for v in values], dtype=np.int64)[inverse].reshape(
        labels.shape
    )


Pairs = list[tuple[np.ndarray, np.ndarray]]


def synthetic_pairs(spec: SyntheticData, channels: str, start: int, count: int) -> Pairs:
    """Synthetic images ``start .. start + count - 1`` of ``spec`` (image ``i`` is drawn
    from the seed ``(spec.seed, i)``, its kind ``spec.kinds[i % len(kinds)]``)."""
    from segflow.models.synthetic import synthetic_nuclei

    low, high = spec.radius
    if not 0 < low <= high:
        raise ConfigError([f"data.synthetic.radius: {spec.radius} must satisfy 0 < low <= high"])
    out = []
    for i in range(start, start + count):
        radius = float(
            np.exp(np.random.default_rng([spec.seed, i, 1]).uniform(np.log(low), np.log(high)))
        )
        image, labels = synthetic_nuclei(
            (spec.shape[0], spec.shape[1]),
            seed=[spec.seed, i],
            kind=spec.kinds[i % len(spec.kinds)],
            radius=radius,
            dtype=spec.dtype,
        )
        out.append((to_luma(image) if channels == "luma" else image, labels.astype(np.int64)))
    return out


# The last data read, kept between calls in one process (the train flow reads the data
# once per epoch task): keyed by the data settings and every file's size and time.
_READ: dict[str, tuple[Pairs, Pairs | None]] = {}


def _files_key(config: TrainFile, pairs: Sequence[tuple[str, str]]) -> str:
    files = []
    for image, reference in pairs:
        for path in [image, *(glob.glob(reference) if is_mask_glob(reference) else [reference])]:
            stat = os.stat(path)
            files.append((path, stat.st_size, stat.st_mtime_ns))
    return json.dumps([config.data.model_dump(mode="json"), files])


def _training_data(config: TrainFile) -> tuple[Pairs, Pairs | None]:
    """The training pairs in memory, and the validation pairs ``data.validation`` names
    and ``data.synthetic.validation`` draws (None: the loop splits them off). Read once
    per process while the data settings and files stay the same."""
    pairs = find_pairs(config.data)
    key = _files_key(config, pairs)
    if key not in _READ:
        _READ.clear()
        _READ[key] = _read_training_data(config, pairs)
    return _READ[key]


def _read_training_data(
    config: TrainFile, pairs: Sequence[tuple[str, str]]
) -> tuple[Pairs, Pairs | None]:
    data = read_pairs(
        pairs,
        channels=config.data.channels,
        reference_values=config.data.reference_values,
        crop=config.data.crop,
    )
    train, validation = data, None
    if config.data.validation:
        keep = set(config.data.validation)
        is_val = [Path(image).parent.name in keep or Path(image).stem in keep for image, _ in pairs]
        validation = [d for d, v in zip(data, is_val, strict=True) if v]
        train = [d for d, v in zip(data, is_val, strict=True) if not v]
    spec = config.data.synthetic
    if spec is not None:
        train = train + synthetic_pairs(spec, config.data.channels, 0, spec.count)
        if spec.validation:
            drawn = synthetic_pairs(spec, config.data.channels, spec.count, spec.validation)
            validation = (validation or []) + drawn
    return train, validation


# At most this many differences are named; the rest are counted.
CHANGES_SHOWN = 3


def resume_changes(config: TrainFile) -> list[str]:
    """How the run saved in ``config.output`` differs from what ``config`` trains, in the
    config's own keys (``training.seed 1, now 2``, ``the data (images and references)``);
    empty when it matches or nothing is saved there. Reads the data when a run is saved.
    """
    from segflow.models.train import STATE_FILE
    from segflow.models.train import resume_changes as run_changes

    if not (Path(config.output) / "last" / STATE_FILE).is_file():
        return []  # nothing saved: the data need not be read
    train, validation = _training_data(config)
    changes = run_changes(
        train,
        card=config.card(),
        out_dir=config.output,
        config=config.loop(),
        validation=validation,
    )
    lines = []
    for section, key, saved, now in changes:
        if section == "data_fingerprint":
            lines.append("the data (images and references)")
            continue
        key = f"training.{key}" if section == "config" else key if key == "name" else f"model.{key}"
        lines.append(f"{key} {json.dumps(saved)}, now {json.dumps(now)}")
    if len(lines) > CHANGES_SHOWN:
        lines[CHANGES_SHOWN:] = [f"and {len(lines) - CHANGES_SHOWN} more"]
    return lines


def train_from_config(
    config: TrainFile,
    *,
    stop_after: int | None = None,
    resume: bool = True,
    on_step: Callable[[int, int, int, float], None] | None = None,
) -> Any:
    """Run (or continue) the training ``config`` describes with
    :func:`segflow.models.train.train_model` (``on_step`` as there); returns its
    ``TrainResult``."""
    from segflow.models.train import train_model

    train, validation = _training_data(config)
    return train_model(
        train,
        card=config.card(),
        out_dir=config.output,
        config=config.loop(),
        validation=validation,
        resume=resume,
        stop_after=stop_after,
        on_step=on_step,
    )

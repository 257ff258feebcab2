"""Training a segmentation network on in-memory (image, labels) pairs, resumable and seeded.

The engine-level loop the ``train`` flow will call. Each epoch draws ``steps_per_epoch``
batches of patches (a share of them centred on a foreground pixel), augments them (a random
zoom, flips, 90-degree rotations in the ``y, x`` plane, intensity scale and shift, gamma,
Gaussian noise; zoom, gamma and noise are off by default), minimises soft Dice +
cross-entropy with AdamW under a polynomial learning-rate decay, then scores the validation
pairs with the same tiled inference the pipeline uses (:func:`~segflow.models.inference.
predict_image`). The best epoch is saved as a checkpoint with its model card
(:func:`~segflow.models.checkpoint.save_checkpoint`); training stops early after
``patience`` epochs without improvement.

Everything random comes from generators seeded by ``(seed, epoch)``, and the state after each
epoch (weights, optimiser, counters) is written to ``out_dir/last``: a run killed after any
epoch and resumed gives the same weights, bit for bit on CPU, as the run left alone.

Images are ``(c, (z), y, x)`` in their raw values (each is normalised with its own whole-item
statistics, as the card says); labels are ``((z), y, x)`` integers: class ids for a semantic
head, instance ids for the instance-friendly heads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries
from skimage.transform import resize
from torch.nn import functional as F

from segflow.errors import ModelError
from segflow.models.card import Head, ModelCard, TrainingCard, item_statistics, normalize_image
from segflow.models.checkpoint import save_checkpoint
from segflow.models.flow_field import flip_flows, flow_targets, rotate_flows
from segflow.models.inference import predict_image
from segflow.models.networks import build_network, check_tile

Pair = tuple[np.ndarray, np.ndarray]
STATE_FILE = "training_state.pt"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``patch`` defaults to the card's tile."""

    patch: tuple[int, ...] | None = None
    batch_size: int = 8
    steps_per_epoch: int = 20
    max_epochs: int = 50
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    foreground_fraction: float = 0.5
    # Which image each patch comes from: "images" draws every image equally often, "area"
    # in proportion to its pixels (a 1024^2 image 16 times as often as a 256^2 one), so
    # that few large images of a kind weigh as their pixels do.
    sample_by: Literal["images", "area"] = "images"
    # How the best epoch is chosen: the validation images' foreground IoU, or their mean
    # AP50 (instance heads) with the instances ``instances`` make of each whole-image
    # output (segflow pipeline steps on the network's raw output, e.g. flow_dynamics): a
    # foreground that is right but merges touching objects scores low only by AP50.
    select_by: Literal["foreground_iou", "ap50"] = "foreground_iou"
    instances: tuple[Mapping[str, Any], ...] = ()
    patience: int = 8
    min_delta: float = 1e-3
    validation_fraction: float = 0.2
    validation_split: Literal["pairs", "strips"] = "pairs"
    augment: bool = True
    zoom: tuple[float, float] = (1.0, 1.0)
    gamma: tuple[float, float] = (1.0, 1.0)
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("zoom", "gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ModelError(f"`{name}` ({low}, {high}) must satisfy 0 < low <= high")
        if self.noise < 0:
            raise ModelError(f"`noise` ({self.noise}) must be >= 0")
        if self.select_by == "ap50" and not self.instances:
            raise ModelError(
                "`select_by` ap50 needs `instances`: the steps that turn the network's raw "
                "output into instances, e.g. [{op: flow_dynamics}]"
            )


@dataclass(frozen=True)
class EpochReport:
    """What the callback hears after each epoch (after its state is saved)."""

    epoch: int
    loss: float
    val_score: float
    best_score: float
    improved: bool
    # The same loss on the validation pairs' whole-image prediction (NaN in runs saved
    # before segflow measured it: their history rows have five values).
    val_loss: float = float("nan")


@dataclass(frozen=True)
class TrainResult:
    best: Path
    last: Path
    best_score: float
    best_epoch: int
    epochs: int
    stopped_early: bool
    history: list[EpochReport] = field(default_factory=list)
    finished: bool = True  # False when ``stop_after`` returned before the run's end


def make_targets(labels: np.ndarray, head: Head) -> np.ndarray:
    """Training targets for ``head`` from integer ``labels``.

    ``semantic``: the labels themselves (class ids); ``foreground_boundary``: 0 background,
    1 inside an object, 2 on its inner boundary (instance ids in); ``foreground_distance``:
    float32 ``(2, ...)``, the foreground mask and each object's distance to its border divided
    by the object's largest distance (1 at its centre); ``flows``: float32 ``(ndim + 1, ...)``,
    Cellpose-style flows towards each object's centre (times 5) and the foreground
    (:func:`segflow.models.flow_field.flow_targets`).

    Examples
    --------
    >>> labels = np.zeros((5, 6), int); labels[1:4, 1:5] = 7
    >>> make_targets(labels, "foreground_boundary")[2]
    array([0, 2, 1, 1, 2, 0])
    >>> make_targets(labels, "foreground_distance")[1, 2]
    array([0. , 0.5, 1. , 1. , 0.5, 0. ], dtype=float32)
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ModelError(f"labels must be integers, got dtype {labels.dtype}")
    if head == "semantic":
        return labels.astype(np.int64)
    if head == "flows":
        return flow_targets(labels)
    boundary = find_boundaries(labels, mode="inner") & (labels > 0)
    if head == "foreground_boundary":
        targets = (labels > 0).astype(np.int64)
        targets[boundary] = 2
        return targets
    inner = (labels > 0) & ~boundary
    distance = ndi.distance_transform_edt(inner) + (labels > 0)
    ids = np.unique(labels[labels > 0])
    peak = np.zeros(int(labels.max()) + 1)
    if ids.size:
        peak[ids] = ndi.maximum(distance, labels, ids)
    scaled = np.where(labels > 0, distance / np.maximum(peak[labels], 1), 0.0)
    return np.stack([labels > 0, scaled]).astype(np.float32)


def split_validation(
    pairs: Sequence[Pair],
    *,
    fraction: float,
    seed: int = 0,
    by: Literal["pairs", "strips"] = "pairs",
) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``fraction`` of the data for validation.

    ``by="pairs"``: whole pairs (at least one), chosen by ``seed``; a single pair is split in
    space instead. ``by="strips"``: the last ``fraction`` of every pair's longest axis, so that
    every image is trained on and validated on (with few images, holding one out would leave
    too little to train on, or hold out the image a leave-one-out test keeps for itself).

    Examples
    --------
    >>> pair = (np.zeros((1, 10, 20)), np.zeros((10, 20), int))
    >>> train, val = split_validation([pair], fraction=0.25)
    >>> train[0][0].shape, val[0][1].shape
    ((1, 10, 15), (10, 5))
    >>> other = (np.zeros((1, 40, 8)), np.zeros((40, 8), int))
    >>> train, val = split_validation([pair, other], fraction=0.25, by="strips")
    >>> [t[1].shape for t in train], [v[1].shape for v in val]
    ([(10, 15), (30, 8)], [(10, 5), (10, 8)])
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` ({fraction}) must be in (0, 1)")
    if by not in ("pairs", "strips"):
        raise ValueError(f"`by` ({by!r}) must be 'pairs' or 'strips'")
    if by == "pairs" and len(pairs) >= 2:
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_val = max(1, round(fraction * len(pairs)))
        return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]
    train, val = [], []
    for image, labels in pairs:
        axis = int(np.argmax(labels.shape))
        cut = labels.shape[axis] - max(1, round(fraction * labels.shape[axis]))
        head = [slice(None)] * labels.ndim
        tail = [slice(None)] * labels.ndim
        head[axis], tail[axis] = slice(0, cut), slice(cut, None)
        train.append((image[(slice(None), *head)], labels[tuple(head)]))
        val.append((image[(slice(None), *tail)], labels[tuple(tail)]))
    return train, val


def data_fingerprint(pairs: Sequence[Pair]) -> str:
    """SHA-256 of the training arrays (shapes, dtypes and bytes), for the model card."""
    digest = hashlib.sha256()
    for image, labels in pairs:
        for array in (np.ascontiguousarray(image), np.ascontiguousarray(labels)):
            digest.update(f"{array.dtype}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class _Prepared:
    image: np.ndarray
    targets: np.ndarray
    foreground: np.ndarray  # coordinates of foreground pixels, (n, ndim)
    flows: bool = False  # targets lead with flow vectors: flips and turns rotate them too


def _prepare(pairs: Sequence[Pair], card: ModelCard, patch: tuple[int, ...]) -> list[_Prepared]:
    prepared = []
    for i, (image, labels) in enumerate(pairs):
        if image.ndim != card.spatial_dims + 1 or image.shape[1:] != labels.shape:
            raise ModelError(
                f"training pair {i}: image {image.shape} and labels {labels.shape} must be "
                f"(c, *spatial) and (*spatial) with {card.spatial_dims} spatial axes"
            )
        if image.shape[0] != len(card.channels):
            raise ModelError(
                f"training pair {i} has {image.shape[0]} channels, the card {len(card.channels)}"
            )
        norm = normalize_image(image, card.channels, item_statistics(image, card.channels))
        targets = make_targets(labels, card.head)
        if card.head == "semantic" and targets.max(initial=0) >= len(card.classes):
            raise ModelError(
                f"training pair {i} has class id {targets.max()}, the card names "
                f"{len(card.classes)} classes"
            )
        # Pad up to the patch (after the data): zeros, background.
        pads = [(0, max(p - n, 0)) for p, n in zip(patch, labels.shape, strict=True)]
        norm = np.pad(norm, [(0, 0), *pads])
        targets = np.pad(targets, [(0, 0)] * (targets.ndim - len(pads)) + pads)
        foreground = np.argwhere(np.pad(labels, pads) > 0)
        prepared.append(_Prepared(norm, targets, foreground, flows=card.head == "flows"))
    return prepared


# The last prepared training data, kept between calls in one process: the train flow runs
# one epoch per call (per task), and normalising hundreds of images and drawing their flow
# targets takes minutes. Keyed by the run's identity (data fingerprint, card, config).
_PREPARED: dict[str, list[_Prepared]] = {}


def _prepared(
    pairs: Sequence[Pair], card: ModelCard, patch: tuple[int, ...], run: dict[str, object]
) -> list[_Prepared]:
    key = json.dumps(run, sort_keys=True)
    if key not in _PREPARED:
        _PREPARED.clear()  # one run at a time: the previous run's arrays are let go first
        _PREPARED[key] = _prepare(pairs, card, patch)
    return _PREPARED[key]


def _sampling_weights(data: list[_Prepared], sample_by: str) -> np.ndarray | None:
    """Each image's chance to give a patch (None: all equal, drawn as before)."""
    if sample_by == "images":
        return None
    area = np.array([item.image[0].size for item in data], dtype=np.float64)
    return area / area.sum()


def _sample_batch(
    data: list[_Prepared], patch: tuple[int, ...], config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    ndim = len(patch)
    weights = _sampling_weights(data, config.sample_by)
    for _ in range(config.batch_size):
        item = data[
            rng.integers(len(data)) if weights is None else rng.choice(len(data), p=weights)
        ]
        shape = item.image.shape[1:]
        zoom = 1.0
        if config.augment and config.zoom != (1.0, 1.0):
            zoom = float(np.exp(rng.uniform(*np.log(config.zoom))))
        # The window read from the item: ``patch / zoom`` pixels, resized to ``patch`` below.
        window = tuple(min(n, max(1, round(p / zoom))) for p, n in zip(patch, shape, strict=True))
        if len(item.foreground) and rng.random() < config.foreground_fraction:
            centre = item.foreground[rng.integers(len(item.foreground))]
            start = [
                int(np.clip(c - w // 2, 0, n - w))
                for c, w, n in zip(centre, window, shape, strict=True)
            ]
        else:
            start = [int(rng.integers(n - w + 1)) for w, n in zip(window, shape, strict=True)]
        box = tuple(slice(s, s + w) for s, w in zip(start, window, strict=True))
        x = item.image[(slice(None), *box)]
        y = item.targets[(Ellipsis, *box)]  # type: ignore[arg-type]
        if window != patch:
            shrink = zoom < 1  # the window is larger than the patch: smooth before sampling
            x = resize(x, (x.shape[0], *patch), order=1, anti_aliasing=shrink, preserve_range=True)
            lead = y.shape[: y.ndim - ndim]
            y = resize(y, (*lead, *patch), order=0, anti_aliasing=False, preserve_range=True)
            y = y.astype(item.targets.dtype)
        if config.augment:
            for axis in range(ndim):
                if rng.random() < 0.5:
                    x = np.flip(x, axis - ndim)
                    y = flip_flows(y, axis - ndim) if item.flows else np.flip(y, axis - ndim)
            k = int(rng.integers(4)) if patch[-1] == patch[-2] else 2 * int(rng.integers(2))
            x = np.rot90(x, k, axes=(-2, -1))
            y = rotate_flows(y, k) if item.flows else np.rot90(y, k, axes=(-2, -1))
            scale = rng.uniform(0.8, 1.2, size=(x.shape[0],) + (1,) * ndim)
            shift = rng.uniform(-0.1, 0.1, size=(x.shape[0],) + (1,) * ndim)
            x = x * scale + shift
            if config.gamma != (1.0, 1.0):  # on the positive part of the normalised values
                gamma = float(np.exp(rng.uniform(*np.log(config.gamma))))
                x = np.where(x > 0, np.abs(x) ** gamma, x)
            if config.noise > 0:
                x = x + rng.normal(0.0, rng.uniform(0, config.noise), size=x.shape)
        images.append(np.ascontiguousarray(x, dtype=np.float32))
        targets.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def _loss(logits: torch.Tensor, targets: torch.Tensor, head: Head) -> torch.Tensor:
    """Soft Dice + cross-entropy (the distance head: + mean squared error of the distance;
    the flow head: half the flows' mean squared error + the foreground's binary
    cross-entropy, as Cellpose trains)."""
    spatial = tuple(range(2, logits.ndim))
    if head == "flows":
        flows = F.mse_loss(logits[:, :-1], targets[:, :-1]) / 2
        return flows + F.binary_cross_entropy_with_logits(logits[:, -1], targets[:, -1])
    if head == "foreground_distance":
        foreground, distance = targets[:, 0], targets[:, 1]
        probability = torch.sigmoid(logits[:, 0])
        dims = tuple(range(1, probability.ndim))
        overlap = (probability * foreground).sum(dims)
        dice = 1 - (2 * overlap + 1) / (probability.sum(dims) + foreground.sum(dims) + 1)
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], foreground)
        return bce + dice.mean() + F.mse_loss(logits[:, 1], distance)
    probability = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(targets, logits.shape[1]).movedim(-1, 1).to(probability.dtype)
    overlap = (probability * one_hot).sum(spatial)
    dice = 1 - (2 * overlap + 1) / (probability.sum(spatial) + one_hot.sum(spatial) + 1)
    return F.cross_entropy(logits, targets) + dice.mean()


def foreground_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two masks (1.0 when both are empty).

    Examples
    --------
    >>> foreground_iou(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    0.3333333333333333
    """
    predicted, truth = np.asarray(predicted) > 0, np.asarray(truth) > 0
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


def predict_mask(
    model: torch.nn.Module, image: np.ndarray, card: ModelCard, *, batch_size: int = 4
) -> np.ndarray:
    """The model's class map (semantic, boundary heads) or foreground mask (distance head)
    for a raw ``image``, normalised with its own statistics and tiled as the card says."""
    return _mask(_predict(model, image, card, batch_size=batch_size), card)


def _predict(
    model: torch.nn.Module, image: np.ndarray, card: ModelCard, *, batch_size: int
) -> np.ndarray:
    """The blended whole-image output: class probabilities, or the distance head's logit
    and distance."""
    norm = normalize_image(image, card.channels, item_statistics(image, card.channels))
    return predict_image(
        model,
        norm,
        tile=card.tile,
        overlap=card.overlap,
        window=card.window,
        activation=card.activation,
        batch_size=batch_size,
    )


def _mask(out: np.ndarray, card: ModelCard) -> np.ndarray:
    if card.head == "foreground_distance":
        return (out[0] > 0).astype(np.int64)  # logit > 0 is probability > 0.5
    if card.head == "flows":
        return (out[-1] > 0).astype(np.int64)
    return np.asarray(out.argmax(0))


# Probabilities are clamped here before their log: a blended probability of exactly 0
# (float32 underflow of the softmax) would make the cross-entropy infinite.
_TINY = 1e-7


def _score(
    model: torch.nn.Module, pairs: Sequence[Pair], card: ModelCard, config: TrainConfig
) -> tuple[float, float]:
    """The validation score (``config.select_by``: mean foreground IoU over the pairs, over
    the foreground classes for a semantic head, or mean AP50 of the instances) and the mean
    training loss of the whole-image predictions (the blended probabilities' log stands for
    the logits: their softmax is the same probabilities)."""
    scores, losses = [], []
    for image, labels in pairs:
        out = _predict(model, image, card, batch_size=config.batch_size)
        predicted = _mask(out, card)
        if config.select_by == "ap50":
            scores.append(_ap50(out, labels, config.instances))
        elif card.head == "semantic":
            scores += [
                foreground_iou(predicted == k, labels == k) for k in range(1, len(card.classes))
            ]
        else:
            scores.append(foreground_iou(predicted > 0, labels > 0))
        logits = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None]
        if card.activation == "softmax":
            logits = logits.clamp_min(_TINY).log()
        targets = torch.from_numpy(make_targets(labels, card.head))[None]
        losses.append(float(_loss(logits, targets, card.head)))
    return float(np.mean(scores)), float(np.mean(losses))


def _ap50(out: np.ndarray, labels: np.ndarray, steps: Sequence[Mapping[str, Any]]) -> float:
    """AP50 of the instances ``steps`` make of one whole-image output against ``labels``
    (the share matched at IoU > 0.5 of predicted + reference - matched objects); 0 where
    the steps refuse the output (an early epoch's flows whose paths run past
    flow_dynamics' ``max_travel``: a model that cannot be run with these steps)."""
    # Imported here: the engine imports segflow.models.
    from segflow.engine.api import segment
    from segflow.evaluate import block_overlap, instance_scores

    try:
        found = np.asarray(segment(out, steps, channel_axis=0, n_threads=1))
    except ValueError:
        return 0.0
    return float(instance_scores(block_overlap(found, labels, instances=True))["ap50"])


def _save_state(path: Path, state: dict[str, object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split(
    pairs: Sequence[Pair], validation: Sequence[Pair] | None, config: TrainConfig
) -> tuple[list[Pair], list[Pair]]:
    if validation is None:
        return split_validation(
            pairs, fraction=config.validation_fraction, seed=config.seed, by=config.validation_split
        )
    return list(pairs), list(validation)


def _run_identity(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    card: ModelCard,
    config: TrainConfig,
    patch: tuple[int, ...],
) -> dict[str, object]:
    """What a saved run must match to be resumed (``out_dir/last/run.json``), as JSON."""
    settings = {**asdict(config), "patch": list(patch)}
    # Defaults added later stay out: runs saved before them resume.
    for key, default in (("sample_by", "images"), ("select_by", "foreground_iou")):
        if settings[key] == default:
            del settings[key]
    if not settings["instances"]:
        del settings["instances"]
    run = {
        "card": json.loads(card.identity_json()),
        "config": settings,
        "data_fingerprint": data_fingerprint([*train_pairs, *val_pairs]),
    }
    return dict(json.loads(json.dumps(run)))


# One difference between a saved run and a new call: section ("card", "config" or
# "data_fingerprint"), dotted key within it ("" for the data), saved value, new value.
RunChange = tuple[str, str, object, object]


def _changes(saved: object, now: object, section: str = "", key: str = "") -> list[RunChange]:
    """The leaves where ``saved`` and ``now`` (JSON values) differ, in key order."""
    if isinstance(saved, dict) and isinstance(now, dict):
        found: list[RunChange] = []
        for name in sorted(set(saved) | set(now)):
            if not section:  # the top level names the section
                found += _changes(saved.get(name), now.get(name), name, "")
            else:
                path = f"{key}.{name}" if key else str(name)
                found += _changes(saved.get(name), now.get(name), section, path)
        return found
    return [] if saved == now else [(section, key, saved, now)]


def describe_change(change: RunChange) -> str:
    """One difference in words: ``"batch_size 2, now 4"``, ``"the data"``.

    Examples
    --------
    >>> describe_change(("config", "batch_size", 2, 4))
    'config batch_size 2, now 4'
    >>> describe_change(("data_fingerprint", "", "ab12", "cd34"))
    'the data (images and labels)'
    """
    section, key, saved, now = change
    if section == "data_fingerprint":
        return "the data (images and labels)"
    return f"{section} {key} {json.dumps(saved)}, now {json.dumps(now)}"


def resume_changes(
    pairs: Sequence[Pair],
    *,
    card: ModelCard,
    out_dir: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    validation: Sequence[Pair] | None = None,
) -> list[RunChange]:
    """How the run saved in ``out_dir/last`` differs from what :func:`train_model` with
    these arguments would train (empty when they match or nothing is saved): what makes
    ``train_model(..., resume=True)`` refuse, checked without training.

    Examples
    --------
    >>> import tempfile
    >>> card = ModelCard(name="toy", architecture={"name": "segnet", "params": {"features": [4]}},
    ...                  spatial_dims=2, channels=[{"name": "x"}], classes=["bg", "fg"],
    ...                  tile=(16, 16))
    >>> pair = (np.zeros((1, 16, 16), np.float32), np.zeros((16, 16), np.int64))
    >>> config = TrainConfig(batch_size=1, steps_per_epoch=1, max_epochs=1)
    >>> with tempfile.TemporaryDirectory() as out:
    ...     _ = train_model([pair], card=card, out_dir=out, config=config)
    ...     other = TrainConfig(batch_size=2, steps_per_epoch=1, max_epochs=1)
    ...     resume_changes([pair], card=card, out_dir=out, config=other)
    [('config', 'batch_size', 1, 2)]
    """
    run_file = Path(out_dir) / "last" / RUN_FILE
    if not (Path(out_dir) / "last" / STATE_FILE).is_file() or not run_file.is_file():
        return []
    patch = check_tile(card.network_spec(), config.patch or card.tile)
    train_pairs, val_pairs = _split(pairs, validation, config)
    run = _run_identity(train_pairs, val_pairs, card, config, patch)
    return _changes(json.loads(run_file.read_text()), run)


def train_model(
    pairs: Sequence[Pair],
    *,
    card: ModelCard,
    out_dir: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    validation: Sequence[Pair] | None = None,
    callback: Callable[[EpochReport], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the network ``card`` describes; write ``out_dir/best`` and ``out_dir/last``.

    Parameters
    ----------
    pairs : sequence of (image, labels)
        Training data in memory (see the module docstring for axes and label meaning).
    card : ModelCard
        The model to train: architecture, channels, head, tile. Its training section and
        metrics are filled in on the saved checkpoint (data fingerprint, epochs, seed, the
        validation score ``val_foreground_iou`` or ``val_ap50``, as ``config.select_by``).
    out_dir : path
        Where ``best/`` (a checkpoint) and ``last/`` (the resumable state) go.
    config : TrainConfig
    validation : sequence of (image, labels), optional
        Pairs to score each epoch; by default :func:`split_validation` of ``pairs``.
    callback : callable, optional
        Called with an :class:`EpochReport` after each epoch, once its state is saved.
    on_step : callable, optional
        Called as ``on_step(epoch, step, steps, mean_loss)`` after every optimiser step
        (``epoch`` counts from 1, ``mean_loss`` over the epoch's steps so far), and once as
        ``on_step(epoch, steps, steps, mean_loss)`` before validation starts.
    resume : bool
        Continue the run saved in ``out_dir/last`` (same data, card and config, else an
        error); without a saved run, start afresh.
    stop_after : int, optional
        Return after this many epochs of this call (the run stays resumable): the train
        flow runs one epoch per task this way. The result's ``finished`` says whether the
        run is over.

    Returns
    -------
    TrainResult

    Examples
    --------
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> labels = (rng.random((32, 32)) > 0.7).astype(np.int64)
    >>> image = (labels + rng.normal(0, 0.3, labels.shape))[None].astype(np.float32)
    >>> card = ModelCard(name="toy", architecture={"name": "segnet", "params": {"features": [4]}},
    ...                  spatial_dims=2, channels=[{"name": "x"}], classes=["bg", "fg"],
    ...                  tile=(16, 16))
    >>> config = TrainConfig(batch_size=2, steps_per_epoch=2, max_epochs=2)
    >>> with tempfile.TemporaryDirectory() as out:
    ...     result = train_model([(image, labels)], card=card, out_dir=out, config=config)
    >>> result.epochs, 0.0 <= result.best_score <= 1.0
    (2, True)
    """
    out = Path(out_dir)
    patch = check_tile(card.network_spec(), config.patch or card.tile)
    if not pairs:
        raise ModelError("`pairs` is empty: training needs at least one (image, labels) pair")
    if config.select_by == "ap50" and card.head == "semantic":
        raise ModelError(
            "`select_by` ap50 scores instances: the card's head is semantic (classes, no "
            "instances); use foreground_iou or an instance head (flows, foreground_distance)"
        )
    train_pairs, val_pairs = _split(pairs, validation, config)
    run = _run_identity(train_pairs, val_pairs, card, config, patch)
    last = out / "last"
    last.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_network(card.network_spec())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    progress = _start_or_resume(out, run, model, optimizer, resume=resume)
    data = _prepared(train_pairs, card, patch, run)
    ran = 0
    while progress.epoch < config.max_epochs and progress.bad_epochs < config.patience:
        if stop_after is not None and ran >= stop_after:
            break
        ran += 1
        losses = _train_epoch(model, optimizer, data, patch, card, config, progress.epoch, on_step)
        model.eval()
        report = _end_epoch(progress, model, val_pairs, card, config, losses, out=out, run=run)
        _save_state(last / STATE_FILE, progress.state(model, optimizer))
        if callback is not None:
            callback(report)
    return TrainResult(
        best=out / "best",
        last=last,
        best_score=progress.best_score,
        best_epoch=progress.best_epoch,
        epochs=progress.epoch,
        stopped_early=progress.bad_epochs >= config.patience,
        history=progress.history,
        finished=progress.epoch >= config.max_epochs or progress.bad_epochs >= config.patience,
    )


@dataclass
class _Progress:
    """Where a training run stands: epochs done, the best validation score and its epoch,
    epochs since it last improved, and every epoch's report."""

    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[EpochReport] = field(default_factory=list)

    def state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
        """What ``last/training_state.pt`` holds: weights, optimiser and these counters."""
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": [list(asdict(h).values()) for h in self.history],
        }


def _start_or_resume(
    out: Path,
    run: dict[str, object],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    resume: bool,
) -> _Progress:
    """Load the state saved in ``out/last`` into ``model`` and ``optimizer`` (with
    ``resume``, when there is one: refused when its run identity differs from ``run``), or
    start afresh by writing ``run`` there."""
    last = out / "last"
    state_path = last / STATE_FILE
    if not (resume and state_path.is_file()):
        # A run started afresh over a saved one: its state goes first, so that a stop
        # before the first epoch is saved cannot leave the old weights under the new run.
        state_path.unlink(missing_ok=True)
        (last / RUN_FILE).write_text(json.dumps(run, indent=2))
        return _Progress()
    if changes := _changes(json.loads((last / RUN_FILE).read_text()), run):
        changed = sorted({section for section, *_ in changes})
        details = "; ".join(describe_change(c) for c in changes[:3])
        raise ModelError(
            f"cannot resume the run in '{out}': its {', '.join(changed)} differ from "
            f"this call's ({details}); use another out_dir or resume=False"
        )
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return _Progress(
        epoch=int(state["epoch"]),
        best_score=float(state["best_score"]),
        best_epoch=int(state["best_epoch"]),
        bad_epochs=int(state["bad_epochs"]),
        history=[EpochReport(*row) for row in state["history"]],
    )


def _train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[_Prepared],
    patch: tuple[int, ...],
    card: ModelCard,
    config: TrainConfig,
    epoch: int,
    on_step: Callable[[int, int, int, float], None] | None,
) -> list[float]:
    """Run epoch ``epoch + 1``'s optimiser steps (seeded by ``(seed, epoch)``, at its
    decayed learning rate); return each step's loss."""
    rng = np.random.default_rng([config.seed, epoch])
    torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout, if the network has any
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * (1 - epoch / config.max_epochs) ** 0.9
    model.train()
    losses: list[float] = []
    for _ in range(config.steps_per_epoch):
        x, y = _sample_batch(data, patch, config, rng)
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model(x), y, card.head)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(epoch + 1, len(losses), config.steps_per_epoch, float(np.mean(losses)))
    return losses


def _end_epoch(
    progress: _Progress,
    model: torch.nn.Module,
    val_pairs: Sequence[Pair],
    card: ModelCard,
    config: TrainConfig,
    losses: Sequence[float],
    *,
    out: Path,
    run: dict[str, object],
) -> EpochReport:
    """Score the epoch just trained on the validation pairs, save ``out/best`` when it
    improved on the best so far, and count it in ``progress``; return its report."""
    score, val_loss = _score(model, val_pairs, card, config)
    progress.epoch += 1
    improved = score > progress.best_score + config.min_delta
    if improved:
        progress.best_score, progress.best_epoch, progress.bad_epochs = score, progress.epoch, 0
        best_card = _trained_card(card, score, str(run["data_fingerprint"]), progress.epoch, config)
        save_checkpoint(out / "best", model, best_card)
    else:
        progress.bad_epochs += 1
    report = EpochReport(
        progress.epoch, float(np.mean(losses)), score, progress.best_score, improved, val_loss
    )
    progress.history.append(report)
    return report


def _trained_card(
    card: ModelCard, score: float, fingerprint: str, epochs: int, config: TrainConfig
) -> ModelCard:
    """``card`` with its validation score and training section (data fingerprint, epochs,
    seed) filled in: the card saved with the best checkpoint."""
    return card.model_copy(
        update={
            "metrics": {**card.metrics, f"val_{config.select_by}": score},
            "training": TrainingCard(
                **{
                    **card.training.model_dump(),
                    "data_fingerprint": fingerprint,
                    "epochs": epochs,
                    "seed": config.seed,
                }
            ),
        }
    )

"""Training: real learning on the bundled nuclei, exact resumption, targets, sampling, errors."""

from __future__ import annotations

import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
import yaml

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import load_checkpoint
from segflow.models.train import (
    EpochReport,
    TrainConfig,
    _prepare,
    _sample_batch,
    describe_change,
    foreground_iou,
    make_targets,
    predict_mask,
    resume_changes,
    split_validation,
    train_model,
)

torch.set_num_threads(1)  # the test machine is shared, and one thread keeps runs reproducible

NUCLEI = Path(__file__).parents[1] / "data" / "nuclei" / "003cee89357d9fe1"


def _nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The bundled DSB 2018 nuclei image (one grey channel; R = G = B) and its instances."""
    image = iio.imread(NUCLEI / "image.png")[..., 0][np.newaxis].astype(np.float32)
    return image, tifffile.imread(NUCLEI / "labels.tif").astype(np.int64)


def _card(head: str = "semantic", features: tuple[int, ...] = (8, 16, 32)) -> ModelCard:
    return ModelCard.model_validate(
        {
            "name": "nuclei",
            "architecture": {"name": "segnet", "params": {"features": list(features)}},
            "spatial_dims": 2,
            "channels": [{"name": "dapi"}],
            "head": head,
            "classes": ["background", "nucleus"] if head == "semantic" else [],
            "tile": (64, 64),
            "training": {"data": "DSB 2018 image 003cee89", "licence": "CC0-1.0"},
        }
    )


# Measured (torch 2.13 CPU, one thread, seed 0): the best epoch (14 of 15) scored 0.864 on its
# validation strip and 0.881 foreground IoU on the 96 columns it never saw, after 10-15 s of
# training on this shared 2-core machine (validation of each epoch included). The floor leaves
# room for other CPUs' rounding changing the run; predicting all foreground would score 0.054
# (the nuclei's share of the unseen part), all background 0.
NUCLEI_IOU_FLOOR = 0.75


def test_trains_on_nuclei_and_segments_an_unseen_part(tmp_path: Path) -> None:
    image, instances = _nuclei()
    labels = (instances > 0).astype(np.int64)
    seen, unseen = (slice(None), slice(0, 160)), (slice(None), slice(160, None))
    config = TrainConfig(batch_size=8, steps_per_epoch=10, max_epochs=15, seed=0)
    reports: list[EpochReport] = []
    result = train_model(
        [(image[(slice(None), *seen)], labels[seen])],
        card=_card(),
        out_dir=tmp_path,
        config=config,
        callback=reports.append,
    )
    assert [r.epoch for r in reports] == list(range(1, result.epochs + 1))
    assert reports[-1].loss < reports[0].loss
    best = load_checkpoint(result.best)
    assert best.card is not None
    assert best.card.metrics["val_foreground_iou"] == result.best_score
    assert best.card.training.epochs == result.best_epoch
    assert (
        best.card.training.licence == "CC0-1.0" and len(best.card.training.data_fingerprint) == 64
    )
    predicted = predict_mask(best.module, image[(slice(None), *unseen)], best.card)
    assert foreground_iou(predicted, labels[unseen]) >= NUCLEI_IOU_FLOOR


class _Killed(Exception):
    pass


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    image, instances = _nuclei()
    pair = (image[:, :96, :96], instances[:96, :96])
    card = _card("foreground_boundary", features=(4, 8))
    config = TrainConfig(batch_size=4, steps_per_epoch=3, max_epochs=4, patch=(32, 32), seed=3)
    whole = train_model([pair], card=card, out_dir=tmp_path / "whole", config=config)

    def kill_after_two(report: EpochReport) -> None:
        if report.epoch == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train_model([pair], card=card, out_dir=tmp_path / "split", config=config,
                    callback=kill_after_two)  # fmt: skip
    seen: list[int] = []
    resumed = train_model(
        [pair],
        card=card,
        out_dir=tmp_path / "split",
        config=config,
        callback=lambda r: seen.append(r.epoch),
        resume=True,
    )
    assert seen == [3, 4]  # epochs 1-2 are not redone
    assert resumed.history == whole.history
    # Bit for bit: same weights, optimiser moments and best checkpoint as the run left alone.
    a = torch.load(whole.last / "training_state.pt", weights_only=True)
    b = torch.load(resumed.last / "training_state.pt", weights_only=True)
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=0)
    for key, moments in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][key], moments, rtol=0, atol=0)
    assert load_checkpoint(resumed.best).hash == load_checkpoint(whole.best).hash
    # Resuming a finished run does nothing more; resuming with other settings is refused.
    again = train_model([pair], card=card, out_dir=tmp_path / "split", config=config, resume=True)
    assert again.history == whole.history
    other = TrainConfig(batch_size=4, steps_per_epoch=3, max_epochs=6, patch=(32, 32), seed=3)
    refusal = (
        f"cannot resume the run in '{tmp_path / 'split'}': its config differ from this call's "
        "(config max_epochs 4, now 6); use another out_dir or resume=False"
    )
    with pytest.raises(ModelError, match=re.escape(refusal)):
        train_model([pair], card=card, out_dir=tmp_path / "split", config=other, resume=True)
    # The same differences, found without training; other data is named as such.
    assert resume_changes([pair], card=card, out_dir=tmp_path / "split", config=other) == [
        ("config", "max_epochs", 4, 6)
    ]
    flipped = (pair[0][:, ::-1].copy(), pair[1][::-1].copy())
    changes = resume_changes([flipped], card=card, out_dir=tmp_path / "split", config=config)
    assert [describe_change(c) for c in changes] == ["the data (images and labels)"]
    assert resume_changes([pair], card=card, out_dir=tmp_path / "split", config=config) == []
    assert resume_changes([pair], card=card, out_dir=tmp_path / "nothing", config=config) == []
    # The validation loss is measured every epoch.
    assert all(np.isfinite(h.val_loss) and h.val_loss > 0 for h in whole.history)

    # A run started afresh (--restart) over the saved one and stopped in its first epoch
    # leaves no saved state: the old run's weights are never resumed as the new run's.
    def kill_at_once(epoch: int, step: int, steps: int, loss: float) -> None:
        raise _Killed

    with pytest.raises(_Killed):
        train_model([pair], card=card, out_dir=tmp_path / "split", config=other,
                    on_step=kill_at_once)  # fmt: skip
    assert not (tmp_path / "split" / "last" / "training_state.pt").exists()
    assert resume_changes([pair], card=card, out_dir=tmp_path / "split", config=other) == []


def test_distance_head_trains(tmp_path: Path) -> None:
    image, instances = _nuclei()
    card = _card("foreground_distance", features=(4, 8))
    config = TrainConfig(batch_size=2, steps_per_epoch=2, max_epochs=1, patch=(32, 32))
    result = train_model([(image[:, :64, :64], instances[:64, :64])], card=card,
                         out_dir=tmp_path, config=config)  # fmt: skip
    assert result.epochs == 1 and np.isfinite(result.history[0].loss)
    assert load_checkpoint(result.best).card.activation == "none"  # type: ignore[union-attr]


def test_targets_per_head() -> None:
    labels = np.zeros((7, 9), np.int64)
    labels[1:6, 1:4] = 1
    labels[1:6, 4:8] = 2  # touching objects: the boundary separates them
    boundary = make_targets(labels, "foreground_boundary")
    assert boundary[3].tolist() == [0, 2, 1, 2, 2, 1, 1, 2, 0]
    distance = make_targets(labels, "foreground_distance")
    assert distance.shape == (2, 7, 9) and distance.dtype == np.float32
    np.testing.assert_array_equal(distance[0], labels > 0)
    assert distance[1].max() == 1.0 and (distance[1][labels == 0] == 0).all()
    with pytest.raises(ModelError, match=r"labels must be integers, got dtype float32"):
        make_targets(labels.astype(np.float32), "semantic")


def test_patches_favour_foreground() -> None:
    image, instances = _nuclei()
    data = _prepare([(image, instances)], _card("foreground_boundary"), (16, 16))
    rng = np.random.default_rng(0)
    biased = TrainConfig(batch_size=64, foreground_fraction=1.0)
    uniform = TrainConfig(batch_size=64, foreground_fraction=0.0, augment=False)
    _, y_biased = _sample_batch(data, (16, 16), biased, rng)
    _, y_uniform = _sample_batch(data, (16, 16), uniform, rng)
    assert (y_biased.flatten(1) > 0).any(1).all()  # every biased patch holds a nucleus
    assert (y_biased > 0).float().mean() > 2 * (y_uniform > 0).float().mean()


def test_patches_drawn_by_image_or_by_area() -> None:
    """sample_by "area": an image gives patches in proportion to its pixels (a 64^2 image
    beside a 16^2 one: 16 of 17 patches); "images": every image equally often. The default
    stays out of the run's identity, so runs saved before the setting resume."""
    from segflow.models.train import _run_identity

    rng = np.random.default_rng(0)
    pairs = [(rng.random((1, 16, 16)).astype(np.float32), np.zeros((16, 16), np.int64))]
    pairs.append((rng.random((1, 64, 64)).astype(np.float32) + 10, np.zeros((64, 64), np.int64)))
    card = _card("foreground_boundary")
    data = _prepare(pairs, card, (16, 16))
    share = {}
    for sample_by in ("images", "area"):
        config = TrainConfig(batch_size=400, sample_by=sample_by, augment=False)
        x, _ = _sample_batch(data, (16, 16), config, np.random.default_rng(1))
        share[sample_by] = float(np.mean([_from_second(patch, data) for patch in x.numpy()]))
    assert abs(share["images"] - 0.5) < 0.08
    assert abs(share["area"] - 16 / 17) < 0.05
    default = _run_identity(pairs, [], card, TrainConfig(), (16, 16))
    assert "sample_by" not in default["config"]  # type: ignore[operator]
    area = _run_identity(pairs, [], card, TrainConfig(sample_by="area"), (16, 16))
    assert area["config"]["sample_by"] == "area"  # type: ignore[index]


def _from_second(patch: np.ndarray, data: list) -> bool:  # type: ignore[type-arg]
    """Whether a 16^2 patch comes from the second (64^2) image: the first is one patch in
    size, so (without augmentation) each of its patches is the whole prepared image."""
    return not np.array_equal(patch, data[0].image)


def test_zoom_gamma_and_noise_augmentation() -> None:
    image, instances = _nuclei()
    data = _prepare([(image, instances)], _card("foreground_boundary"), (32, 32))
    plain = TrainConfig(batch_size=32, foreground_fraction=1.0, augment=False)
    _, y_plain = _sample_batch(data, (32, 32), plain, np.random.default_rng(0))
    # zoomed in 2x, a nucleus covers about 4x the pixels of a patch; zoomed out, a quarter
    mean_area = {}
    for zoom in (0.5, 2.0):
        config = TrainConfig(batch_size=32, foreground_fraction=1.0, zoom=(zoom, zoom))
        x, y = _sample_batch(data, (32, 32), config, np.random.default_rng(0))
        assert x.shape == (32, 1, 32, 32) and y.shape == (32, 32, 32) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= {0, 1, 2}  # nearest neighbour: classes stay
        mean_area[zoom] = float((y > 0).float().mean())
    assert mean_area[2.0] > 1.5 * float((y_plain > 0).float().mean()) > 2 * mean_area[0.5]
    # one patch each: the gamma draw moves the generator on for the next patch
    flat = TrainConfig(batch_size=1, augment=True, gamma=(1.0, 1.0))
    bent = TrainConfig(batch_size=1, augment=True, gamma=(3.0, 3.0), noise=0.0)
    x_flat, _ = _sample_batch(data, (32, 32), flat, np.random.default_rng(1))
    x_bent, _ = _sample_batch(data, (32, 32), bent, np.random.default_rng(1))
    positive = x_flat > 0
    torch.testing.assert_close(x_bent[positive], x_flat[positive] ** 3)
    noisy = TrainConfig(batch_size=1, augment=True, noise=0.2)
    x_noisy, _ = _sample_batch(data, (32, 32), noisy, np.random.default_rng(1))
    assert float((x_noisy - x_flat).std()) > 0.01
    with pytest.raises(ModelError, match=r"`zoom` \(2.0, 0.5\) must satisfy 0 < low <= high"):
        TrainConfig(zoom=(2.0, 0.5))


def test_split_and_input_errors(tmp_path: Path) -> None:
    pairs = [(np.zeros((1, 8, 8)), np.zeros((8, 8), np.int64)) for _ in range(5)]
    train, val = split_validation(pairs, fraction=0.2, seed=1)
    assert len(train) == 4 and len(val) == 1
    # strips: every pair is split along its longest axis, 6 + 2 rows of 8 (0.2 * 8 rounds to 2)
    train, val = split_validation(pairs, fraction=0.2, by="strips")
    assert [t[0].shape for t in train] == [(1, 6, 8)] * 5
    assert [v[1].shape for v in val] == [(2, 8)] * 5
    with pytest.raises(ValueError, match=r"`by` \('tiles'\) must be 'pairs' or 'strips'"):
        split_validation(pairs, fraction=0.2, by="tiles")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`fraction` \(1.0\) must be in \(0, 1\)"):
        split_validation(pairs, fraction=1.0)
    image, instances = _nuclei()
    card = _card()
    with pytest.raises(ModelError, match=r"training pair 0 has class id 36, the card names 2"):
        train_model([(image, instances)], card=card, out_dir=tmp_path)
    with pytest.raises(ModelError, match=r"training pair 0 has 3 channels, the card 1"):
        train_model([(np.repeat(image, 3, 0), instances > 0)], card=card, out_dir=tmp_path)
    with pytest.raises(ModelError, match=r"`pairs` is empty"):
        train_model([], card=card, out_dir=tmp_path)
    with pytest.raises(ModelError, match=r"`tile` \(30, 30\) must be a multiple of 8"):
        train_model([(image, instances)], card=card, out_dir=tmp_path,
                    config=TrainConfig(patch=(30, 30)))  # fmt: skip


def test_train_data_globs_value_map_and_crop(tmp_path: Path) -> None:
    from segflow.errors import ConfigError
    from segflow.train_config import find_pairs, parse_train_config, read_pairs

    (tmp_path / "image").mkdir()
    (tmp_path / "label").mkdir()
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    for k in range(12):
        iio.imwrite(tmp_path / "image" / f"{k}.png", (mask // 2 + k).astype(np.uint8))
        iio.imwrite(tmp_path / "label" / f"{k}.png", mask)
    model = {"architecture": {"name": "segnet"}, "spatial_dims": 2, "channels": [{"name": "em"}],
             "classes": ["membrane", "cell"], "tile": [8, 8]}  # fmt: skip
    data = {
        "images": ["image/[0-2].png", "image/1[01].png"],  # 0, 1, 2, 10, 11
        "references": "{dir}/../label/{stem}.png",
        "reference_values": {0: 0, 255: 1},
        "crop": [[None, 10], [12, None]],
    }
    config = parse_train_config({"data": data, "model": model, "output": "out"}, base_dir=tmp_path)
    pairs = find_pairs(config.data)
    assert [Path(image).stem for image, _ in pairs] == ["0", "1", "10", "11", "2"]
    data = read_pairs(pairs, reference_values={0: 0, 255: 1}, crop=config.data.crop)
    image, labels = data[2]
    assert image.shape == (1, 10, 18) and labels.shape == (10, 18)
    np.testing.assert_array_equal(labels, (mask[:10, 12:] == 255).astype(np.int64))
    np.testing.assert_array_equal(image[0], mask[:10, 12:] // 2 + 10)

    with pytest.raises(ConfigError, match=r"has the value\(s\) \[255\] that the map"):
        read_pairs(pairs[:1], reference_values={0: 0})
    with pytest.raises(ConfigError, match=r"data.crop: \[\[0, 5\]\] has 1 axes"):
        read_pairs(pairs[:1], crop=[[0, 5]])
    with pytest.raises(ConfigError, match=r"data.crop: .* is empty"):
        read_pairs(pairs[:1], crop=[[30, 40], [None, None]])


def test_train_data_one_mask_per_instance_and_exclude(tmp_path: Path) -> None:
    """The DSB2018 / BBBC038 layout: ID/images/ID.png and one PNG per nucleus in ID/masks/."""
    from segflow.errors import ConfigError
    from segflow.train_config import find_pairs, parse_train_config, read_pairs

    rng = np.random.default_rng(0)
    expected = {}
    for name in ("a1", "a2", "b1"):
        (tmp_path / name / "images").mkdir(parents=True)
        (tmp_path / name / "masks").mkdir()
        image = rng.integers(0, 255, (16, 20, 4), np.uint8)
        iio.imwrite(tmp_path / name / "images" / f"{name}.png", image)
        labels = np.zeros((16, 20), np.int64)
        for k, (y, x) in enumerate([(2, 3), (9, 12), (4, 14)], start=1):
            mask = np.zeros((16, 20), np.uint8)
            mask[y : y + 4, x : x + 5] = 255
            iio.imwrite(tmp_path / name / "masks" / f"m{k}.png", mask)
            labels[mask > 0] = k
        iio.imwrite(tmp_path / name / "masks" / "m4-empty.png", np.zeros((16, 20), np.uint8))
        expected[name] = labels
    model = {"architecture": {"name": "segnet"}, "spatial_dims": 2, "channels": [{"name": "luma"}],
             "head": "flows", "tile": [16, 16]}  # fmt: skip
    data = {"images": "*/images/*.png", "references": "{dir}/../masks/*.png", "channels": "luma",
            "exclude": ["a2", "zz*"]}  # fmt: skip
    config = parse_train_config({"data": data, "model": model, "output": "out"}, base_dir=tmp_path)
    pairs = find_pairs(config.data)
    assert [Path(image).stem for image, _ in pairs] == ["a1", "b1"]
    read = read_pairs(pairs, channels="luma")
    for (image, labels), name in zip(read, ["a1", "b1"], strict=True):
        assert image.shape == (1, 16, 20)
        np.testing.assert_array_equal(labels, expected[name])

    with pytest.raises(ConfigError, match=r"data.exclude: \['\*'\] leaves none"):
        find_pairs(config.data.model_copy(update={"exclude": ["*"]}))
    for mask in (tmp_path / "b1" / "masks").iterdir():
        mask.unlink()
    with pytest.raises(ConfigError, match=r"image .*b1.png' has no reference"):
        find_pairs(config.data)
    iio.imwrite(tmp_path / "b1" / "masks" / "m1.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match=r"mask .*m1.png' is \(8, 8\), its image \(16, 20\)"):
        read_pairs(find_pairs(config.data), channels="luma")


def _write_flow_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(3):
        item = folder / f"cell_{k}"
        item.mkdir(parents=True)
        labels = np.zeros((32, 32), np.uint16)
        labels[4:12, 5:13], labels[18:28, 16:24] = 1, 2
        grey = (labels > 0) * 180 + 20 + rng.integers(0, 20, (32, 32))
        tifffile.imwrite(item / "image.tif", grey.astype(np.uint8))
        tifffile.imwrite(item / "labels.tif", labels)


def test_epoch_tasks_read_and_prepare_the_data_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train flow runs one task per epoch in one process: the images are read and their targets
    drawn once, not once per epoch (hundreds of images take minutes), and read again when
    a file changes."""
    import segflow.models.train as train_module
    import segflow.train_config as train_config

    _write_flow_data(tmp_path / "data")
    config = {
        "name": "tiny-flows",
        "data": {"images": "data/*/image.tif", "references": "{dir}/labels.tif",
                 "channels": "luma", "validation": ["cell_2"]},
        "model": {"architecture": {"name": "segnet", "params": {"features": [4, 8]}},
                  "spatial_dims": 2, "channels": [{"name": "luma"}], "head": "flows",
                  "tile": [16, 16]},
        "training": {"batch_size": 2, "steps_per_epoch": 1, "max_epochs": 3, "seed": 1},
        "output": "model",
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    calls = {"read": 0, "prepare": 0}
    read, prepare = train_config._read_training_data, train_module._prepare

    def counted_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["read"] += 1
        return read(*args, **kwargs)

    def counted_prepare(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["prepare"] += 1
        return prepare(*args, **kwargs)

    monkeypatch.setattr(train_config, "_read_training_data", counted_read)
    monkeypatch.setattr(train_module, "_prepare", counted_prepare)
    cfg = train_config.load_train_config(path)
    for _ in range(2):
        train_config.train_from_config(cfg, stop_after=1)
    assert calls == {"read": 1, "prepare": 1}

    labels = tifffile.imread(tmp_path / "data" / "cell_0" / "labels.tif")
    labels[0, 0] = 3
    tifffile.imwrite(tmp_path / "data" / "cell_0" / "labels.tif", labels)
    with pytest.raises(Exception, match="data"):  # a saved run trained on other data
        train_config.train_from_config(cfg, stop_after=1)
    assert calls == {"read": 2, "prepare": 1}  # refused before preparing


FLOWS_STEP = {"op": "flow_dynamics", "niter": 50, "min_size": 0, "max_travel": 16}


def test_ap50_scores_instances_where_foreground_iou_cannot() -> None:
    """select_by ap50: two touching squares predicted as one object have a perfect foreground
    (IoU 1) and no instance matched (AP50 0); predicted apart, AP50 is 1."""
    from segflow.models.train import _ap50

    labels = np.zeros((40, 40), np.int64)
    labels[8:24, 6:20], labels[8:24, 20:34] = 1, 2
    merged = (labels > 0).astype(np.int64)
    apart, together = make_targets(labels, "flows"), make_targets(merged, "flows")
    for flows in (apart, together):
        assert foreground_iou(flows[-1] > 0, labels > 0) == 1
    assert _ap50(apart, labels, [FLOWS_STEP]) == 1.0
    assert _ap50(together, labels, [FLOWS_STEP]) == 0.0
    # Paths longer than max_travel (an untrained model's): such an output scores 0, and
    # the epoch is not chosen, rather than the training stopping.
    far = apart.copy()
    far[1] = 5.0  # every pixel flows right across the image
    assert _ap50(far, labels, [{**FLOWS_STEP, "max_travel": 4}]) == 0.0


def test_select_by_ap50_trains_and_names_its_metric(tmp_path: Path) -> None:
    """The best epoch's card carries val_ap50; the run identity records the choice (a run
    chosen by foreground IoU is not resumed as one chosen by AP50); bad settings fail early."""
    image, instances = _nuclei()
    pair = (image[:, :64, :64], instances[:64, :64])
    card = _card("flows", features=(4, 8))
    config = TrainConfig(batch_size=2, steps_per_epoch=1, max_epochs=2, patch=(32, 32),
                         select_by="ap50", instances=(FLOWS_STEP,))  # fmt: skip
    result = train_model([pair], card=card, out_dir=tmp_path, config=config, validation=[pair])
    saved = load_checkpoint(result.best).card
    assert set(saved.metrics) == {"val_ap50"}  # type: ignore[union-attr]
    assert saved.metrics["val_ap50"] == result.best_score  # type: ignore[union-attr]
    plain = TrainConfig(batch_size=2, steps_per_epoch=1, max_epochs=2, patch=(32, 32))
    changed = resume_changes([pair], card=card, out_dir=tmp_path, config=plain, validation=[pair])
    assert {key for _, key, *_ in changed} == {"select_by", "instances"}
    with pytest.raises(ModelError, match="needs `instances`"):
        TrainConfig(select_by="ap50")
    with pytest.raises(ModelError, match="head is semantic"):
        train_model([pair], card=_card(), out_dir=tmp_path / "s", config=config)


def test_train_config_instances_are_checked_as_pipeline_steps(tmp_path: Path) -> None:
    from segflow.errors import ConfigError
    from segflow.train_config import parse_train_config

    config = {
        "data": {"images": "data/*/image.tif", "references": "{dir}/labels.tif"},
        "model": {"architecture": {"name": "segnet", "params": {"features": [4, 8]}},
                  "spatial_dims": 2, "channels": [{"name": "luma"}], "head": "flows",
                  "tile": [16, 16]},
        "training": {"select_by": "ap50", "instances": [{"op": "flow_dynamics", "nitre": 5}]},
        "output": "model",
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"training.instances: .*nitre"):
        parse_train_config(config, base_dir=tmp_path)
    config["training"] = {"select_by": "ap50"}
    with pytest.raises(ConfigError, match="needs `instances`"):
        parse_train_config(config, base_dir=tmp_path)

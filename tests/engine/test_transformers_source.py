"""Hugging Face transformers semantic segmentation folders equal the model's own forward.

A tiny SegFormer is built and saved here with ``save_pretrained`` (no download). The native
runtime is the model's forward on the processor's pixel values, its logits upsampled
bilinearly to the image (as ``post_process_semantic_segmentation``) and a softmax; the image
is the processor's size, so one tile covers it. Tolerance 1e-5: the same float32 network,
the normalisation computed in another order (``(x - mean / r) / (std / r)`` against
``(x * r - mean) / std``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _layouts import layouts
from hypothesis import HealthCheck, given, settings

from segflow import segment
from segflow.errors import ModelError
from segflow.models.card import item_statistics, normalize_image
from segflow.models.inference import predict_image
from segflow.models.sources import describe_model, load_source

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more
LABELS = {0: "background", 1: "road", 2: "building"}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def segformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "segformer"
    config = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
        mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.SegformerForSemanticSegmentation(config).eval().save_pretrained(folder)
    processor = {"do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": MEAN, "image_std": STD, "rescale_factor": 1 / 255,
                 "size": {"height": 64, "width": 64},
                 "image_processor_type": "SegformerImageProcessor"}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def _native(folder: Path, image: np.ndarray) -> np.ndarray:
    """The model's own forward on ``image`` (3, 64, 64), 0..255, upsampled, softmax."""
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(
        str(folder), local_files_only=True
    ).eval()
    mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
    pixels = ((image / 255.0 - mean) / std).astype(np.float32)[None]
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(pixels)).logits
        up = torch.nn.functional.interpolate(logits, size=image.shape[1:], mode="bilinear",
                                             align_corners=False)  # fmt: skip
    return torch.softmax(up, dim=1)[0].numpy()


def _segflow(folder: Path, image: np.ndarray) -> np.ndarray:
    card = describe_model(folder).card
    x = normalize_image(image, card.channels, item_statistics(image, card.channels))
    loaded = load_source(folder, card, batch_size=2)
    return predict_image(loaded.module, x, tile=card.tile, overlap=card.overlap,
                         window=card.window, activation=card.activation, batch_size=2)  # fmt: skip


def _step(path: Path, **params: Any) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "foreground", **params}  # fmt: skip


def test_the_card_comes_from_config_and_processor(segformer: Path) -> None:
    card = describe_model(segformer).card
    assert card.classes == ("background", "road", "building") and card.tile == (64, 64)
    assert [c.name for c in card.channels] == ["red", "green", "blue"]
    norm = card.channels[0].normalization
    assert norm.method == "fixed" and norm.low == pytest.approx(0.485 * 255)


def test_segflow_equals_the_model_forward(segformer: Path) -> None:
    image = np.random.default_rng(0).uniform(0, 255, (3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(_segflow(segformer, image), _native(segformer, image),
                               rtol=0, atol=1e-5)  # fmt: skip
    out = segment(image, [_step(segformer)], channel_axis=0)
    np.testing.assert_allclose(out, 1.0 - _native(segformer, image)[0], rtol=0, atol=1e-5)


@given(layout=layouts(2, max_side=100))
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_blockwise_equals_whole_item_on_every_layout(
    segformer: Path, layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    shape, blocks, seed = layout
    image = np.random.default_rng(seed).uniform(0, 255, (3, *shape)).astype(np.float32)
    out = segment(image, [_step(segformer)], block_shape=blocks, channel_axis=0)
    # float64 blending of the same tiles in the same order
    np.testing.assert_allclose(out, 1.0 - _segflow(segformer, image)[0], rtol=0, atol=1e-5)


def test_remote_code_and_other_heads_are_refused(segformer: Path, tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    shutil.copytree(segformer, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(ModelError, match=r"auto_map\); segflow does not run downloaded code"):
        describe_model(folder)
    config["architectures"] = ["SegformerForImageClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"has no \.\.\.ForSemanticSegmentation model"):
        describe_model(folder)
    config["architectures"] = ["SegformerForSemanticSegmentation"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"has no model.safetensors or pytorch_model.bin"):
        describe_model(folder)

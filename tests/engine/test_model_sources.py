"""Model sources: ONNX graphs and MONAI bundles run by the model step equal their own runtimes.

Every model here is built and saved by the test (no downloads). Tolerances:

* ONNX vs the same torch network: 1e-5 on softmax probabilities (ONNX Runtime's kernels
  round differently from torch's in float32, a few 1e-7 per value; blending averages them).
* ONNX through segflow vs ONNX Runtime run directly over the same tiles, blended here: 1e-6.
* MONAI bundle vs its own pipeline (ConfigParser's preprocessing, inferer and postprocessing
  on the bundle's network): 1e-5 (MONAI accumulates its blend in float32, segflow in float64).
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _layouts import layouts
from hypothesis import HealthCheck, given, settings

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import ConfigError, ModelError, PlanError
from segflow.models.card import item_statistics, normalize_image
from segflow.models.inference import predict_image
from segflow.models.sources import describe_model, load_source
from segflow.models.tiling import plan_tiles, tile_weights

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more


def _net(ndim: int, channels: int = 1, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(
        conv(channels, 4, 3, padding=1), torch.nn.ReLU(), conv(4, classes, 1)
    ).eval()


def _export(net: torch.nn.Module, path: Path, shape: tuple[int, ...], dynamic: bool) -> Path:
    axes = {0: "batch", **{a: f"s{a}" for a in range(2, len(shape))}}
    with warnings.catch_warnings():  # torch 2.13 calls the TorchScript-based exporter legacy
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(shape),), str(path), dynamo=False, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": axes} if dynamic else None,
        )  # fmt: skip
    return path


def _with_metadata(path: Path, **props: str) -> Path:
    model = onnx.load(str(path))
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


CARD_2D = {"classes": ["background", "cell", "edge"], "tile": [16, 16], "overlap": 0.5,
           "channels": [{"name": "dapi", "normalization": {"method": "percentile"}}]}  # fmt: skip


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    paths = {
        "2d": _export(_net(2), folder / "net2d.onnx", (1, 1, 16, 16), dynamic=True),
        "3d": _export(_net(3), folder / "net3d.onnx", (1, 1, 8, 8, 8), dynamic=True),
        "fixed": _export(_net(2), folder / "fixed.onnx", (2, 1, 16, 16), dynamic=False),
    }
    _with_metadata(paths["2d"], **{"segflow.card": json.dumps(CARD_2D)})
    return paths


def _torch_reference(net: torch.nn.Module, image: np.ndarray, tile: tuple[int, ...],
                     overlap: float, norm: str = "percentile") -> np.ndarray:  # fmt: skip
    from segflow.models.card import ChannelCard

    channels = [ChannelCard.model_validate({"name": "x", "normalization": {"method": norm}})]
    x = normalize_image(image[None], channels, item_statistics(image[None], channels))
    return predict_image(net, x, tile=tile, overlap=overlap, activation="softmax", batch_size=2)


def _step(path: Path, **params: Any) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "foreground", **params}  # fmt: skip


# -- ONNX ---------------------------------------------------------------------------------------


def test_the_onnx_card_comes_from_the_graph_and_its_metadata(onnx_models: dict[str, Path]) -> None:
    card = describe_model(onnx_models["2d"]).card
    assert (card.spatial_dims, card.tile, card.overlap) == (2, (16, 16), 0.5)
    assert card.classes == ("background", "cell", "edge") and card.activation == "softmax"
    assert card.channels[0].name == "dapi" and card.channels[0].normalization.method == "percentile"
    bare = describe_model(onnx_models["3d"])
    assert bare.card.tile == (96, 96, 96) and not bare.fixed_tile  # the stated default
    assert bare.card.classes == ("class_0", "class_1", "class_2")
    assert bare.card.channels[0].normalization.method == "none"
    fixed = describe_model(onnx_models["fixed"])
    assert fixed.card.tile == (16, 16) and fixed.fixed_tile  # the graph's shape is the tile


def test_onnx_equals_torch_on_an_image_smaller_than_a_tile(onnx_models: dict[str, Path]) -> None:
    image = np.random.default_rng(1).gamma(2.0, 50.0, (9, 13)).astype(np.float32)
    out = segment(image, [_step(onnx_models["2d"])])
    reference = _torch_reference(_net(2), image, (16, 16), 0.5)
    np.testing.assert_allclose(out, 1.0 - reference[0], rtol=0, atol=1e-5)


@given(layout=layouts(2, max_side=30))
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_onnx_equals_torch_on_every_block_layout(
    onnx_models: dict[str, Path], layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    shape, blocks, seed = layout
    image = np.random.default_rng(seed).gamma(2.0, 50.0, shape).astype(np.float32)
    out = segment(image, [_step(onnx_models["2d"])], block_shape=blocks)
    reference = _torch_reference(_net(2), image, (16, 16), 0.5)
    np.testing.assert_allclose(out, 1.0 - reference[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("blocks", [(11, 20, 18), (4, 8, 6)])
def test_a_3d_onnx_graph_with_a_tile_from_the_step(
    onnx_models: dict[str, Path], blocks: tuple[int, ...]
) -> None:
    image = np.random.default_rng(3).normal(size=(11, 20, 18)).astype(np.float32)
    step = _step(onnx_models["3d"], tile=[8, 8, 8], overlap=0.25)
    out = segment(image, [step], block_shape=blocks)
    reference = _torch_reference(_net(3), image, (8, 8, 8), 0.25, norm="none")
    np.testing.assert_allclose(out, 1.0 - reference[0], rtol=0, atol=1e-5)


def test_onnx_through_segflow_equals_onnxruntime_over_the_same_tiles(
    onnx_models: dict[str, Path],
) -> None:
    """The blend done here from the public grid and weights, each tile run by a plain
    ONNX Runtime session: what the ONNX source adds is only the per-tile call."""
    image = np.random.default_rng(2).normal(size=(37, 29)).astype(np.float32)
    out = segment(image, [_step(onnx_models["fixed"], batch_size=3)], block_shape=(16, 20))
    session = ort.InferenceSession(str(onnx_models["fixed"]), providers=["CPUExecutionProvider"])
    grid = plan_tiles(image.shape, tile=(16, 16), overlap=0.5)
    weights = tile_weights((16, 16)).astype(np.float64)
    num, den = np.zeros((3, *image.shape)), np.zeros(image.shape)
    for start in grid.all_tiles():
        box = tuple(slice(s, s + 16) for s in start)
        tile = np.stack([image[None][(slice(None), *box)]] * 2)  # the graph's fixed batch 2
        logits = session.run(None, {"image": tile})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
        num[(slice(None), *box)] += probs * weights
        den[box] += weights
    np.testing.assert_allclose(out, 1.0 - num[0] / den, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu (the CUDA execution provider) and a GPU",
)
def test_the_cuda_execution_provider_agrees_with_cpu(onnx_models: dict[str, Path]) -> None:
    image = np.random.default_rng(6).gamma(2.0, 50.0, (40, 44)).astype(np.float32)
    cpu = segment(image, [_step(onnx_models["2d"])], block_shape=(16, 24))
    gpu = segment(image, [_step(onnx_models["2d"], device="cuda")], block_shape=(16, 24))
    # float32 on both (no autocast for ONNX Runtime): cuDNN's kernels round differently.
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4)


def test_a_fixed_shape_graph_forces_its_tile(onnx_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"`tile` \(32, 32\) cannot be used, the model's ONNX "
                       r"graph .*fixed.onnx fixes its input to \(16, 16\)"):  # fmt: skip
        compile_pipeline([_step(onnx_models["fixed"], tile=[32, 32])], spatial_ndim=2,
                         channels=1, dtype="float32")  # fmt: skip


def test_the_step_overrides_enter_the_config_hash_only_when_set(
    onnx_models: dict[str, Path],
) -> None:
    from segflow.config import parse_config

    def hashed(**params: Any) -> str:
        data = {"input": {"path": "in"}, "output": {"store": "o.zarr"}}
        step = {"op": "model", "path": str(onnx_models["3d"]), **params}
        return parse_config({**data, "pipeline": [step]}).config_hash()

    assert hashed() == hashed(tile=None) != hashed(tile=[8, 8, 8]) != hashed(tile=[8, 8, 16])
    assert hashed(normalization={"method": "zscore"}) != hashed()
    low = {"method": "percentile", "low": 1}
    assert hashed(normalization=low) == hashed(normalization={**low, "high": 99.0})
    assert hashed(channels=1) != hashed() == hashed(channels=None)


def test_segflow_models_inspect_prints_the_derived_card(onnx_models: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from segflow.flows.cli import app

    result = CliRunner().invoke(app, ["models", "inspect", str(onnx_models["2d"])])
    assert result.exit_code == 0, result.output
    assert "source: onnx (ONNX graph" in result.output
    assert "input: 1 channel(s), 2-D, axes (c, y, x)" in result.output
    assert "dapi: item percentiles 1..99 -> 0..1" in result.output
    assert "tile: (16, 16), overlap 0.5, blending gaussian" in result.output
    assert "output: 3 classes (background, cell, edge), activation softmax" in result.output
    bare = CliRunner().invoke(app, ["models", "inspect", str(onnx_models["3d"])])
    assert "note: tile: (96, 96, 96), segflow's default" in bare.output
    missing = CliRunner().invoke(app, ["models", "inspect", "nowhere.onnx"])
    assert missing.exit_code == 2 and "no such checkpoint folder or model file" in missing.output


# -- MONAI bundles ------------------------------------------------------------------------------

UNET_2D = {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2, "in_channels": 1,
           "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]}  # fmt: skip


def _bundle(folder: Path, inference: dict[str, Any], net: torch.nn.Module | None,
            ndim: int = 2, classes: tuple[str, ...] = ("background", "organ"),
            channels: int = 1) -> Path:  # fmt: skip
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    fmt = {
        "inputs": {"image": {"type": "image", "num_channels": channels,
                             "spatial_shape": [32] * ndim,
                             "dtype": "float32", "value_range": [0, 1]}},
        "outputs": {"pred": {"type": "image", "num_channels": len(classes),
                             "spatial_shape": [32] * ndim,
                             "channel_def": {str(k): c for k, c in enumerate(classes)}}},
    }  # fmt: skip
    metadata = {"version": "0.1.0", "network_data_format": fmt}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    if net is not None:  # scripted, as MONAI's ckpt_export writes model.ts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(net).save(str(folder / "models" / "model.ts"))
    return folder


def _monai_net(config: dict[str, Any], seed: int) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    torch.manual_seed(seed)
    return ConfigParser({"n": config}).get_parsed_content("n").eval()


SCALE = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300,
         "b_min": 0.0, "b_max": 1.0, "clip": True}  # fmt: skip


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    ts = {"network_def": UNET_2D,
          "preprocessing": {"_target_": "Compose", "transforms": [
              {"_target_": "EnsureTyped", "keys": "image"}, SCALE]},
          "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32],
                      "sw_batch_size": 2, "overlap": 0.5},
          "postprocessing": {"_target_": "Compose", "transforms": []}}  # fmt: skip
    unet3 = {**UNET_2D, "spatial_dims": 3}
    pt = {"network_def": unet3,
          "preprocessing": {"_target_": "Compose", "transforms": [
              {"_target_": "NormalizeIntensityd", "keys": "image"}]},
          "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32],
                      "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"},
          "postprocessing": {"_target_": "Compose", "transforms": [
              {"_target_": "Activationsd", "keys": "pred", "softmax": True}]}}  # fmt: skip
    paths = {"ts": _bundle(folder / "ts", ts, _monai_net(UNET_2D, 0))}
    paths["pt"] = _bundle(folder / "pt", pt, None, ndim=3)
    torch.save(_monai_net(unet3, 1).state_dict(), paths["pt"] / "models" / "model.pt")
    return paths


def _monai_native(bundle: Path, image: np.ndarray, channel_first: bool = False) -> np.ndarray:
    """The bundle run by MONAI itself: ConfigParser's preprocessing, network, inferer and
    postprocessing on the image (what ``monai.bundle run`` does past the loader); ``image``
    is ``(c, ...)`` with ``channel_first``, one channel without."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    if (bundle / "models" / "model.ts").is_file():
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; bundles have it
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(bundle / "models" / "model.ts"))
    else:
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    tensor = torch.from_numpy(image if channel_first else image[None])
    data = parser.get_parsed_content("preprocessing")({"image": tensor})
    with torch.inference_mode():
        pred = parser.get_parsed_content("inferer")(inputs=data["image"][None], network=net.eval())
    out = parser.get_parsed_content("postprocessing")({"pred": pred[0]})["pred"]
    return np.asarray(out.detach().cpu().numpy())


def test_the_bundle_card_comes_from_its_metadata_and_inference_config(
    bundles: dict[str, Path],
) -> None:
    card = describe_model(bundles["ts"]).card
    assert (card.tile, card.overlap, card.window, card.activation) == (
        (32, 32), 0.5, "constant", "none")  # fmt: skip
    assert card.classes == ("background", "organ")
    norm = card.channels[0].normalization
    assert (norm.method, norm.low, norm.high, norm.clip) == ("fixed", -100, 300, True)
    card = describe_model(bundles["pt"]).card
    assert (card.tile, card.window, card.activation) == ((32, 32, 32), "gaussian", "softmax")
    assert card.channels[0].normalization.method == "zscore"


BUNDLE_LAYOUTS = [((19, 27), None), ((96, 96), None), ((96, 96), (40, 27)), ((96, 96), (13, 96))]


@pytest.mark.parametrize(("shape", "blocks"), BUNDLE_LAYOUTS)
def test_a_torchscript_bundle_equals_its_monai_inferer(
    bundles: dict[str, Path], shape: tuple[int, ...], blocks: tuple[int, ...] | None
) -> None:
    """Constant blending, no activation: MONAI's and segflow's sums are the same wherever
    their grids are (96 = 32 + 4 * 16: both start tiles every 16 pixels; 19 x 27 is one
    padded tile in both)."""
    image = np.random.default_rng(4).normal(50, 120, shape).astype(np.float32)
    native = _monai_native(bundles["ts"], image)
    out = segment(image, [_step(bundles["ts"])], block_shape=blocks)
    np.testing.assert_allclose(out, 1.0 - native[0], rtol=0, atol=1e-5)


def test_a_state_dict_bundle_equals_its_monai_inferer(bundles: dict[str, Path]) -> None:
    """One (padded) tile: softmax per tile (segflow) and after blending (MONAI) agree there."""
    image = np.random.default_rng(5).normal(50, 120, (10, 12, 14)).astype(np.float32)
    native = _monai_native(bundles["pt"], image)
    out = segment(image, [_step(bundles["pt"], batch_size=1)], block_shape=(5, 12, 7))
    np.testing.assert_allclose(out, 1.0 - native[0], rtol=0, atol=1e-5)


def _nonzero_image(shape: tuple[int, int] = (96, 96)) -> np.ndarray:
    """Two channels of different scales, each with its own zeros: a frame around the
    object, a hole inside it (which nnU-Net's mask would fill), scattered zero pixels in
    the second channel only (so the channels' masks and their union all differ)."""
    rng = np.random.default_rng(9)
    image = np.stack([rng.normal(50, 120, shape), rng.normal(400, 60, shape)]).astype(np.float32)
    image[:, :7] = 0  # the frame: background in both channels
    image[0, :, -9:] = 0
    image[0, 40:52, 30:45] = 0  # a hole inside the object, channel 0
    image[1][rng.random(shape) < 0.1] = 0
    return image


NONZERO_UNET = {**UNET_2D, "in_channels": 2}


def _nonzero_inference(**options: Any) -> dict[str, Any]:
    norm = {"_target_": "NormalizeIntensityd", "keys": "image", **options}
    return {"preprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "EnsureTyped", "keys": "image"}, norm]},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32],
                        "sw_batch_size": 2, "overlap": 0.5},
            "postprocessing": {"_target_": "Compose", "transforms": []}}  # fmt: skip


@pytest.fixture(scope="module")
def nonzero_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-channel bundles with MONAI's NormalizeIntensityd(nonzero=True), channel by
    channel (brats_mri_segmentation's) and over both channels together, and one with the
    plain z-score: the same network in each."""
    folder = tmp_path_factory.mktemp("nonzero")
    options = {"channel_wise": {"nonzero": True, "channel_wise": True},
               "joint": {"nonzero": True, "channel_wise": False},
               "plain": {"channel_wise": True}}  # fmt: skip
    net = _monai_net(NONZERO_UNET, 2)
    return {
        name: _bundle(folder / name, _nonzero_inference(**kw), net, channels=2)
        for name, kw in options.items()
    }


def test_monai_nonzero_normalisation_is_its_own_per_element_mask() -> None:
    """The card's mask: nonzero_elements (and joint) scale as MONAI's NormalizeIntensity
    does, and unlike the plain z-score or nnU-Net's hole-filled union mask; 1e-5 relative:
    MONAI sums in float32, segflow in float64."""
    from monai.transforms import NormalizeIntensity

    from segflow.models.card import ChannelCard, ModelCard

    image = _nonzero_image((40, 48))
    for channel_wise in (True, False):
        norm = {"method": "zscore", "mask": "nonzero_elements", "joint": not channel_wise}
        channels = [ChannelCard(name=n, normalization=norm) for n in ("t1", "flair")]  # type: ignore[arg-type]
        ours = normalize_image(image, channels, item_statistics(image, channels))
        native = NormalizeIntensity(nonzero=True, channel_wise=channel_wise)(image.copy())
        native = np.asarray(native)
        np.testing.assert_allclose(ours, native, rtol=1e-5, atol=1e-5)
        assert (ours[image == 0] == 0).all() and (ours[image != 0] != 0).all()
        for other in ({"method": "zscore"}, {"method": "zscore", "mask": "nonzero"}):
            cards = [ChannelCard(name=n, normalization=other) for n in ("t1", "flair")]  # type: ignore[arg-type]
            wrong = normalize_image(image, cards, item_statistics(image, cards))
            assert np.abs(wrong - native).max() > 0.1, other
    plain = ModelCard(name="m", architecture={"name": "segnet"}, spatial_dims=2,  # type: ignore[arg-type]
                      channels=[{"name": "x", "normalization": {"method": "zscore"}}],
                      classes=["a", "b"], tile=(16, 16))  # fmt: skip
    assert "joint" not in plain.identity_json() and "mask" not in plain.identity_json()


def test_monai_nonzero_bundle_cards(nonzero_bundles: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from segflow.flows.cli import app

    by_channel = describe_model(nonzero_bundles["channel_wise"]).card.channels
    assert [c.normalization.mask for c in by_channel] == ["nonzero_elements"] * 2
    assert not any(c.normalization.joint for c in by_channel)
    together = describe_model(nonzero_bundles["joint"]).card.channels
    assert all(c.normalization.joint for c in together)
    assert all(c.normalization.mask == "nonzero_elements" for c in together)
    shown = CliRunner().invoke(app, ["models", "inspect", str(nonzero_bundles["joint"])])
    assert (
        "channel_0: item mean / standard deviation of its non-zero values (z-score), zeros "
        "kept, over the joint channels together" in shown.output
    ), shown.output


def test_an_all_zero_channel_stays_zero_as_monai_leaves_it(
    nonzero_bundles: dict[str, Path],
) -> None:
    """MONAI returns a channel without a non-zero value unchanged; segflow's statistics
    pass gives it (0, 1), so it stays 0, in blocks too (1e-5 as above)."""
    image = _nonzero_image((40, 40))
    image[1] = 0
    native = _monai_native(nonzero_bundles["channel_wise"], image, channel_first=True)
    step = _step(nonzero_bundles["channel_wise"])
    out = segment(image, [step], block_shape=(17, 40), channel_axis=0)
    np.testing.assert_allclose(out, 1.0 - native[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["channel_wise", "joint"])
@pytest.mark.parametrize("blocks", [None, (40, 27), (13, 96)])
def test_a_nonzero_normalising_bundle_equals_its_monai_inferer(
    nonzero_bundles: dict[str, Path], name: str, blocks: tuple[int, int] | None
) -> None:
    """NormalizeIntensityd(nonzero=True) as MONAI runs it, whole and in blocks (the mean
    and standard deviation are the whole item's); 1e-5 as the other bundles."""
    image = _nonzero_image()
    native = _monai_native(nonzero_bundles[name], image, channel_first=True)
    out = segment(image, [_step(nonzero_bundles[name])], block_shape=blocks, channel_axis=0)
    np.testing.assert_allclose(out, 1.0 - native[0], rtol=0, atol=1e-5)


def test_the_nonzero_bundle_comparison_fails_with_the_plain_zscore(
    nonzero_bundles: dict[str, Path],
) -> None:
    """The same network with the plain z-score is far from MONAI's nonzero pipeline: the
    equality above can fail."""
    image = _nonzero_image()
    native = _monai_native(nonzero_bundles["channel_wise"], image, channel_first=True)
    plain = segment(image, [_step(nonzero_bundles["plain"])], channel_axis=0)
    assert np.abs(plain - (1.0 - native[0])).max() > 1e-3  # 0.014 measured; tolerance 1e-5


def test_a_normalize_intensity_with_a_given_subtrahend_is_refused(tmp_path: Path) -> None:
    inference = _nonzero_inference(nonzero=True, subtrahend=[1.0, 2.0], channel_wise=True)
    bundle = _bundle(tmp_path / "b", inference, _monai_net(NONZERO_UNET, 0), channels=2)
    with pytest.raises(ModelError, match=r"preprocessing NormalizeIntensityd with \{'nonzero': "
                       r"True, 'subtrahend': \[1.0, 2.0\], 'channel_wise': True\} has no "
                       r"whole-item equivalent") as error:  # fmt: skip
        describe_model(bundle)
    _one_line(error)


# -- bad models, one line each ------------------------------------------------------------------


def _plan(path: Path, channels: int = 1, ndim: int = 2, **params: Any) -> Any:
    return compile_pipeline([_step(path, **params)], spatial_ndim=ndim, channels=channels,
                            dtype="float32")  # fmt: skip


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text.strip(), text
    return text


def test_a_truncated_onnx_file_is_refused(onnx_models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(onnx_models["2d"].read_bytes()[:500])
    with pytest.raises(ConfigError, match=r"ONNX model '.*cut.onnx' cannot be read by ONNX "
                       r"Runtime") as error:  # fmt: skip
        _plan(path)
    _one_line(error)


def test_an_onnx_model_that_does_not_fit_the_item_is_refused(
    onnx_models: dict[str, Path],
) -> None:
    with pytest.raises(PlanError, match=r"model '.*net2d.onnx' \(ONNX graph .*\) expects 1 "
                       r"channels \(dapi\), the image has 3"):  # fmt: skip
        _plan(onnx_models["2d"], channels=3)
    with pytest.raises(PlanError, match=r"model '.*net3d.onnx' .* is 3-D, the item is 2-D"):
        _plan(onnx_models["3d"])


def test_channels_cannot_be_set_for_a_network_of_one_channel_count(
    onnx_models: dict[str, Path],
) -> None:
    """Only a source that states a channel range (a Cellpose network) takes `channels`."""
    with pytest.raises(ConfigError, match=r"model '.*net2d.onnx': `channels` \(2\) cannot "
                       r"be used, the model's ONNX graph .* takes exactly 1 input "
                       r"channels"):  # fmt: skip
        compile_pipeline([_step(onnx_models["2d"], channels=2)], spatial_ndim=2, channels=2,
                         dtype="float32")  # fmt: skip
    assert compile_pipeline([_step(onnx_models["2d"], channels=1)], spatial_ndim=2, channels=1,
                            dtype="float32")  # fmt: skip


def test_an_unsupported_onnx_input_layout_is_refused(tmp_path: Path) -> None:
    class ChannelsLast(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, -x], dim=-1).permute(0, 3, 1, 2)

    path = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ChannelsLast(), (torch.zeros(1, 16, 16, 1),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {1: "h", 2: "w"}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"nhwc.onnx': unsupported input layout, input 'x' of "
                       r"shape \[1, 'h', 'w', 1\]") as error:  # fmt: skip
        _plan(path)
    _one_line(error)


def test_a_bundle_without_metadata_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "no-meta"
    shutil.copytree(bundles["ts"], folder)
    (folder / "configs" / "metadata.json").unlink()
    with pytest.raises(ConfigError, match=r"MONAI bundle '.*no-meta' has no "
                       r"configs/metadata.json") as error:  # fmt: skip
        _plan(folder)
    _one_line(error)


def test_a_bundle_preprocessing_segflow_cannot_map_is_refused(tmp_path: Path) -> None:
    resample = {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0]}
    inference = {"preprocessing": {"_target_": "Compose", "transforms": [resample]},
                 "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32]}}  # fmt: skip
    bundle = _bundle(tmp_path / "b", inference, _monai_net(UNET_2D, 0))
    with pytest.raises(ModelError, match=r"preprocessing Spacingd is not supported"):
        describe_model(bundle)


def test_a_network_whose_output_does_not_fit_its_card_is_refused_at_load(tmp_path: Path) -> None:
    inference = {"inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32]}}
    classes = ("background", "a", "b")  # the network gives 2 channels
    bundle = _bundle(tmp_path / "b", inference, _monai_net(UNET_2D, 0), classes=classes)
    card = describe_model(bundle).card
    refused = (
        r"model '.*b': a dummy input \(2, 1, 32, 32\) gives an output of shape "
        r"\(2, 2, 32, 32\), the card expects \(2, 3, 32, 32\)"
    )
    with pytest.raises(ModelError, match=refused):
        load_source(bundle, card, batch_size=2)


class _Payload:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    shutil.copytree(bundles["pt"], folder)
    torch.save({"model": _Payload(marker)}, folder / "models" / "model.pt")
    card = describe_model(folder).card
    with pytest.raises(ModelError, match=r"models/model.pt cannot be read as tensors only"):
        load_source(folder, card)
    bare = tmp_path / "evil.pt"  # a "TorchScript" file that is a plain pickle
    bare.write_bytes(pickle.dumps(_Payload(marker)))
    bare.with_suffix(".json").write_text(
        describe_model(bundles["ts"]).card.model_copy(update={"name": "evil"}).model_dump_json()
    )
    with pytest.raises(ModelError, match=r"TorchScript file '.*evil.pt' cannot be loaded"):
        load_source(bare, describe_model(bare).card)
    assert not marker.exists()


# -- a source from another package --------------------------------------------------------------

PLUGIN = '''
import json
from pathlib import Path

import torch

from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel
from segflow.models.sources import ModelSource, SourceCard


class DemoSource(ModelSource):
    """A JSON file (.demo): a card and a scale; the network gives (-s x, s x)."""

    name = "demo"
    description = "demo JSON model (.demo)"

    def recognises(self, path):
        return path.is_file() and path.suffix == ".demo"

    def describe(self, path):
        card = ModelCard.model_validate(json.loads(path.read_text())["card"])
        return SourceCard(card, self.name, f"demo file {path}")

    def load(self, path, card, *, device):
        scale = float(json.loads(path.read_text())["scale"])
        return LoadedModel(lambda x: torch.cat([-scale * x, scale * x], dim=1), card,
                           self.identity(path, card), path, source=self.name)
'''


@pytest.fixture
def demo_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from segflow.models import sources

    (tmp_path / "segflow_demo_source.py").write_text(PLUGIN)
    info = tmp_path / "segflow_demo_source-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: segflow-demo-source\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[segflow.model_sources]\ndemo = segflow_demo_source:DemoSource\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sources._load_entry_points.cache_clear()
    yield tmp_path
    sources._SOURCES[:] = [s for s in sources._SOURCES if s.name != "demo"]
    sources._load_entry_points.cache_clear()


def test_a_model_source_from_another_package_runs_in_a_pipeline(demo_source: Path) -> None:
    from segflow.models.sources import sources

    card = {"name": "demo", "architecture": {"name": "demo"}, "spatial_dims": 2,
            "channels": [{"name": "x", "normalization": {"method": "none"}}],
            "classes": ["background", "foreground"], "tile": [8, 8],
            "output_activation": "none"}  # fmt: skip
    path = demo_source / "m.demo"
    path.write_text(json.dumps({"card": card, "scale": 3}))
    image = np.random.default_rng(0).normal(size=(20, 13)).astype(np.float32)

    out = segment(image, [_step(path)], block_shape=(7, 13))

    assert sources()[0].name == "demo"  # tried before the built-in ones
    np.testing.assert_allclose(out, 1.0 + 3 * image, rtol=0, atol=1e-5)

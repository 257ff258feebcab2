"""The ``model`` pipeline step: blockwise equals the whole item's sliding window."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflow import segment
from segflow.config import parse_config
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import ConfigError, PlanError
from segflow.models.card import ModelCard, item_statistics, normalize_image
from segflow.models.checkpoint import load_checkpoint, save_checkpoint
from segflow.models.inference import predict_image
from segflow.models.networks import build_network
from segflow.ops.registry import describe_params, get_operation

torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                    HealthCheck.function_scoped_fixture])  # fmt: skip


def _card(spatial_dims: int, **changes: object) -> ModelCard:
    fields: dict[str, object] = {
        "name": f"tiny{spatial_dims}d",
        "architecture": {"name": "segnet", "params": {"features": [4, 8]}},
        "spatial_dims": spatial_dims,
        "channels": [{"name": "dapi", "normalization": {"method": "percentile"}}],
        "head": "foreground_boundary",
        "tile": (16, 16) if spatial_dims == 2 else (8, 16, 16),
        "overlap": 0.25,
    }
    fields.update(changes)
    return ModelCard.model_validate(fields)


def _basic_unet_card(spatial_dims: int) -> ModelCard:
    return _card(
        spatial_dims,
        architecture={"name": "basic_unet", "params": {"features": [4, 4, 8, 8, 16, 4]}},
        tile=(32, 32) if spatial_dims == 2 else (16, 32, 32),
    )


def _plus_one() -> torch.nn.Module:
    """``x -> (x + 1, 2 x)``: exact in float32, so tiling and blending must give it back."""
    conv = torch.nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([1.0, 0.0]))
    return conv.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for ndim in (2, 3):
        torch.manual_seed(ndim)
        card = _card(ndim)
        net = build_network(card.network_spec()).eval()
        paths[f"unet{ndim}"] = folder / f"unet{ndim}"
        save_checkpoint(paths[f"unet{ndim}"], net, card)
        # A real U-Net (MONAI BasicUNet: skip connections, four poolings: tiles of 16k, one >= 32).
        torch.manual_seed(10 + ndim)
        card = _basic_unet_card(ndim)
        net = build_network(card.network_spec()).eval()
        paths[f"basic_unet{ndim}"] = folder / f"basic_unet{ndim}"
        save_checkpoint(paths[f"basic_unet{ndim}"], net, card)
    # A user's TorchScript file with a card beside it: the distance head has no activation,
    # so the op's "probabilities" are the model's raw output.
    path = folder / "plus_one.pt"
    with warnings.catch_warnings():
        # torch 2.13 deprecates tracing; users still bring TorchScript files, so make one.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(_plus_one(), torch.zeros(2, 1, 16, 16)).save(str(path))
    card = _card(2, architecture={"name": "torchscript"}, head="foreground_distance")
    path.with_suffix(".json").write_text(card.model_dump_json())
    paths["plus_one"] = path
    return paths


def _reference(path: Path, image: np.ndarray, card: ModelCard) -> np.ndarray:
    """The whole item's sliding window with whole-item normalisation, in memory."""
    from segflow.models.checkpoint import load_model

    x = image[np.newaxis]
    normalised = normalize_image(x, card.channels, item_statistics(x, card.channels))
    return predict_image(
        load_model(path).module,
        normalised,
        tile=card.tile,
        overlap=card.overlap,
        window=card.window,
        batch_size=2,
        activation=card.activation,
    )


@st.composite
def _layouts(draw: st.DrawFn, ndim: int, max_side: int) -> tuple[tuple[int, ...], ...]:
    # Sides from 1 (smaller than a tile: padded, cropped back) to a few tiles.
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    blocks = tuple(draw(st.integers(max(1, n // 4), n)) for n in shape)
    return shape, blocks


@given(layout=_layouts(2, 40), seed=st.integers(0, 2**16))
@SETTINGS
def test_a_pointwise_model_comes_back_exact_through_the_op(
    models: dict[str, Path], layout: tuple[tuple[int, ...], ...], seed: int
) -> None:
    shape, blocks = layout
    image = np.random.default_rng(seed).gamma(2.0, 50.0, shape).astype(np.float32)
    step = {"op": "model", "path": str(models["plus_one"]), "device": "cpu",
            "batch_size": 2, "output": "probabilities"}  # fmt: skip
    out = segment(image, [step], block_shape=blocks)
    card = _card(2, head="foreground_distance")
    x = normalize_image(image[None], card.channels, item_statistics(image[None], card.channels))
    # Exact: every tile computes x + 1 and 2 x of the same float32 values, and blending a
    # constant over tiles gives it back (float64 sums); float16 is the storage dtype.
    expected = np.concatenate([x + 1, 2 * x]).astype(np.float16)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("network", ["unet", "basic_unet"])  # SegNet-style; MONAI BasicUNet
@pytest.mark.parametrize(
    ("ndim", "shape", "blocks"),
    [(2, (37, 45), (37, 45)), (2, (37, 45), (8, 16)), (2, (9, 11), (4, 5)),
     (3, (11, 20, 18), (11, 20, 18)), (3, (11, 20, 18), (4, 8, 6))],
)  # fmt: skip
def test_a_random_unet_blockwise_equals_the_whole_item_sliding_window(
    models: dict[str, Path],
    network: str,
    ndim: int,
    shape: tuple[int, ...],
    blocks: tuple[int, ...],
) -> None:
    path = models[f"{network}{ndim}"]
    image = np.random.default_rng(ndim).gamma(2.0, 50.0, shape).astype(np.float32)
    step = {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "foreground"}  # fmt: skip
    out = segment(image, [step], block_shape=blocks)
    card = _card(ndim) if network == "unet" else _basic_unet_card(ndim)
    reference = _reference(path, image, card)
    # A block runs the same tiles in batches of the same shape and sums them in the same
    # order as the whole item, so the outputs agree to float32 rounding of the network's
    # kernels: 1e-6 on probabilities in [0, 1] (measured: bit-identical here).
    np.testing.assert_allclose(out, 1.0 - reference[0], rtol=0, atol=1e-6)
    classes = segment(image, [{**step, "output": "classes"}], block_shape=blocks)
    np.testing.assert_array_equal(classes, np.argmax(reference, axis=0))


@given(layout=_layouts(3, 14), seed=st.integers(0, 2**16))
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_hypothesis_layouts_in_3d(
    models: dict[str, Path], layout: tuple[tuple[int, ...], ...], seed: int
) -> None:
    shape, blocks = layout
    image = np.random.default_rng(seed).gamma(2.0, 50.0, shape).astype(np.float32)
    step = {"op": "model", "path": str(models["unet3"]), "device": "cpu", "batch_size": 2,
            "output": "foreground"}  # fmt: skip
    out = segment(image, [step], block_shape=blocks)
    # Same reasoning and tolerance as the 2-D test above.
    np.testing.assert_allclose(
        out, 1.0 - _reference(models["unet3"], image, _card(3))[0], rtol=0, atol=1e-6
    )


def test_mismatches_are_refused_at_planning_naming_the_file(models: dict[str, Path]) -> None:
    step = {"op": "model", "path": str(models["unet2"])}
    with pytest.raises(PlanError, match=r"model '.*unet2' \(card .*card.json\) expects 1 "
                       r"channels \(dapi\), the image has 3"):  # fmt: skip
        compile_pipeline([step], spatial_ndim=2, channels=3, dtype="uint8")
    with pytest.raises(PlanError, match=r"model '.*unet2' .* is 2-D, the item is 3-D"):
        compile_pipeline([step], spatial_ndim=3, channels=1, dtype="uint8")
    with pytest.raises(ConfigError, match=r"pipeline\[0\] \(model\): `path` '.*nowhere'"):
        compile_pipeline([{"op": "model", "path": "nowhere"}], spatial_ndim=2, channels=1,
                         dtype="uint8")  # fmt: skip


def test_an_item_of_another_pixel_size_is_refused(tmp_path: Path) -> None:
    card = _card(2, spacing=(0.5, 0.5), units="m")
    save_checkpoint(tmp_path / "m", build_network(card.network_spec()).eval(), card)
    step = {"op": "model", "path": str(tmp_path / "m")}

    def plan(spacing: tuple[float, float], units: str, **params: object) -> object:
        return compile_pipeline([{**step, **params}], spatial_ndim=2, channels=1,
                                dtype="uint16", spacing=spacing, units=units)  # fmt: skip

    refused = (
        r"trained at a pixel size of \(0.5, 0.5\) m, the item's is \(0.3, 0.3\) m, off by "
        r"more than spacing_tolerance 0.25"
    )
    with pytest.raises(PlanError, match=refused):
        plan((0.3, 0.3), "m")
    with pytest.raises(PlanError, match=r"the item's is \(0.5, 2\) m"):
        plan((500.0, 2000.0), "mm")  # converted; one axis off is enough
    plan((0.6, 0.45), "m")  # within 25 %
    plan((500.0, 500.0), "mm")  # the same size in other units
    plan((1.0, 1.0), "pixel")  # no physical size: nothing to compare
    plan((0.3, 0.3), "m", spacing_tolerance=None)  # the user's call
    plan((0.3, 0.3), "m", spacing_tolerance=0.7)


@given(layout=layouts(2, max_side=50))
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_resampled_to_the_cards_spacing_and_back_blockwise_on_every_layout(
    resampled_model: Path, layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    """``resample: true`` on a segflow checkpoint with a spacing: the item (0.3 x 0.8 m
    pixels) goes to the card's 0.5 m grid and the probabilities come back, on any layout."""
    from segflow.models.resampling import plan_resampling, resample_region

    shape, blocks, seed = layout
    image = (smooth_noise(shape, seed) * 4000).astype(np.uint16)
    step = {"op": "model", "path": str(resampled_model), "output": "raw", "resample": True}
    out = segment(image, [step], block_shape=blocks, spacing=(0.3, 0.8), units="m")
    card = _card(2, spacing=(0.5, 0.5), units="m")
    x = normalize_image(image[None], card.channels, item_statistics(image[None], card.channels))
    grid = plan_resampling(shape, (0.3, 0.8), (0.5, 0.5))
    if grid is not None:
        whole = (tuple(slice(0, n) for n in grid.item), tuple(slice(0, n) for n in grid.model))
        x = resample_region(x, whole[0], grid.item, grid.model, whole[1], grid.forward)
    net = load_checkpoint(resampled_model).module
    probs = predict_image(net, x.astype(np.float32), tile=card.tile,
                          overlap=card.overlap, activation="softmax")  # fmt: skip
    if grid is not None:
        probs = resample_region(probs, whole[1], grid.model, grid.item, whole[0], grid.back)
    # The same tiles and the same float64 resampling; a block's spline coefficients leave
    # out item pixels more than 24 away (2e-14 of the range)
    np.testing.assert_allclose(out, probs, rtol=0, atol=1e-5)


def test_resampling_is_refused_where_it_cannot_be_done(
    resampled_model: Path, tmp_path: Path
) -> None:
    def plan(path: Path, spacing: tuple[float, float], units: str, **params: object) -> object:
        step = {"op": "model", "path": str(path), "resample": True, **params}
        return compile_pipeline([step], spatial_ndim=2, channels=1, dtype="uint16",
                                spacing=spacing, units=units)  # fmt: skip

    with pytest.raises(PlanError, match=r"resample: true, but the item's pixel size is in "
                       r"'pixel', not a length the model's card \(m\) can be compared with: "
                       r"set pixel_size"):  # fmt: skip
        plan(resampled_model, (1.0, 1.0), "pixel")
    plan(resampled_model, (1.0, 1.0), "pixel", pixel_size=(0.3, 0.3))  # set by hand
    card = _card(2, head="flows", spacing=(0.5, 0.5), units="m")
    save_checkpoint(tmp_path / "flows", build_network(card.network_spec()).eval(), card)
    with pytest.raises(PlanError, match=r"a flow head's vectors are in its own pixels"):
        plan(tmp_path / "flows", (0.3, 0.3), "m")


@pytest.fixture(scope="module")
def resampled_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = _card(2, spacing=(0.5, 0.5), units="m")
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("spaced") / "m"
    save_checkpoint(path, build_network(card.network_spec()).eval(), card)
    return path


def test_the_plan_has_the_tile_halo_and_a_statistics_pass(models: dict[str, Path]) -> None:
    plan = compile_pipeline(
        [{"op": "model", "path": str(models["unet2"]), "output": "probabilities"}],
        spatial_ndim=2, channels=1, dtype="uint16",
    )  # fmt: skip
    assert plan.halo == (15, 15)
    assert [p.ends_with for p in plan.phases] == ["statistic", "output"]
    assert plan.out_classes == ("background", "foreground", "boundary")
    assert plan.out_kind == "probabilities"
    names = [row[0] for row in describe_params(get_operation("model", public=True))]
    assert names == ["path", "device", "batch_size", "output", "tta", "tile", "overlap",
                     "normalization", "activation", "channels", "spacing_tolerance", "resample",
                     "pixel_size", "diameter"]  # fmt: skip


def test_the_model_hash_is_part_of_the_config_hash(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(models["unet2"], folder)
    data = {"input": {"path": "in"}, "output": {"store": "out.zarr"},
            "pipeline": [{"op": "model", "path": "m"}]}  # fmt: skip
    first = parse_config(data, base_dir=tmp_path)
    assert first.pipeline[0]["path"] == str(folder)  # relative to the config file
    before = first.config_hash()
    assert parse_config(data, base_dir=tmp_path).config_hash() == before
    torch.manual_seed(99)  # retrained: same path and card, other weights
    save_checkpoint(folder, build_network(_card(2).network_spec()).eval(), _card(2))
    assert parse_config(data, base_dir=tmp_path).config_hash() != before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_path_agrees_with_cpu(models: dict[str, Path]) -> None:
    image = np.random.default_rng(5).gamma(2.0, 50.0, (40, 44)).astype(np.float32)
    step = {"op": "model", "path": str(models["unet2"]), "batch_size": 2, "output": "foreground"}
    cpu = segment(image, [{**step, "device": "cpu"}], block_shape=(16, 24))
    gpu = segment(image, [{**step, "device": "cuda"}], block_shape=(16, 24))
    # CUDA runs under bf16 autocast (8 bits of mantissa): probabilities differ by up to a
    # few 1e-2 from float32 CPU; 0.05 still catches a wrong tile, halo or normalisation.
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=0.05)


def test_local_cluster_gpu_workers_take_every_model_task(models: dict[str, Path]) -> None:
    """A GPU worker (faked here: CUDA_VISIBLE_DEVICES=0 on a CPU machine) advertises GPU=1;
    the model step's block tasks run on it alone, the other worker never loads the model."""
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    image = np.random.default_rng(0).random((64, 96), dtype=np.float32)
    step = {"op": "model", "path": str(models["unet2"]), "output": "foreground"}
    with (
        start_local_cluster(2, gpus=["0"], dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        workers = client.scheduler_info()["workers"].values()
        assert sorted(str(w.get("resources")) for w in workers) == ["{'GPU': 1}", "{}"]
        out = segment(image, [step], block_shape=(32, 32), client=client)

        def report() -> tuple[str | None, int]:
            import os

            from segflow.engine.resources import builds

            return os.environ.get("CUDA_VISIBLE_DEVICES"), builds()

        seen = sorted(client.run(report).values(), key=str)
    assert seen == [("", 0), ("0", 1)]  # 6 blocks, one model load, on the GPU worker only
    np.testing.assert_allclose(out, segment(image, [step], block_shape=(32, 32)), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_local_cluster_runs_model_blocks_on_its_gpu_worker(models: dict[str, Path]) -> None:
    """On a GPU machine: one worker per visible device, the model loaded on CUDA there only,
    and the blockwise output as on CPU (bf16 tolerance)."""
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster, visible_gpus

    gpus = visible_gpus()
    assert gpus, "torch sees a GPU but neither CUDA_VISIBLE_DEVICES nor the driver lists one"
    image = np.random.default_rng(0).random((256, 320), dtype=np.float32)
    step = {"op": "model", "path": str(models["basic_unet2"]), "output": "foreground"}
    with (
        start_local_cluster(len(gpus) + 1, gpus=gpus, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        out = segment(image, [step], block_shape=(128, 128), client=client)

        def report() -> tuple[bool, int]:
            from segflow.engine.resources import builds

            return torch.cuda.is_available(), builds()

        seen = sorted(client.run(report).values())
    # the GPU workers loaded the model at most once each (with several GPUs, one may get no
    # block); the other worker sees no GPU and loads none
    assert seen[0] == (False, 0) and all(cuda and n <= 1 for cuda, n in seen[1:])
    assert len(seen) == len(gpus) + 1 and sum(n for _, n in seen) >= 1
    cpu = segment(image, [{**step, "device": "cpu"}], block_shape=(128, 128))
    np.testing.assert_allclose(out, cpu, rtol=0, atol=0.05)

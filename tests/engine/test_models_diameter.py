"""The model step's ``diameter``: the item zoomed to the card's object size, the network run
there, its output brought back to the item's grid, the same on every block layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, example, given, settings

from segflow import segment
from segflow.engine.pipeline import compile_pipeline
from segflow.errors import ConfigError, PlanError
from segflow.models.card import ModelCard, item_statistics, normalize_image
from segflow.models.checkpoint import load_checkpoint, save_checkpoint
from segflow.models.inference import predict_image
from segflow.models.networks import build_network

cv2 = pytest.importorskip("cv2", reason="OpenCV (the dev extra) resizes as Cellpose does")

torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more

#: The tiny flow network's training diameter (its card's ``diameter``), pixels.
TRAINED = 10.0


def _card(**changes: object) -> ModelCard:
    fields: dict[str, object] = {
        "name": "tinyflows",
        "architecture": {"name": "segnet", "params": {"features": [4, 8]}},
        "spatial_dims": 2,
        "channels": [{"name": "dapi", "normalization": {"method": "percentile"}}],
        "head": "flows",
        "tile": (16, 16),
        "overlap": 0.25,
        "diameter": TRAINED,
    }
    fields.update(changes)
    return ModelCard.model_validate(fields)


def _save(folder: Path, card: ModelCard, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(folder, build_network(card.network_spec()).eval(), card)
    return folder


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("flows") / "m", _card())


def _zoomed_whole_item(path: Path, image: np.ndarray, diameter: float) -> np.ndarray:
    """The reference on the whole item, as Cellpose's ``eval(diameter=...)``: normalised
    on the whole item, resized bilinearly (scikit-image, in float64; OpenCV's resize,
    Cellpose's, agrees with it: ``test_the_zoom_is_opencvs_bilinear_resize``), the sliding
    window over the resized image, its output resized back."""
    from skimage.transform import resize

    card = load_checkpoint(path).card
    x = normalize_image(image[None], card.channels, item_statistics(image[None], card.channels))
    size = tuple(max(1, round(n * TRAINED / diameter)) for n in image.shape)
    small = resize(x.astype(np.float64), (1, *size), order=1, mode="edge", anti_aliasing=False)
    out = predict_image(load_checkpoint(path).module, small.astype(np.float32),
                        tile=card.tile, overlap=card.overlap, flows=True)  # fmt: skip
    back = resize(out.astype(np.float64), (3, *image.shape), order=1, mode="edge",
                  anti_aliasing=False)  # fmt: skip
    return np.asarray(back)


def test_the_zoom_is_opencvs_bilinear_resize() -> None:
    """What ``diameter`` resamples with (order 1) equals OpenCV's ``INTER_LINEAR`` resize,
    what Cellpose's ``transforms.resize_image`` calls, both ways."""
    from segflow.models.resampling import resample_region

    data = np.random.default_rng(0).random((57, 61)).astype(np.float32)
    for shape in ((41, 44), (95, 102), (57, 30)):
        ours = resample_region(data[None], (slice(0, 57), slice(0, 61)), (57, 61), shape,
                               (slice(0, shape[0]), slice(0, shape[1])), (1, 1))  # fmt: skip
        theirs = cv2.resize(data, shape[::-1], interpolation=cv2.INTER_LINEAR)
        # OpenCV interpolates in float32 (segflow in float64): rounding of values in [0, 1)
        np.testing.assert_allclose(ours[0], theirs, rtol=0, atol=1e-6)


@given(layout=layouts(2, max_side=60))
@example(layout=((57, 61), (57, 61), 1))  # one block
@example(layout=((57, 61), (11, 23), 2))  # uneven blocks, smaller than the halo
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_diameter_zooms_a_flow_head_blockwise_on_every_layout(
    flow_model: Path, layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    """Objects of 14 and of 6 pixels brought to the card's 10 (zoom 0.71 and 1.67)."""
    shape, blocks, seed = layout
    image = (smooth_noise(shape, seed) * 4000).astype(np.uint16)
    for diameter in (14.0, 6.0):
        step = {"op": "model", "path": str(flow_model), "output": "raw", "diameter": diameter}
        out = np.asarray(segment(image, [step], block_shape=blocks))
        # the same float64 resampling and float32 tiles, summed in another order: float32
        # rounding of flows of order 1 (a wrong tile, halo or pixel is off by 1e-2 or more)
        np.testing.assert_allclose(out, _zoomed_whole_item(flow_model, image, diameter),
                                   rtol=0, atol=1e-5)  # fmt: skip


@pytest.fixture(scope="module")
def uphill_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flow "network" with flows that converge: a 3 x 3 convolution whose flows are the
    normalised image's central differences (uphill, towards each bright blob's top) times
    60, and whose cell probability is ``8 * (x - 0.4)``; TorchScript with a card beside it."""
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0, 2, 1], net.weight[0, 0, 0, 1] = 30.0, -30.0  # d/dy
        net.weight[1, 0, 1, 2], net.weight[1, 0, 1, 0] = 30.0, -30.0  # d/dx
        net.weight[2, 0, 1, 1] = 8.0
        net.bias.copy_(torch.tensor([0.0, 0.0, -3.2]))
    path = tmp_path_factory.mktemp("uphill") / "uphill.pt"
    with warnings.catch_warnings():
        # torch 2.13 deprecates tracing; users still bring TorchScript files, so make one.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(net.eval(), torch.zeros(1, 1, 16, 16)).save(str(path))
    card = _card(name="uphill", architecture={"name": "torchscript"})
    path.with_suffix(".json").write_text(card.model_dump_json())
    return path


def test_diameter_feeds_flow_dynamics_alike_on_two_layouts(uphill_model: Path) -> None:
    """The whole pipeline, model at a diameter then flow_dynamics: the same instances on
    one block and on two block layouts, and other instances than without the zoom."""
    image = (smooth_noise((90, 70), 7, sigma=3.0) * 4000).astype(np.uint16)
    model = {"op": "model", "path": str(uphill_model), "output": "raw", "diameter": 16.0}
    pipeline = [model, {"op": "flow_dynamics", "min_size": 0, "max_travel": 40}]
    whole = np.asarray(segment(image, pipeline))
    assert len(np.unique(whole)) > 3  # some instances to compare
    for blocks in ((32, 32), (45, 23)):
        labels = np.asarray(segment(image, pipeline, block_shape=blocks))
        pairs = np.unique(np.stack([whole.ravel(), labels.ravel()]), axis=1)
        assert len(pairs[0]) == len(np.unique(whole)) == len(np.unique(labels))  # one-to-one
        assert ((whole == 0) == (labels == 0)).all()
    unzoomed = np.asarray(segment(image, [{**model, "diameter": None}, pipeline[1]]))
    assert (unzoomed != whole).any()


def test_the_cards_own_diameter_is_no_zoom(flow_model: Path) -> None:
    image = (smooth_noise((40, 50), 4) * 4000).astype(np.uint16)
    step = {"op": "model", "path": str(flow_model), "output": "raw"}
    plain = segment(image, [step], block_shape=(16, 20))
    same = segment(image, [{**step, "diameter": TRAINED}], block_shape=(16, 20))
    np.testing.assert_array_equal(plain, same)


def test_the_halo_is_a_tile_in_item_pixels_without_spline_filters(flow_model: Path) -> None:
    def halo(diameter: float) -> tuple[int, ...]:
        step = {"op": "model", "path": str(flow_model), "output": "raw", "diameter": diameter}
        return compile_pipeline([step], spatial_ndim=2, channels=1, dtype="uint16").halo

    # 16 model pixels of tile, f item pixels each (16 / (16 - 0.5): the model grid's
    # rounding), plus 3 for both bilinear taps
    assert halo(20.0) == (37, 37)  # f = 2
    assert halo(5.0) == (12, 12)  # f = 0.5


def test_bad_diameters_are_refused_in_one_line(flow_model: Path, tmp_path: Path) -> None:
    def plan(path: Path, **params: object) -> object:
        step = {"op": "model", "path": str(path), "output": "raw", **params}
        return compile_pipeline([step], spatial_ndim=2, channels=1, dtype="uint16",
                                spacing=(0.5, 0.5), units="um")  # fmt: skip

    for value, why in ((0, "greater than 0"), (-3.0, "greater than 0"), ("big", "a valid number")):
        with pytest.raises(ConfigError, match=rf"^pipeline\[0\]\.diameter: Input should be "
                           rf"{why}.* \(got {value!r}\)$"):  # fmt: skip
            plan(flow_model, diameter=value)
    zoom = (r"^pipeline\[0\] 'model': `diameter` 1 would zoom the item 10 times \(the card's "
            r"diameter 10 / 1\), more than 8")  # fmt: skip
    with pytest.raises(PlanError, match=zoom):
        plan(flow_model, diameter=1.0)
    plan(flow_model, diameter=1.25)  # zoom 8: allowed
    bare = _save(tmp_path / "bare", _card(diameter=None))
    with pytest.raises(PlanError, match=r"`diameter` 25: model '.*bare' \(.*\) states no "
                       r"training diameter \(the card's `diameter`"):  # fmt: skip
        plan(bare, diameter=25.0)
    plan(bare)  # no diameter asked: runs as before
    distance = _save(tmp_path / "distance", _card(head="foreground_distance"))
    with pytest.raises(PlanError, match=r"`diameter` 25: model .* has a distance head"):
        plan(distance, diameter=25.0)
    spaced = _save(tmp_path / "spaced", _card(spacing=(0.5, 0.5), units="um"))
    with pytest.raises(PlanError, match=r"`diameter` 25: model .* is resampled to its card's "
                       r"spacing \(resample\); the two scales cannot both apply"):  # fmt: skip
        plan(spaced, diameter=25.0, resample=True)
    plan(spaced, diameter=25.0, resample=False)


def test_a_bad_diameter_is_one_line_naming_the_item(flow_model: Path) -> None:
    from segflow.engine.item import describe_item_error

    step = {"op": "model", "path": str(flow_model), "output": "raw", "diameter": 0.5}
    with pytest.raises(PlanError) as caught:
        compile_pipeline([step], spatial_ndim=2, channels=1, dtype="uint8")
    line = describe_item_error(caught.value, "cells", "/in/cells.png")
    assert line.splitlines() == [line]
    assert line.startswith("item 'cells' (/in/cells.png): PlanError: pipeline[0] 'model': "
                           "`diameter` 0.5 would zoom the item 20 times")  # fmt: skip

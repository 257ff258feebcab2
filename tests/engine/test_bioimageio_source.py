"""bioimage.io model packages: the package's own test input gives its own test output.

Each package is built here: a tiny network saved as TorchScript (or ONNX), an ``rdf.yaml``
in format 0.5, and test tensors made by running the network on the test input after the
preprocessing the spec defines (written out below in numpy, with the spec's ``eps``). The
spec's tolerance is rtol 1e-4 / atol 1e-4 (its defaults when ``rdf.yaml`` states none);
segflow leaves out the ``eps`` of 1e-6 in the denominators, which is far below that.
``bioimageio.core`` (the native runtime) pins ``bioimageio.spec`` 0.5.12, which fails with
pydantic 2.14, so the reference is the package's own test output, as the spec intends.
"""

from __future__ import annotations

import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _layouts import layouts
from hypothesis import HealthCheck, given, settings

from segflow import segment
from segflow.errors import ModelError
from segflow.models.card import item_statistics, normalize_image
from segflow.models.inference import predict_image
from segflow.models.sources import card_lines, describe_model, load_source

pytest.importorskip("bioimageio.spec")
torch.set_num_threads(1)  # the test machine is shared; small tensors gain nothing from more
EPS = 1e-6


def _net(classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, classes, 1)
    ).eval()


def _axes(channels: list[str], size: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    size = size or {"min": 16, "step": 8}
    space = {"size": size, "scale": 0.5, "unit": "micrometer"}
    channel = {"type": "channel", "channel_names": channels}
    return [{"type": "batch"}, channel, {"type": "space", "id": "y", **space},
            {"type": "space", "id": "x", **space}]  # fmt: skip


def _out_axes(channels: list[str]) -> list[dict[str, Any]]:
    return [{"type": "batch"}, {"type": "channel", "channel_names": channels},
            {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"},
             "scale": 0.5, "unit": "micrometer"},
            {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"},
             "scale": 0.5, "unit": "micrometer"}]  # fmt: skip


def _rdf(preprocessing: list[Any], classes: list[str], post: list[Any], weights: Any) -> Any:
    return {
        "format_version": "0.5.4", "type": "model", "name": "tiny-net",
        "description": "a tiny test network", "authors": [{"name": "segflow tests"}],
        "cite": [{"text": "segflow", "url": "https://example.org"}], "license": "MIT",
        "documentation": "README.md",
        "inputs": [{"id": "raw", "axes": _axes(["dapi"]), "preprocessing": preprocessing,
                    "test_tensor": {"source": "test_input.npy"}}],
        "outputs": [{"id": "prob", "axes": _out_axes(classes), "postprocessing": post,
                     "test_tensor": {"source": "test_output.npy"}}],
        "weights": weights,
    }  # fmt: skip


def _save_weights(net: torch.nn.Module, folder: Path, kind: str) -> dict[str, Any]:
    if kind == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(1, 1, 32, 48),), str(folder / "weights.onnx"),
                              dynamo=False, input_names=["raw"],
                              dynamic_axes={"raw": {0: "b", 2: "y", 3: "x"}})  # fmt: skip
        return {"onnx": {"source": "weights.onnx", "opset_version": 17}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; zoo models use it
        torch.jit.script(net).save(str(folder / "weights.pt"))
    return {"torchscript": {"source": "weights.pt", "pytorch_version": "2.13"}}


def _scaled(x: np.ndarray, preprocessing: list[dict[str, Any]]) -> np.ndarray:
    """The spec's preprocessing, per sample over y and x, written out."""
    for step in preprocessing:
        kwargs = step.get("kwargs", {})
        if step["id"] == "scale_range":
            low, high = np.percentile(x, [kwargs["min_percentile"], kwargs["max_percentile"]])
            x = (x - low) / (high - low + EPS)
        elif step["id"] == "zero_mean_unit_variance":
            x = (x - x.mean()) / (x.std() + EPS)
        elif step["id"] == "clip":
            x = np.clip(x, kwargs["min"], kwargs["max"])
    return x.astype(np.float32)


RANGE = {"axes": ["y", "x"], "min_percentile": 1, "max_percentile": 99.8}
SCALE_RANGE = [{"id": "scale_range", "kwargs": RANGE}]
ZSCORE_CLIP = [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}},
               {"id": "clip", "kwargs": {"min": -1.0, "max": 1.5}}]  # fmt: skip


def make_package(folder: Path, *, preprocessing: list[Any] = SCALE_RANGE, classes: int = 2,
                 sigmoid: bool = True, kind: str = "torchscript") -> Path:  # fmt: skip
    """A package folder whose test output is its network run on its test input."""
    folder.mkdir(parents=True)
    net = _net(classes, seed=classes)
    x = np.random.default_rng(0).gamma(2.0, 50.0, (1, 1, 32, 48)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(_scaled(x, preprocessing))).numpy()
    y = 1 / (1 + np.exp(-y)) if sigmoid else y
    np.save(folder / "test_input.npy", x)
    np.save(folder / "test_output.npy", y.astype(np.float32))
    (folder / "README.md").write_text("A tiny network for segflow's tests.\n")
    names = ["background", "cell"] if classes == 2 else ["cell"]
    post = [{"id": "sigmoid"}] if sigmoid else []
    rdf = _rdf(preprocessing, names, post, _save_weights(net, folder, kind))
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_packages(tmp_path_factory.mktemp("bioimageio"))


def make_packages(root: Path) -> dict[str, Path]:
    """The tiny TorchScript package (folder and zip) and the ONNX package under ``root``."""
    folder = make_package(root / "ts")
    archive = root / "ts.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in folder.iterdir():
            z.write(file, file.name)
    onnx = make_package(root / "onnx", preprocessing=ZSCORE_CLIP, classes=1, sigmoid=False,
                        kind="onnx")  # fmt: skip
    return {"ts": folder, "zip": archive, "onnx": onnx}


def _segflow(path: Path, image: np.ndarray) -> np.ndarray:
    """segflow's blended output on a whole item ``(y, x)``, from the loaded source."""
    card = describe_model(path).card
    x = normalize_image(image[None], card.channels, item_statistics(image[None], card.channels))
    loaded = load_source(path, card, batch_size=2)
    return predict_image(loaded.module, x, tile=card.tile, overlap=card.overlap,
                         window=card.window, activation=card.activation, batch_size=2)  # fmt: skip


def _step(path: Path, **params: Any) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "foreground", "spacing_tolerance": None, **params}  # fmt: skip


def _own_test(path: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = path if path.is_dir() else None
    if folder is None:
        with zipfile.ZipFile(path) as z:
            load = lambda name: np.load(z.open(name))  # noqa: E731
            return load("test_input.npy"), load("test_output.npy")
    return np.load(folder / "test_input.npy"), np.load(folder / "test_output.npy")


# -- the card and the package's own test ---------------------------------------------------------


def test_the_card_comes_from_rdf_yaml(packages: dict[str, Path]) -> None:
    described = describe_model(packages["ts"])
    card = described.card
    assert (card.spatial_dims, card.tile, card.classes) == (2, (32, 48), ("background", "cell"))
    assert card.channels[0].name == "dapi" and card.activation == "sigmoid"
    norm = card.channels[0].normalization
    assert (norm.method, norm.low, norm.high) == ("percentile", 1.0, 99.8)
    assert (card.spacing, card.units) == ((0.5, 0.5), "um")
    lines = "\n".join(card_lines(str(packages["ts"]), described))
    assert "per-sample statistics are the item's" in lines and "min 16, step 8" in lines
    onnx = describe_model(packages["onnx"]).card
    assert onnx.classes == ("background", "cell") and onnx.activation == "none"
    assert onnx.architecture.params["pointwise"][0]["id"] == "clip"


@pytest.mark.parametrize("name", ["ts", "zip", "onnx"])
def test_the_package_test_input_gives_its_test_output(packages: dict[str, Path], name: str) -> None:
    test_input, test_output = _own_test(packages[name])
    ours = _segflow(packages[name], test_input[0, 0])
    expected = test_output[0] if len(test_output[0]) > 1 else test_output[0, -1:]
    # the spec's default tolerance; one tile covers the test input, so no blending
    np.testing.assert_allclose(ours[-len(expected) :], expected, rtol=1e-4, atol=1e-4)
    out = segment(test_input[0, 0], [_step(packages[name])])  # through the pipeline
    foreground = test_output[0, -1] if name == "onnx" else 1.0 - test_output[0, 0]
    np.testing.assert_allclose(out, foreground, rtol=1e-4, atol=1e-4)


@given(layout=layouts(2, max_side=80))
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_blockwise_equals_whole_item_on_every_layout(
    packages: dict[str, Path], layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    shape, blocks, seed = layout
    image = np.random.default_rng(seed).gamma(2.0, 50.0, shape).astype(np.float32)
    out = segment(image, [_step(packages["ts"])], block_shape=blocks)
    whole = _segflow(packages["ts"], image)
    # float64 blending of the same tiles in the same order; percentiles exact either way
    np.testing.assert_allclose(out, 1.0 - whole[0], rtol=0, atol=1e-5)


# -- bad packages, one line each -----------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text.strip(), text
    return text


def _edited(packages: dict[str, Path], tmp_path: Path, edit: Any) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(packages["ts"], folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    edit(rdf)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    return folder


def test_a_missing_rdf_field_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited(packages, tmp_path, lambda rdf: rdf.pop("inputs"))
    with pytest.raises(ModelError, match=r"bioimage.io package '.*edited': rdf.yaml is not a "
                       r"valid model description \(.*inputs") as error:  # fmt: skip
        describe_model(folder)
    _one_line(error)


def test_a_zip_without_rdf_yaml_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("weights.pt", b"")
    with pytest.raises(ModelError, match=r"'.*empty.zip' has no rdf.yaml") as error:
        describe_model(archive)
    _one_line(error)


def test_statistics_over_one_axis_are_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    def per_row(rdf: dict[str, Any]) -> None:
        rdf["inputs"][0]["preprocessing"][0]["kwargs"]["axes"] = ["x"]

    with pytest.raises(ModelError, match=r"preprocessing scale_range .* has no whole-item "
                       r"equivalent in segflow \(statistics over other axes") as error:  # fmt: skip
        describe_model(_edited(packages, tmp_path, per_row))
    _one_line(error)


def test_an_architecture_in_the_package_is_not_run(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    def code(rdf: dict[str, Any]) -> None:
        rdf["weights"] = {"pytorch_state_dict": {
            "source": "weights.pt", "pytorch_version": "2.13",
            "architecture": {"source": "net.py", "callable": "Net"}}}  # fmt: skip

    folder = _edited(packages, tmp_path, code)
    (folder / "net.py").write_text("raise SystemExit('downloaded code ran')\nclass Net: ...\n")
    with pytest.raises(ModelError, match=r"architecture is code in the package \(net.py\); "
                       r"segflow does not run downloaded code") as error:  # fmt: skip
        describe_model(folder)
    _one_line(error)


def test_a_tile_the_input_does_not_allow_is_refused_at_load(packages: dict[str, Path]) -> None:
    from segflow.models.sources import CardOverrides

    described = describe_model(packages["ts"])
    card = CardOverrides(tile=(36, 48)).apply(described, "ts")
    with pytest.raises(ModelError, match=r"`tile` \(36, 48\) does not fit input axis 'y', whose "
                       r"size must be 16 \+ n \* 8") as error:  # fmt: skip
        load_source(packages["ts"], card)
    _one_line(error)
    load_source(packages["ts"], CardOverrides(tile=(40, 64)).apply(described, "ts"))

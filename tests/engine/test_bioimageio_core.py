"""segflow's bioimage.io source against ``bioimageio.core``, the spec's own runtime.

The packages are the ones tests/engine/test_bioimageio_source.py builds: TorchScript weights
with ``scale_range`` 1..99.8 and a sigmoid (as a folder and zipped), ONNX weights with
``zero_mean_unit_variance`` then ``clip`` -1..1.5 and one raw output channel.

``bioimageio.core.predict`` without a block size runs the sample in one piece: the rdf's
preprocessing with per-sample statistics over y and x (``eps`` 1e-6 in the denominators),
the weights (torch for TorchScript, onnxruntime for ONNX), then the postprocessing. segflow
maps the same steps to whole-item statistics (no ``eps``) and runs its tiles; with the tile
set to the image's shape it runs the image as one tile, which is compared here: equal
within 1e-5 absolute (measured up to 1.2e-7 with bioimageio.core 0.11.0, 2026-12-07).

Larger images in several tiles are not compared: segflow blends overlapping tiles (overlap
0.5) where each tile's border sees zero padding instead of the image, while
bioimageio.core's own blocking (``blocksize_parameter``) abuts blocks and crops the output
``halo`` (0 in these packages), without blending. On 80 x 120 with segflow's default
32 x 48 tiles against bioimageio.core in one piece the largest difference measured was
1.1e-3 after the sigmoid and 4.5e-2 on the raw ONNX output (2026-12-07).

bioimageio.core 0.11 pins ``bioimageio.spec`` 0.5.12, which fails with pydantic 2.14, so it is
installed beside spec 0.5.14 with ``--no-deps`` (Makefile); these tests skip without it.
"""

from __future__ import annotations

import gc
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_bioimageio_source import make_packages

from segflow import segment
from segflow.models.card import item_statistics, normalize_image
from segflow.models.inference import predict_image
from segflow.models.sources import CardOverrides, describe_model, load_source

core = pytest.importorskip(
    "bioimageio.core",
    reason="bioimageio.core (bioimage.io's runtime) is not installed; `make install` "
    "installs it with --no-deps",
)
from bioimageio.spec.model.v0_5 import ModelDescr  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_packages(tmp_path_factory.mktemp("bioimageio-core"))


def _core(path: Path, image: np.ndarray) -> np.ndarray:
    """bioimageio.core's prediction of ``image`` ``(y, x)`` in one piece: ``(channels, y, x)``."""
    with warnings.catch_warnings():
        # bioimageio.spec/core leave package files open (ResourceWarning); torch 2.13
        # deprecates the torch.jit.load bioimageio.core calls for TorchScript weights
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated")
        descr = core.load_description(path, perform_io_checks=False)
        assert isinstance(descr, ModelDescr), descr.validation_summary.errors[:2]
        sample = core.predict(model=descr, inputs=image[None, None].astype(np.float32))
        del descr
        gc.collect()  # the open files are closed here, under these filters
    (tensor,) = sample.members.values()
    return np.asarray(tensor.data.transpose("batch", "channel", "y", "x").values[0])


def _segflow(path: Path, image: np.ndarray) -> np.ndarray:
    """segflow's classes ``(classes, y, x)`` with the whole image as one tile."""
    card = CardOverrides(tile=image.shape).apply(describe_model(path), path.name)
    x = normalize_image(image[None], card.channels, item_statistics(image[None], card.channels))
    loaded = load_source(path, card, batch_size=1)
    return predict_image(loaded.module, x, tile=card.tile, overlap=card.overlap,
                         window=card.window, activation=card.activation, batch_size=1)  # fmt: skip


def _step(path: Path, tile: tuple[int, ...]) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 1,
            "output": "foreground", "spacing_tolerance": None, "tile": list(tile)}  # fmt: skip


def _compare(path: Path, image: np.ndarray) -> None:
    theirs = _core(path, image)
    ours = _segflow(path, image)
    # a one-channel output is segflow's last class (class 0 is its complement)
    np.testing.assert_allclose(ours[-len(theirs) :], theirs, rtol=0, atol=ATOL)
    foreground = segment(image, [_step(path, image.shape)])  # through the model step
    expected = theirs[-1] if len(theirs) == 1 else 1.0 - theirs[0]
    np.testing.assert_allclose(foreground, expected, rtol=0, atol=ATOL)


def _test_input(path: Path) -> np.ndarray:
    if path.is_file():
        with zipfile.ZipFile(path) as z:
            return np.asarray(np.load(z.open("test_input.npy")))[0, 0]
    return np.asarray(np.load(path / "test_input.npy"))[0, 0]


@pytest.mark.parametrize("name", ["ts", "zip", "onnx"])
def test_the_test_input_gives_what_bioimageio_core_gives(
    packages: dict[str, Path], name: str
) -> None:
    _compare(packages[name], _test_input(packages[name]))


@pytest.mark.parametrize("name", ["ts", "onnx"])
def test_a_larger_image_gives_what_bioimageio_core_gives(
    packages: dict[str, Path], name: str
) -> None:
    # 80 x 120 = 16 + n * 8 on both axes (the inputs' min and step), 2.5 x the test tiles
    rng = np.random.default_rng(7)
    ramp = np.linspace(0.0, 300.0, 120, dtype=np.float32)[None, :]
    image = (rng.gamma(3.0, 20.0, (80, 120)) + ramp).astype(np.float32)
    _compare(packages[name], image)

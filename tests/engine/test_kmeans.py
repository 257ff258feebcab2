"""K-means: centres from a layout-independent sample, assignment equal to the whole array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.cluster.vq import vq

from segflow import segment
from segflow.engine.api import run_item
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.engine.pipeline import compile_pipeline
from segflow.engine.run import ArraySink
from segflow.io import discover_items
from segflow.io.zarr import ArrayReader
from segflow.ops.cluster import KMeansParams, assign, features, fit_kmeans

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Layout = tuple[tuple[int, ...], tuple[int, ...], int]


def _run(image: np.ndarray, step: dict[str, object], blocks: tuple[int, ...]):
    reader = ArrayReader(image, "scene", channel_axis=0)
    plan = compile_pipeline([step], spatial_ndim=2, channels=image.shape[0], dtype=image.dtype)
    with LocalExecutor(2) as executor:
        run = run_item(
            reader, plan, block_shape=blocks, executor=executor, make_sink=lambda d: ArraySink()
        )
    out = np.zeros(image.shape[1:], dtype=np.uint8)
    for summary in run.blocks:
        region, data = summary.written
        out[region] = data
    return out, np.asarray(run.stats["pipeline[0].kmeans"])


@SETTINGS
@given(layouts(max_side=40), st.integers(2, 4), st.sampled_from([0.0, 0.5]))
def test_kmeans_is_layout_independent_and_equals_whole_array_assignment(
    layout: Layout, k: int, position: float
) -> None:
    shape, blocks, seed = layout
    if np.prod(shape) < 8:
        return
    bands = np.stack([smooth_noise(shape, seed), smooth_noise(shape, seed + 1)])
    step = {"op": "kmeans", "k": k, "position": position, "sample": 200}
    result, centres = _run(bands, step, blocks)
    whole, whole_centres = _run(bands, step, shape)  # one block
    np.testing.assert_array_equal(centres, whole_centres)
    np.testing.assert_array_equal(result, whole)
    box = tuple(slice(0, n) for n in shape)
    expected = assign(features(bands, box, shape, position), centres).reshape(shape) + 1
    np.testing.assert_array_equal(result, expected)


def test_kmeans_separates_two_populations() -> None:
    image = np.zeros((40, 60), dtype=np.float32)
    image[:, 30:] = 10.0
    image += np.random.default_rng(0).normal(0, 0.5, image.shape).astype(np.float32)
    classes = segment(image, [{"op": "kmeans", "k": 2}], block_shape=16)
    assert len(np.unique(classes[:, :30])) == 1 and len(np.unique(classes[:, 30:])) == 1
    assert classes[0, 0] != classes[0, -1]


def test_mini_batch_fit_for_large_samples() -> None:
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(0, 1, (150_000, 1)), rng.normal(20, 1, (150_000, 1))])
    centres = fit_kmeans(data, KMeansParams(k=2, max_iter=30))
    np.testing.assert_allclose(np.sort(centres[:, 0]), [0.0, 20.0], atol=0.2)
    with pytest.raises(ValueError, match="needs at least k=3 samples"):
        fit_kmeans(data[:2], KMeansParams(k=3))


def test_kmeans_item_reports_its_centres(tmp_path: Path) -> None:
    """Through the store path: the index gets each centre coordinate as a statistic."""
    rng = np.random.default_rng(3)
    image = np.stack([rng.normal(0, 1, (40, 50)), rng.normal(5, 1, (40, 50))]).astype("f4")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "scene", channel_axis=0),
            [{"op": "kmeans", "k": 2}],
            store=str(tmp_path / "out.zarr"),
            block_shape=(16, 16),
            executor=executor,
        )
    assert result.status == "done", result.error
    assert len([k for k in result.statistics if k.startswith("pipeline[0].kmeans")]) == 4
    centres = np.array([result.statistics[f"pipeline[0].kmeans.{i}"] for i in range(4)])
    assert abs(centres.reshape(2, 2)[:, 1].mean() - 5) < 1  # (k, features), row by row


@pytest.mark.parametrize("blocks", [(64, 97), (300, 13)])
def test_kmeans_on_a_real_landsat_scene(blocks: tuple[int, int]) -> None:
    """Three Landsat bands (bundled sample): same centres and assignment as one block, and
    the whole-array nearest-centre assignment (scipy.cluster.vq.vq) with those centres."""
    readers, _ = discover_items(str(Path(__file__).parents[1] / "data" / "aerial" / "*.tif"))
    bands = readers[0].read((slice(200, 500), slice(250, 550)))
    step = {"op": "kmeans", "k": 4, "sample": 5000}
    result, centres = _run(bands, step, blocks)
    whole, whole_centres = _run(bands, step, bands.shape[1:])
    np.testing.assert_array_equal(centres, whole_centres)
    np.testing.assert_array_equal(result, whole)
    pixels = bands.reshape(3, -1).T.astype(np.float64)
    nearest, _ = vq(pixels, centres)
    np.testing.assert_array_equal(result, nearest.reshape(bands.shape[1:]) + 1)
    assert len(np.unique(result)) == 4


@SETTINGS
@given(layouts(max_side=40), st.floats(0.05, 0.8))
def test_kmeans_leaves_nan_pixels_out(layout: Layout, fraction: float) -> None:
    """A pixel with a NaN band has no value: never sampled, class 0; the rest as without it."""
    shape, blocks, seed = layout
    bands = np.stack([smooth_noise(shape, seed), smooth_noise(shape, seed + 1)])
    missing = np.random.default_rng(seed).random(shape) < fraction
    bands[1][missing] = np.nan
    if np.count_nonzero(~missing) < 8:
        return
    step = {"op": "kmeans", "k": 2, "sample": 10_000}  # more than the pixels: all are fitted
    result, centres = _run(bands, step, blocks)
    whole, whole_centres = _run(bands, step, shape)
    np.testing.assert_array_equal(centres, whole_centres)
    np.testing.assert_array_equal(result, whole)
    assert np.isfinite(centres).all()
    valid = bands[:, ~missing].T.astype(np.float64)
    np.testing.assert_array_equal(centres, fit_kmeans(valid, KMeansParams(k=2, sample=10_000)))
    assert (result[missing] == 0).all()
    np.testing.assert_array_equal(result[~missing], assign(valid, centres) + 1)

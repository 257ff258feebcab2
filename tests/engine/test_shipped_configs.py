"""Every shipped config, run blockwise on the bundled sample data, equals one whole block.

One block covering the item is each operation applied by scipy/scikit-image to the whole
array, i.e. the reference; the blockwise layouts include uneven blocks and blocks smaller than
the pipeline's halo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _compare import assert_same_labels

from segflow import segment
from segflow.config import load_config
from segflow.engine import compile_pipeline
from segflow.io import discover_items

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def _layouts(shape: tuple[int, ...], configured: list[int] | int) -> list[tuple[int, ...]]:
    configured = [configured] * len(shape) if isinstance(configured, int) else configured
    return [
        tuple(configured),
        tuple(max(n // 3 + 1, 1) for n in shape),  # uneven: three blocks, the last smaller
        tuple(max(n // 5, 1) for n in shape),
        tuple(7 for _ in shape),  # smaller than the halo of every shipped pipeline
        (1, *shape[1:]),  # one pixel along the first axis
    ]


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_blockwise_equals_whole(config_path: Path) -> None:
    config = load_config(config_path)
    readers, failures = discover_items(config.input.path)
    assert readers and not failures
    for reader in readers:
        info = reader.info
        shape = info.spatial_shape
        image = reader.read(tuple(slice(0, n) for n in shape))
        plan = compile_pipeline(
            config.pipeline, spatial_ndim=len(shape), channels=info.n_channels, dtype=info.dtype
        )
        whole = segment(image, config.pipeline, block_shape=shape, channel_axis=0)
        assert whole.any(), f"{info.id}: the reference found nothing; the test would be vacuous"
        for layout in _layouts(shape, config.blocks.shape):
            tiny = layout == (7,) * len(shape) or layout[0] == 1
            if tiny and np.prod(shape) > 200_000:
                continue  # thousands of tiny blocks: covered by the smaller items
            result = segment(image, config.pipeline, block_shape=layout, channel_axis=0)
            if plan.out_kind == "labels":
                assert_same_labels(result, whole)
            else:
                np.testing.assert_array_equal(result, whole)


SHARED = Path(__file__).parents[3] / "shared" / "data"


@pytest.mark.shared_data
def test_nuclei_config_on_all_dsb2018_images() -> None:
    """The nuclei pipeline on the five DSB2018 images of ../shared/data (CC0)."""
    folder = SHARED / "microscopy" / "dsb2018_nuclei"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    config = load_config(CONFIGS[0].parent / "nuclei.yaml")
    readers, failures = discover_items(str(folder / "*" / "image.png"))
    assert len(readers) == 5 and not failures
    for reader in readers:
        shape = reader.info.spatial_shape
        image = reader.read(tuple(slice(0, n) for n in shape))
        whole = segment(image, config.pipeline, block_shape=shape, channel_axis=0)
        for layout in [(128, 128), (100, 77)]:
            result = segment(image, config.pipeline, block_shape=layout, channel_axis=0)
            assert_same_labels(result, whole)

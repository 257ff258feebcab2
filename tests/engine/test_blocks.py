"""Block planning, pipeline compilation and aligned (sharded) writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from segflow.engine import compile_pipeline, plan_blocks
from segflow.engine.blocks import shrink_box
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import PlanError
from segflow.io import ArrayReader


def test_grid_covers_the_item_once() -> None:
    grid = plan_blocks((10, 7), (4, 3), halo=(2, 1))
    seen = np.zeros((10, 7), dtype=int)
    for block in grid.blocks():
        seen[block.core] += 1
        for core, outer in zip(block.core, block.outer, strict=True):
            assert outer.start <= core.start and core.stop <= outer.stop
    assert (seen == 1).all()
    assert grid.grid_shape == (3, 3)
    assert [b.linear for b in grid.blocks()] == list(range(9))


def test_shrink_box_keeps_item_borders() -> None:
    box = (slice(0, 10), slice(3, 9))
    assert shrink_box(box, (2, 2), (10, 9)) == (slice(0, 10), slice(5, 9))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_shape": (0, 4)}, r"`blocks.shape` \(0, 4\) must be positive along every axis"),
        ({"block_shape": (4, 4, 4)}, r"`blocks.shape` \(4, 4, 4\) has 3 axes, the item has 2"),
        (
            {"block_shape": (48, 64), "storage_unit": (32, 32)},
            r"`blocks.shape` \(48, 64\) does not align with the output storage unit \(shard or "
            r"chunk\) \(32, 32\) along axis 0",
        ),
    ],
)
def test_plan_refuses_bad_layouts(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_blocks((100, 100), **kwargs)  # type: ignore[arg-type]


def test_compile_names_the_step_that_cannot_run() -> None:
    with pytest.raises(
        PlanError, match=r"pipeline\[0\] 'otsu' needs a single-channel image, got 3"
    ):
        compile_pipeline([{"op": "otsu"}], spatial_ndim=2, channels=3, dtype="uint8")
    with pytest.raises(PlanError, match=r"pipeline\[0\] 'median' works on \(2, 3\)-D items"):
        compile_pipeline([{"op": "median"}], spatial_ndim=1, channels=1, dtype="uint8")
    with pytest.raises(PlanError, match=r"`weights` has 2 values, the image has 3 bands"):
        compile_pipeline(
            [{"op": "combine_bands", "weights": [1, 1]}], spatial_ndim=2, channels=3, dtype="uint8"
        )


def test_halo_is_the_sum_of_local_operation_halos() -> None:
    plan = compile_pipeline(
        [
            {"op": "gaussian", "sigma": [1, 2]},  # radius int(4*sigma + 0.5): 4 and 8
            {"op": "otsu"},
            {"op": "binary_opening", "radius": 2},  # 2 * radius
            {"op": "median", "size": 5},  # size // 2
            {"op": "label"},
        ],
        spatial_ndim=2,
        channels=1,
        dtype="float32",
    )
    assert plan.halo == (4 + 4 + 2, 8 + 4 + 2)
    assert [p.ends_with for p in plan.phases] == ["statistic", "label", "output"]


def test_sharded_output_is_exact(tmp_path: Path) -> None:
    """Blocks aligned to shards write whole shards: every pixel lands (zarr 3.1 silently
    corrupted misaligned sharded writes, which the planner refuses above)."""
    rng = np.random.default_rng(0)
    image = (rng.random((150, 130)) < 0.4).astype(np.uint8)
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "img"),
            [{"op": "threshold", "value": 0}],
            store=store,
            block_shape=(64, 64),
            chunks=(16, 32),
            shards=(64, 64),
            executor=executor,
        )
    assert result.status == "done", result.error
    written = zarr.open_array(store, path="img/mask", mode="r")
    assert written.shards == (64, 64)
    np.testing.assert_array_equal(written[...], image)


def test_misaligned_blocks_fail_the_item_with_a_clear_error(tmp_path: Path) -> None:
    image = np.ones((100, 100), dtype=np.uint8)
    with LocalExecutor(1) as executor:
        result = segment_item(
            ArrayReader(image, "img"),
            [{"op": "threshold", "value": 0}],
            store=str(tmp_path / "out.zarr"),
            block_shape=(48, 48),
            shards=(32, 32),
            chunks=(16, 16),
            executor=executor,
        )
    assert result.status == "failed"
    assert result.error is not None
    assert "item 'img'" in result.error
    assert "does not align with the output storage unit" in result.error

"""A result's identity (``config_hash``) is derived from the config: every setting that can
change a stored byte redoes the items it made, a setting on the opt-out list does not, and a
field added later is part of it without anyone listing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from segflow.config import HASH_OPT_OUT, OutputConfig, SegflowConfig, apply_overrides, parse_config
from segflow.engine.collection import plan_collection, run_item
from segflow.engine.executor import LocalExecutor

BASE: dict[str, Any] = {
    "name": "cells",
    "input": {"path": "in"},
    "output": {"store": "out.zarr"},
    "pipeline": [{"op": "gaussian", "sigma": 1}, {"op": "otsu"}, {"op": "label"}],
}


def _hash(*overrides: str, data: dict[str, Any] = BASE) -> str:
    return parse_config(apply_overrides(data, overrides)).config_hash()


# One override per setting that changes what is written: reader options, every output
# setting, blocks, pipeline parameters and step names.
CHANGES = [
    "input.options={level: 1}",
    "input.options={axes: cyx}",
    "input.options={stack: {spacing: [5, 1, 1]}}",
    "output.chunks=[64, 64]",
    "output.shards=[256, 256]",
    "output.regions=true",
    "output.regions_intensity=null",
    "output.vectors=true",
    "output.dicom_seg=true",
    "output.ome=false",
    "output.pyramid=2",
    "blocks.shape=[256, 256]",
    "pipeline.0.sigma=2",
    "pipeline.0.truncate=3",
    "pipeline.2.connectivity=2",
    "pipeline.2.save_as=objects",
]


@pytest.mark.parametrize("override", CHANGES)
def test_every_setting_that_shapes_a_result_changes_the_hash(override: str) -> None:
    assert _hash(override) != _hash()


# One override per opted-out section or field: none can change a stored byte.
KEPT = [
    "name=other",
    "input.path=elsewhere",
    "output.store=other.zarr",
    "output.overwrite=true",
    "cluster.n_workers=7",
    "cluster.memory_limit=2GiB",
    "cluster.address=tcp://127.0.0.1:8786",
    "run.batch=5",
    "run.item_timeout=60",
    "run.quicklooks=0",  # pictures beside the items, not results
    "run.quicklook_size=1024",
]


@pytest.mark.parametrize("override", KEPT)
def test_settings_on_the_opt_out_list_keep_the_hash(override: str) -> None:
    assert override.partition("=")[0].startswith(tuple(HASH_OPT_OUT))
    assert _hash(override) == _hash()


def test_a_parameter_written_as_its_default_or_another_number_type_is_the_same_setting() -> None:
    assert _hash("pipeline.0.sigma=1.0") == _hash()
    assert _hash("pipeline.0.truncate=4.0") == _hash()  # gaussian's default truncate
    assert _hash("output.ome=true") == _hash()


def test_a_field_added_to_a_section_is_part_of_the_hash_without_being_listed() -> None:
    class TiledOutput(OutputConfig):
        png_tiles: bool = False  # a setting some future writer adds

    class TiledConfig(SegflowConfig):
        output: TiledOutput

    def tiled(png: bool) -> str:
        data = {**BASE, "output": {**BASE["output"], "png_tiles": png}}
        return TiledConfig.model_validate(data).config_hash()

    assert tiled(png=True) != tiled(png=False)
    assert tiled(png=False) != _hash()  # the field is in the settings even at its default


def _write_slices(folder: Path) -> None:
    import tifffile

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for z in range(3):
        tifffile.imwrite(folder / f"slice_{z:02d}.tif", (rng.random((24, 24)) * 255).astype("u1"))


def _run_all(cfg: SegflowConfig) -> list[str]:
    """Plan ``cfg``'s collection and run what it says; the ids of the items it ran."""
    plan = plan_collection(cfg)
    executor = LocalExecutor(1)
    try:
        rows = [run_item(cfg, item, executor=executor, run_id="r")[0] for item in plan.work()]
    finally:
        executor.close()
    assert all(row["status"] == "done" for row in rows), rows
    return [row["id"] for row in rows]


def _stack_config(tmp_path: Path, spacing: list[float], **output: Any) -> SegflowConfig:
    return parse_config(
        {
            "name": "stack",
            "input": {
                "path": str(tmp_path / "stack"),
                "options": {"stack": {"spacing": spacing, "units": "micrometer"}},
            },
            "output": {"store": str(tmp_path / "out.zarr"), **output},
            "blocks": {"shape": [3, 16, 16]},
            "pipeline": [{"op": "otsu"}, {"op": "label"}],
        }
    )


def test_a_changed_stack_spacing_redoes_the_item_and_stores_its_coordinates(
    tmp_path: Path,
) -> None:
    _write_slices(tmp_path / "stack")
    assert _run_all(_stack_config(tmp_path, [1, 1, 1])) == ["stack"]

    assert _run_all(_stack_config(tmp_path, [5, 1, 1])) == ["stack"]  # not "nothing to do"

    with xr.open_zarr(tmp_path / "out.zarr", group="stack", consolidated=False) as item:
        assert item["z"].values.tolist() == [0.0, 5.0, 10.0]
    assert _run_all(_stack_config(tmp_path, [5, 1, 1])) == []  # unchanged now: skipped


def test_turning_the_ome_view_off_redoes_the_item_without_its_pyramid(tmp_path: Path) -> None:
    _write_slices(tmp_path / "stack")
    _run_all(_stack_config(tmp_path, [1, 1, 1]))
    assert (tmp_path / "out.zarr" / "stack" / "labels_pyramid").is_dir()

    assert _run_all(_stack_config(tmp_path, [1, 1, 1], ome=False)) == ["stack"]

    assert not (tmp_path / "out.zarr" / "stack" / "labels_pyramid").exists()
    assert _run_all(_stack_config(tmp_path, [1, 1, 1], ome=False, overwrite=False)) == []

"""Multi-channel outputs: stored with a leading ``class`` axis, named, checked, xarray-readable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from segflow import segment
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.engine.pipeline import Step, compile_pipeline
from segflow.io.zarr import ArrayReader
from segflow.ops.registry import Operation, OpParams, get_operation, register
from segflow.store.commit import check_item
from segflow.store.layout import ZarrRegionWriter

NAMES = ("background", "foreground")


class _Params(OpParams):
    pass


def _two_class(image: np.ndarray, params: _Params, ctx: Any) -> np.ndarray:
    p = np.clip(image[:1], 0, 1)
    return np.concatenate([1 - p, p]).astype(np.float16)


NAME = "_test_two_class"
try:
    get_operation(NAME)
except KeyError:
    register(
        Operation(
            name=NAME,
            kind="pointwise",
            params=_Params,
            apply=_two_class,
            summary="a two-class probability map (test only)",
            out_channels=lambda p, c: 2,
            out_dtype=lambda p, d: np.dtype(np.float16),
            class_names=lambda p: NAMES,
        )
    )


def _pipeline(*, save: bool = False) -> list[Any]:
    step = Step(0, get_operation(NAME), _Params(), save_as="probs" if save else None)
    return [step, {"op": "select_bands", "bands": [2]}] if save else [step]


def _image() -> np.ndarray:
    return np.random.default_rng(0).random((37, 29)).astype(np.float32)


def test_plan_names_the_classes_of_a_multichannel_output() -> None:
    plan = compile_pipeline(_pipeline(), spatial_ndim=2, channels=1, dtype="float32")
    assert (plan.out_kind, plan.out_classes, plan.out_dtype) == (
        "probabilities",
        NAMES,
        np.dtype(np.float16),
    )
    plan = compile_pipeline(
        [{"op": "gaussian", "sigma": 1}], spatial_ndim=2, channels=3, dtype="float32"
    )
    assert (plan.out_kind, plan.out_classes) == ("image", ("c0", "c1", "c2"))


def test_segment_returns_the_class_axis_first() -> None:
    image = _image()
    out = segment(image, _pipeline(), block_shape=(10, 8))
    np.testing.assert_array_equal(out, _two_class(image[None], _Params(), None))


@pytest.mark.parametrize("shards", [None, (16, 16)])
def test_probabilities_are_stored_with_a_class_dim_and_open_in_xarray(
    tmp_path: Path, shards: tuple[int, int] | None
) -> None:
    image = _image()
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "cells"),
            _pipeline(),
            store=store,
            block_shape=16,
            chunks=(8, 8),
            shards=shards,
            executor=executor,
        )
    assert result.status == "done", result.error
    ds = xr.open_zarr(store, group="cells", consolidated=False)
    probs = ds["probabilities"]
    assert probs.dims == ("class", "y", "x")
    assert list(probs["class"].values) == list(NAMES)
    assert probs.dtype == np.float16
    expected = _two_class(image[None], _Params(), None)
    np.testing.assert_array_equal(probs.sel({"class": "foreground"}).values, expected[1])
    array = zarr.open_array(store, path="cells/probabilities", mode="r")
    assert (array.shards or array.chunks)[0] == 2  # the class axis is one storage unit


def test_a_saved_multichannel_array_sits_beside_the_output(tmp_path: Path) -> None:
    image = np.stack([_image(), _image() * 0, _image() + 1])
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "rgb", channel_axis=0),
            _pipeline(save=True),
            store=store,
            block_shape=8,
            executor=executor,
        )
    assert result.status == "done", result.error
    ds = xr.open_zarr(store, group="rgb", consolidated=False)
    assert ds["probs"].dims == ("class", "y", "x")
    assert ds["image"].dims == ("y", "x")


def test_check_item_counts_a_missing_class_block(tmp_path: Path) -> None:
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(_image(), "cells"), _pipeline(), store=store, block_shape=8,
            executor=executor,
        )  # fmt: skip
    assert result.status == "done", result.error
    writer = ZarrRegionWriter(store, "cells", "probabilities")
    assert writer.read((slice(0, 2), slice(0, 2))).shape == (2, 2, 2)
    check_item(store, "cells", shape=(37, 29), arrays={"probabilities": "float16"})
    (tmp_path / "out.zarr" / "cells" / "probabilities" / "c" / "0" / "1" / "1").unlink()
    with pytest.raises(Exception, match="'probabilities' has 19 of its 20 storage units"):
        check_item(store, "cells", shape=(37, 29), arrays={"probabilities": "float16"})

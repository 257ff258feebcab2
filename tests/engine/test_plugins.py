"""Operations and network architectures from another package, found through entry points
(``segflow.operations``, ``segflow.architectures``): a real distribution's metadata on
``sys.path``, as ``pip install`` leaves it, and nothing of segflow touched."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from segflow.models import networks
from segflow.ops import registry

PLUGIN = """
from pydantic import BaseModel, Field
from torch import nn

from segflow.models.networks import Architecture
from segflow.ops.registry import Operation, OpParams


class ScaleParams(OpParams):
    factor: float = Field(2.0, description="multiply every pixel by this")


def scale(image, params, ctx):
    return image * params.factor


SCALE = Operation(
    name="demo_scale", kind="pointwise", params=ScaleParams, apply=scale,
    summary="multiply by a factor (from the demo plugin)",
    out_dtype=lambda params, dtype: "float32",
)


class TinyParams(BaseModel):
    width: int = 4


def build_tiny(spec, params):
    conv = nn.Conv2d if spec.spatial_dims == 2 else nn.Conv3d
    return conv(spec.in_channels, spec.out_channels, kernel_size=1)


TINY = Architecture(TinyParams, build_tiny, lambda params: 1, needs_monai=False)
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The demo plugin installed in ``tmp_path``: its module and its dist-info."""
    (tmp_path / "segflow_demo_plugin.py").write_text(PLUGIN)
    info = tmp_path / "segflow_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: segflow-demo-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [segflow.operations]
            demo_scale = segflow_demo_plugin:SCALE

            [segflow.architectures]
            demo_tiny = segflow_demo_plugin:TINY
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._load_entry_points.cache_clear()
    networks._load_entry_points.cache_clear()
    yield
    registry._REGISTRY.pop("demo_scale", None)
    networks.ARCHITECTURES.pop("demo_tiny", None)
    registry._load_entry_points.cache_clear()
    networks._load_entry_points.cache_clear()


@pytest.mark.usefixtures("plugin")
def test_an_operation_from_another_package_runs_in_a_pipeline() -> None:
    from segflow import segment

    image = np.arange(64, dtype=np.float32).reshape(8, 8)

    labels = segment(image, [{"op": "demo_scale", "factor": 3}, {"op": "threshold", "value": 90}])

    assert "demo_scale" in [op.name for op in registry.list_operations()]
    np.testing.assert_array_equal(np.asarray(labels) > 0, image * 3 > 90)


@pytest.mark.usefixtures("plugin")
def test_an_operation_from_another_package_is_part_of_the_config_hash() -> None:
    from segflow.config import parse_config

    def hashed(factor: float) -> str:
        data = {"input": {"path": "in"}, "output": {"store": "o.zarr"}}
        return parse_config(
            {**data, "pipeline": [{"op": "demo_scale", "factor": factor}, {"op": "otsu"}]}
        ).config_hash()

    assert hashed(2) == hashed(2.0) != hashed(3)


@pytest.mark.usefixtures("plugin")
def test_a_network_from_another_package_is_built_by_name() -> None:
    import torch

    net = networks.build_network(networks.NetworkSpec("demo_tiny", 2, 1, 3))

    assert net(torch.zeros(1, 1, 5, 5)).shape == (1, 3, 5, 5)


def test_an_unknown_network_names_the_known_ones() -> None:
    from segflow.errors import ModelError

    with pytest.raises(ModelError, match=r"network 'nope' is unknown: choose one of \['basic_"):
        networks.build_network(networks.NetworkSpec("nope", 2, 1, 2))

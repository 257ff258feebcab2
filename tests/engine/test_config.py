"""Config loading: every problem gets one line naming the key, the value and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflow.config import load_config, parse_config
from segflow.errors import ConfigError

VALID = {
    "input": {"path": "data"},
    "output": {"store": "out.zarr"},
    "pipeline": [{"op": "gaussian", "sigma": 1}, {"op": "otsu"}, {"op": "label"}],
}


def _problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_valid_config_and_its_hash_ignore_the_input_path() -> None:
    config = parse_config(VALID)
    other = parse_config({**VALID, "input": {"path": "elsewhere"}})
    assert config.blocks.shape is None  # the engine picks 2048^2 (2D) or 256^3 (3D)
    assert config.config_hash() == other.config_hash()
    changed = parse_config({**VALID, "pipeline": [{"op": "gaussian", "sigma": 2}]})
    assert changed.config_hash() != config.config_hash()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"output": {}}, "output.store: required key is missing"),
        ({"blocks": {"shape": 0}}, "blocks.shape: every axis must be >= 1 (got 0)"),
        (
            {"colour": "red"},
            "colour: unknown key; expected one of: name, input, output, blocks, pipeline, cluster",
        ),
        ({"ouput": {"store": "y"}}, "ouput: unknown key; did you mean 'output'?"),
        (
            {"output": {"store": "y", "chunk": [8]}},
            "output.chunk: unknown key; did you mean 'chunks'?",
        ),
        (
            {"cluster": {"n_worker": 2}},
            "cluster.n_worker: unknown key; did you mean 'n_workers' or 'gpu_workers'?",
        ),
        (
            {"cluster": {"n_workers": 0}},
            "cluster.n_workers: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"pipeline": [{"op": "gaussian", "sigma": -1}]},
            "pipeline[0].sigma: must be >= 0 (got -1",
        ),
        (
            {"pipeline": [{"op": "gausian", "sigma": 1}]},
            "pipeline[0].op: unknown operation 'gausian'; did you mean 'gaussian'? (`segflow ops` "
            "lists every operation)",
        ),
        (
            {"pipeline": [{"op": "median", "size": 4}]},
            "pipeline[0].size: must be odd so the window is centred (got 4)",
        ),
        (
            {"pipeline": [{"op": "otsu", "bins": 3}]},
            "pipeline[0].bins: unknown parameter of 'otsu' (got 3); did you mean 'nbins'?",
        ),
        (
            {"pipeline": [{"op": "qqq"}]},
            "pipeline[0].op: unknown operation 'qqq'; none is close to it (`segflow ops` lists",
        ),
        (
            {"pipeline": [{"op": "gaussian", "sigma": 1, "mod": "wrap"}]},
            "pipeline[0].mod: unknown parameter of 'gaussian' (got 'wrap'); did you mean 'mode'?",
        ),
        (
            {"pipeline": [{"op": "threshold", "value": 1, "level": 2}]},
            "pipeline[0].level: unknown parameter of 'threshold' (got 2); its parameters: value",
        ),
        (
            {"pipeline": [{"op": "luma", "weights": [1]}]},
            "pipeline[0].weights: unknown parameter of 'luma' (got [1]); it takes no parameters",
        ),
        ({"pipeline": [{"sigma": 1}]}, "pipeline[0]: missing `op` (the operation name)"),
        ({"pipeline": []}, "pipeline: must list at least one step, got an empty list"),
        (
            {"pipeline": [{"op": "window", "low": 5, "high": 1}]},
            "pipeline[0] (window): `low` (5.0) must be below `high` (1.0)",
        ),
    ],
)
def test_each_problem_is_one_readable_line(change: dict[str, object], expected: str) -> None:
    problems = _problems({**VALID, **change})
    assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_are_reported_together() -> None:
    problems = _problems(
        {"input": {"path": "x"}, "output": {}, "pipeline": [{"op": "gaussian"}, {"op": "nope"}]}
    )
    assert len(problems) == 3
    assert problems[0] == "output.store: required key is missing"
    assert problems[1].startswith("pipeline[0].sigma: Field required")
    assert problems[2].startswith("pipeline[1].op: unknown operation 'nope'")


def test_load_config_resolves_paths_and_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "input: {path: images}\noutput: {store: out.zarr}\n"
        "pipeline:\n  - {op: gaussian, sigma: 1}\n  - {op: otsu}\n"
    )
    config = load_config(path, ["blocks.shape=[64, 32]", "pipeline.0.sigma=2.5"])
    assert config.input.path == str(tmp_path / "images")
    assert config.output.store == str(tmp_path / "out.zarr")
    assert config.blocks.shape == [64, 32]
    assert config.pipeline[0]["sigma"] == 2.5


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("blocks.shape", "--set 'blocks.shape': expected KEY=VALUE, e.g. blocks.shape=512"),
        ("pipeline.7.sigma=1", "--set pipeline.7: '7' is not an index of a list of 2 items"),
    ],
)
def test_bad_overrides_are_named(tmp_path: Path, override: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: a}\noutput: {store: b}\npipeline: [{op: otsu}, {op: label}]\n")
    with pytest.raises(
        ConfigError,
        match="^" + expected.replace("[", r"\[").replace("(", r"\(").replace(".", r"\."),
    ):
        load_config(path, [override])


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config '.*missing.yaml': cannot read it"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config '.*bad.yaml': not valid YAML"):
        load_config(bad)


UNITS = "input: {path: x}\noutput: {store: y, chunks: [256, 256]}\nblocks: {shape: [256, 256]}\n"


@pytest.mark.parametrize(
    ("overrides", "blocks", "chunks", "note"),
    [
        (  # blocks alone, smaller than the file's chunks: the chunks follow
            ["blocks.shape=[128,128]"], [128, 128], [128, 128],
            "output.chunks [256, 256] (from the file) do not divide --set blocks.shape "
            "[128, 128]: using output.chunks=[128, 128]",
        ),
        (  # chunks alone, no divisor of the file's blocks: the smallest multiple holding them
            ["output.chunks=[100,96]"], [300, 288], [100, 96],
            "blocks.shape [256, 256] (from the file) is no multiple of --set output.chunks "
            "[100, 96]: using blocks.shape=[300, 288]",
        ),
        (["blocks.shape=[512,512]"], [512, 512], [256, 256], None),  # fits: unchanged
        (["output.chunks=[128,128]"], [256, 256], [128, 128], None),  # fits: unchanged
        # both set: the user's word stands (a misfit is reported per item, with the fix)
        (["blocks.shape=[128,128]", "output.chunks=[256,256]"], [128, 128], [256, 256], None),
        # shards: the storage unit is the shard; nothing is guessed
        (["blocks.shape=[128,128]", "output.shards=[512,512]"], [128, 128], [256, 256], None),
    ],
)  # fmt: skip
def test_setting_blocks_or_chunks_alone_derives_the_other(
    tmp_path: Path, overrides: list[str], blocks: list[int], chunks: list[int], note: str | None
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(UNITS + "pipeline: [{op: otsu}]\n")

    config = load_config(path, overrides)

    assert (config.blocks.shape, config.output.chunks) == (blocks, chunks)
    assert config.notes == ([note] if note else [])
    unchanged = load_config(path)
    assert unchanged.notes == [] and unchanged.output.chunks == [256, 256]


def test_union_errors_collapse_to_one_line_naming_what_is_expected() -> None:
    problems = _problems(
        {
            "input": {"path": "x"},
            "output": {"store": "y"},
            "blocks": {"shape": "abc"},
            "pipeline": [{"op": "gaussian", "sigma": [1, "q"]}],
        }
    )
    assert problems == [
        "blocks.shape expects a list of integers or an integer (got 'abc')",
        "pipeline[0].sigma expects a number or a list of numbers (got [1, 'q'])",
    ]


def test_a_problem_with_a_set_value_names_the_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: a}\noutput: {store: b}\npipeline: [{op: gaussian, sigma: 1}]\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, ["pipeline.0.sigma=abc", "blocks.shape=[0,4]"])
    assert raised.value.problems == [
        "--set blocks.shape=[0,4]: blocks.shape: every axis must be >= 1 (got [0, 4])",
        "--set pipeline.0.sigma=abc: pipeline[0].sigma expects a number or a list of numbers "
        "(got 'abc')",
    ]

"""An output writer from another package, found through the entry point group
``segflow.writers``: a real distribution's metadata on ``sys.path``, as ``pip install``
leaves it. Its settings are validated with the config and are part of the config hash
(changing one redoes the item), except the one it opts out (changing that skips)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from segflow.config import SegflowConfig, apply_overrides, parse_config
from segflow.engine.collection import plan_collection, run_item
from segflow.engine.executor import LocalExecutor
from segflow.errors import ConfigError
from segflow.store import writers

PLUGIN = """
import json

import fsspec
import numpy as np
from pydantic import BaseModel

from segflow.store.writers import Writer


class CountSettings(BaseModel):
    name: str = "counts.json"  # where it goes: changes the stored bytes
    announce: bool = False  # only what the writer prints: opted out of the hash


def check(info, output_kind, settings):
    if output_kind != "labels":
        raise ValueError(f"demo_counts writes labels only, not {output_kind}")


def block(region, data, settings):
    return {"start": [s.start for s in region], "pixels": int(np.count_nonzero(data))}


def finish(target, settings, parts):
    total = sum(p["pixels"] for p in parts)
    with fsspec.open(f"{target.item_url}/{settings.name}", "w") as handle:
        json.dump({"blocks": len(parts), "foreground": total}, handle)
    if settings.announce:
        print(f"demo_counts: {total} pixels")
    return [settings.name]


def verify(target, settings, files):
    fs, path = fsspec.core.url_to_fs(f"{target.item_url}/{files[0]}")
    if not fs.exists(path):
        raise RuntimeError(f"{files[0]} is missing")


COUNTS = Writer(
    name="demo_counts",
    settings=CountSettings,
    check=check,
    block=block,
    finish=finish,
    verify=verify,
    hash_opt_out={"announce": "what the writer prints, not what it writes"},
)
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The demo writer installed in ``tmp_path``: its module and its dist-info."""
    (tmp_path / "segflow_demo_writer.py").write_text(PLUGIN)
    info = tmp_path / "segflow_demo_writer-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: segflow-demo-writer\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [segflow.writers]
            demo_counts = segflow_demo_writer:COUNTS
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    writers._load_entry_points.cache_clear()
    yield
    writers._REGISTRY.pop("demo_counts", None)
    writers._load_entry_points.cache_clear()


def _config(tmp_path: Path, *overrides: str) -> SegflowConfig:
    data = {
        "name": "counts",
        "input": {"path": str(tmp_path / "images")},
        "output": {"store": str(tmp_path / "out.zarr"), "writers": {"demo_counts": {}}},
        "blocks": {"shape": [16, 16]},
        "pipeline": [{"op": "threshold", "value": 0.5}, {"op": "label"}],
    }
    return parse_config(apply_overrides(data, overrides))


def _write_image(tmp_path: Path) -> np.ndarray:
    import tifffile

    image = (np.random.default_rng(4).random((40, 36)) > 0.6).astype(np.float32)
    (tmp_path / "images").mkdir(exist_ok=True)
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)
    return image


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


@pytest.mark.usefixtures("plugin")
def test_a_writer_from_another_package_writes_from_every_block(tmp_path: Path) -> None:
    image = _write_image(tmp_path)

    assert _run_all(_config(tmp_path)) == ["a"]

    counts = json.loads((tmp_path / "out.zarr" / "a" / "counts.json").read_text())
    assert counts == {"blocks": 9, "foreground": int(np.count_nonzero(image > 0.5))}
    assert "demo_counts" in [w.name for w in writers.list_writers()]


@pytest.mark.usefixtures("plugin")
def test_a_writer_setting_redoes_the_item_and_an_opted_out_one_skips(tmp_path: Path) -> None:
    _write_image(tmp_path)
    assert _run_all(_config(tmp_path)) == ["a"]

    assert _run_all(_config(tmp_path, "output.writers.demo_counts.announce=true")) == []
    renamed = "output.writers.demo_counts.name=other.json"
    assert _run_all(_config(tmp_path, renamed)) == ["a"]
    assert (tmp_path / "out.zarr" / "a" / "other.json").is_file()
    assert _run_all(_config(tmp_path, renamed)) == []


@pytest.mark.usefixtures("plugin")
def test_writer_settings_are_hashed_with_their_defaults_filled_in(tmp_path: Path) -> None:
    def hashed(*overrides: str) -> str:
        return _config(tmp_path, *overrides).config_hash()

    default = hashed()
    assert hashed("output.writers.demo_counts.name=counts.json") == default
    assert hashed("output.writers.demo_counts.announce=true") == default
    assert hashed("output.writers.demo_counts.name=x.json") != default
    no_writer = _config(tmp_path).model_copy(deep=True)
    no_writer.output.writers = {}
    assert no_writer.config_hash() != default
    settings: dict[str, Any] = no_writer.result_settings()
    assert "writers" not in settings["output"]  # stores made without writers keep their hash


@pytest.mark.usefixtures("plugin")
def test_a_writer_refuses_an_item_before_any_block_runs(tmp_path: Path) -> None:
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader

    phases: list[str] = []
    with LocalExecutor(1) as executor:
        result = segment_item(
            ArrayReader(np.zeros((8, 8), np.float32), "m"),
            [{"op": "threshold", "value": 0.5}],
            store=str(tmp_path / "out.zarr"),
            block_shape=8,
            executor=executor,
            writers={"demo_counts": {}},
            progress=lambda phase, done, total: phases.append(phase),
        )
    assert result.status == "failed"
    assert "demo_counts writes labels only, not mask" in str(result.error)
    assert phases == []  # no block ran


@pytest.mark.usefixtures("plugin")
def test_unknown_writers_and_bad_settings_are_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown output writer 'demo_count'; did you mean"):
        _config(tmp_path, "output.writers={demo_count: {}}")
    with pytest.raises(ConfigError, match=r"demo_counts.announce: .*\(got 'loud'\)"):
        _config(tmp_path, "output.writers.demo_counts.announce=loud")


# `output` fields that are not a writer's: where the store is and how its units are cut
# (the engine plans blocks by them), whether done items are redone or another config may
# write, how many old versions of an item the store keeps, whether an object store keeps a
# plain copy of each item's latest version, and other packages' writers.
ENGINE_OUTPUT_FIELDS = {
    "store",
    "chunks",
    "shards",
    "overwrite",
    "allow_other_configs",
    "retention",
    "plain_copy",
    "writers",
}


def test_every_output_setting_belongs_to_a_registered_writer_or_the_engine() -> None:
    from segflow.config import OutputConfig

    owned: dict[str, str] = {}
    for writer in writers.list_writers():
        for name in {writer.switch or "", *writer.output_fields}:  # its switch may carry a setting
            if name:
                assert name not in owned, f"{name} is both {owned[name]}'s and {writer.name}'s"
                owned[name] = writer.name
    # The quick look's switch is set by the run for the items it draws (run.quicklooks),
    # not by the config's `output`: a picture, outside the config hash.
    assert set(owned) | ENGINE_OUTPUT_FIELDS == set(OutputConfig.model_fields) | {"quicklook"}
    assert owned == {
        "regions": "regions",
        "regions_intensity": "regions",
        "vectors": "vectors",
        "ome": "ome",
        "pyramid": "ome",
        "dicom_seg": "dicom_seg",
        "quicklook": "quicklook",
    }


def test_segflows_own_writers_are_turned_on_by_their_output_fields() -> None:
    output = {"regions": True, "regions_intensity": None, "ome": True, "pyramid": 2}

    chosen = writers.ActiveWriters.of_output(output).chosen

    assert [w.name for w, _ in chosen] == ["output", "regions", "ome"]  # hook order
    assert chosen[1][1].intensity is None and chosen[2][1].levels == 2
    assert [w.name for w, _ in writers.ActiveWriters.of_output({"ome": False}).chosen] == ["output"]
    with_picture = writers.ActiveWriters.of_output({"ome": True, "quicklook": 64}).chosen
    assert [w.name for w, _ in with_picture] == ["output", "ome", "quicklook"]  # drawn last
    assert with_picture[2][1].size == 64
    layout = writers.ActiveWriters.of_output({"ome": True}).layout((64, 64))
    assert (type(layout).__name__, layout.blocks) == ("OmeZarrLayout", (64, 64))
    assert type(writers.ActiveWriters.of_output({}).layout((64, 64))).__name__ == "XarrayLayout"


def test_segflows_own_writers_are_not_named_under_output_writers(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"output writer 'regions' is segflow's own: it is turned on with "
        r"`output.regions`, not under `output.writers`",
    ):
        _config(tmp_path, "output.writers={regions: {}}")
    with pytest.raises(ValueError, match="a writer named 'vectors' is registered already"):
        writers.register_writer(writers.Writer(name="vectors", settings=BaseModel))


def test_a_config_is_refused_before_a_run_only_when_no_item_fits(tmp_path: Path) -> None:
    from segflow.engine.collection import check_item_fit, unfit_items
    from segflow.io import ArrayReader

    cfg = _config(tmp_path, "output.writers={}", "output.vectors=true", "blocks.shape=16")
    volume = ArrayReader(np.zeros((4, 8, 8), np.float32), "vol", axes=("z", "y", "x")).info
    image = ArrayReader(np.zeros((8, 8), np.float32), "img").info

    line = check_item_fit(cfg, volume)
    assert line is not None and line.startswith("item 'vol' (<array vol>): `output.vectors`")
    assert check_item_fit(cfg, image) is None
    assert unfit_items(cfg, [volume, volume]) == [line, line]
    assert unfit_items(cfg, [volume, image]) == []  # the volume fails alone in the run

"""The code version in the index changes with the engine's sources and nothing else."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import segflow
from segflow.engine.item import ItemResult, code_version, source_digest

PACKAGE = Path(segflow.__file__).parent


def test_code_version_is_the_package_version_and_the_source_digest() -> None:
    digest = source_digest(PACKAGE)

    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert code_version() == f"{segflow.__version__}+src.{digest[:12]}"
    assert ItemResult(id="a", source="a.tif", status="done").code_version == code_version()


def engine_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "segflow"
    shutil.copytree(PACKAGE, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_an_edit_to_any_engine_file_changes_the_digest(tmp_path: Path) -> None:
    copy = engine_copy(tmp_path)
    before = source_digest(copy)
    assert before == source_digest(PACKAGE)  # the path of the folder does not count

    (copy / "ops" / "morphology.py").write_text(
        (copy / "ops" / "morphology.py").read_text() + "\n# a comment is a change\n"
    )
    edited = source_digest(copy)
    (copy / "engine" / "new_module.py").write_text("")
    added = source_digest(copy)
    (copy / "engine" / "new_module.py").rename(copy / "engine" / "renamed.py")

    assert len({before, edited, added, source_digest(copy)}) == 4


def test_the_prefect_layer_caches_and_other_files_do_not_count(tmp_path: Path) -> None:
    copy = engine_copy(tmp_path)
    before = source_digest(copy)
    for layer in ("flows", "tasks"):  # folders, as in the wheel, instead of the links
        (copy / layer).unlink(missing_ok=True)
        (copy / layer).mkdir()
        (copy / layer / "cli.py").write_text("print('changed')\n")
    (copy / "engine" / "__pycache__").mkdir()
    (copy / "engine" / "__pycache__" / "item.py").write_text("stale")
    (copy / "notes.txt").write_text("not code")

    assert source_digest(copy) == before

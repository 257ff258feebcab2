"""The wheel installs one top-level package, ``segflow``, and the engine never imports Prefect.

The repository keeps the Prefect layer in ``flows/`` and ``tasks/``; the links
``src/segflow/flows`` and ``src/segflow/tasks`` make them ``segflow.flows`` and
``segflow.tasks`` in a checkout and in the wheel alike, so nothing named ``flows`` or
``tasks`` lands in site-packages.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout by hatchling, the build backend of pyproject.toml."""
    pytest.importorskip("hatchling", reason="hatchling (the build backend) is a dev dependency")
    from hatchling.builders.wheel import WheelBuilder

    out = tmp_path_factory.mktemp("wheel")
    return Path(
        next(iter(WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"])))
    )


def test_the_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()

    top_level = {name.split("/")[0] for name in names}

    assert top_level == {"segflow", f"{wheel.name.rsplit('-', 3)[0]}.dist-info"}
    cli = ["cli", "cli_options", "preflight", "progress", "info_cli", "run_cli", "evaluate_cli"]
    cli += ["train_cli", "export_cli", "versions_cli"]  # the segflow command, split by job
    modules = [f"flows/{name}.py" for name in cli]
    for module in (*modules, "flows/segment.py", "flows/__main__.py", "tasks/items.py"):
        assert f"segflow/{module}" in names


def test_the_console_script_and_the_deployments_point_into_the_package(wheel: Path) -> None:
    import yaml

    entry_points = zipfile.ZipFile(wheel).read(
        f"{wheel.name.rsplit('-', 3)[0]}.dist-info/entry_points.txt"
    )
    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]

    assert "segflow = segflow.flows.cli:main" in entry_points.decode()
    for deployment in deployments:
        module = deployment["entrypoint"].split(":")[0]
        assert module.startswith("segflow.flows."), deployment["name"]
        assert f"{module.replace('.', '/')}.py" in zipfile.ZipFile(wheel).namelist()


def test_the_wheel_and_the_checkout_have_the_same_code_version(wheel: Path, tmp_path: Path) -> None:
    from segflow.engine.item import source_digest

    zipfile.ZipFile(wheel).extractall(tmp_path)

    assert source_digest(tmp_path / "segflow") == source_digest(ROOT / "src" / "segflow")


def test_the_links_point_at_the_repository_folders() -> None:
    for layer in ("flows", "tasks"):
        link = ROOT / "src" / "segflow" / layer
        assert link.is_symlink(), f"{link} must be a link to ../../{layer}"
        assert link.resolve() == (ROOT / layer).resolve()


def test_the_engine_never_imports_prefect() -> None:
    # Every engine module, found on disk without following the links to flows/ and tasks/.
    code = (
        "import importlib, os, sys, segflow\n"
        "root = os.path.dirname(segflow.__file__)\n"
        "for folder, _, files in os.walk(root):\n"
        "    for name in files:\n"
        "        if name.endswith('.py') and name != '__main__.py':\n"
        "            path = os.path.relpath(os.path.join(folder, name[:-3]), root)\n"
        "            module = '.'.join(['segflow', *path.split(os.sep)])\n"
        "            importlib.import_module(module.removesuffix('.__init__'))\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'segflow.flows')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.strip() == "[]"


def test_the_command_imports_neither_prefect_nor_dask() -> None:
    # segflow ops / validate / a run with nothing to do answer fast: the command modules
    # (cli.py and the modules of each job it registers) import Prefect and Dask in functions.
    code = (
        "import sys, segflow.flows.cli\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'dask')))\n"
        "print(sorted(n for n in sys.modules if n.startswith('segflow.flows.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    heavy, loaded = done.stdout.splitlines()
    assert heavy == "[]"
    for module in ("info_cli", "run_cli", "evaluate_cli", "train_cli", "export_cli"):
        assert f"segflow.flows.{module}" in loaded  # registered, so imported


def test_python_m_segflow_flows_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "segflow.flows", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "run" in done.stdout


def test_the_build_backend_and_the_dev_extra_agree() -> None:
    # The wheel test needs hatchling importable: it is a dev dependency for that reason.
    backend = PYPROJECT["build-system"]["requires"][0].split(">")[0]
    dev = [
        requirement.split(">")[0]
        for requirement in PYPROJECT["project"]["optional-dependencies"]["dev"]
    ]
    assert backend in dev

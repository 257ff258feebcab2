"""The README's quick start and "open" snippets, and each config's comment, run as written.

The commands are taken from the text (README.md's fenced blocks, the ``# Run:`` / ``# Score:``
/ ``# Open the output:`` comment lines of ``configs/*.yaml``), never retyped here, so a
snippet that drifts from the code fails this test. Two substitutions only: ``segflow`` (and
``.venv/bin/segflow``) becomes this checkout's command (``python -m segflow.flows``) and
``python`` the interpreter running the tests (``sys.executable``).

Every command runs in a copy of the checkout's ``configs/`` and ``tests/data/`` under
``tmp_path`` (named ``segflow``, as a clone would be, with ``../shared`` linked beside it when
the real one exists): the configs write their stores to ``outputs/`` beside ``configs/``, so
running them in the checkout would write into the repository, and a store a developer made
earlier would turn every run into "already done".

Not run: ``make demo`` itself (it creates a venv and installs segflow: minutes) -- its
recipe is checked against the command the README says it runs, which is run -- and
``make test`` (the whole suite, this test included).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SHARED = REPO.parent / "shared"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The commands run the real pipelines. Timed on the 2-core development machine under the load
# of two other jobs (2026-12-01): the quick start 125 s (60 s idle), its four open lines 40 s,
# the bundled configs' comments 10-16 s each after it, each ../shared/data config 50-80 s
# (skipped where that folder is absent, as in CI); the whole file 12 min with the data.
pytestmark = pytest.mark.slow


def fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """Every fenced block of ``markdown`` as ``(language, body)``."""
    pattern = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    return [(match[1], match[2]) for match in pattern.finditer(markdown)]


def readme_section(title: str) -> str:
    """The text of the README's ``## title`` section, up to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


QUICK_START = fenced_blocks(readme_section("Quick start"))


def command_lines(block: str) -> list[str]:
    """The commands of a bash block: its lines without their trailing comments."""
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def as_argv(command: str) -> list[str]:
    """``command`` split as a shell does, with this checkout's ``segflow`` and ``python``."""
    words = shlex.split(command)
    if words[0] in ("segflow", ".venv/bin/segflow"):
        return [sys.executable, "-m", "segflow.flows", *words[1:]]
    if words[0] == "python" or words[0].endswith("/python"):
        return [sys.executable, *words[1:]]
    raise AssertionError(f"not a segflow or python command: {command!r}")


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    environment.update(COLUMNS="200", **env)
    result = subprocess.run(
        argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"{shlex.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the commands read, beside a link to ``../shared`` where it exists."""
    root = tmp_path_factory.mktemp("readme")
    clone = root / "segflow"
    shutil.copytree(REPO / "configs", clone / "configs")
    shutil.copytree(REPO / "tests" / "data", clone / "tests" / "data")
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)
    return clone


@pytest.fixture(scope="module")
def quick_start(clone: Path) -> subprocess.CompletedProcess[str]:
    """The command ``make demo`` runs, as a user runs it (its own temporary Prefect server).

    Run once for the tests that read its output or open its stores (four configs, one of
    them a U-Net; see the timings above).
    """
    (_, block) = QUICK_START[1]
    [command] = command_lines(block)
    return run(as_argv(command), clone)


def test_make_demo_runs_the_command_the_readme_shows() -> None:
    (_, make_block), (_, demo_block) = QUICK_START[:2]
    assert command_lines(make_block) == ["make demo", "make test"]
    # -o: take the install stamp as up to date, so only the demo's own command is printed;
    # --no-print-directory: under `make test` this is a sub-make, which would add "Entering
    # directory" lines.
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "--dry-run", "-o", ".venv/.segflow-installed", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert dry_run.stdout.splitlines() == command_lines(demo_block)


def test_quick_start_ends_with_the_summary_the_readme_shows(
    quick_start: subprocess.CompletedProcess[str],
) -> None:
    (_, shown) = QUICK_START[2]
    # "/…/" in the README stands for the folders above the clone; the interpreter is the
    # one running segflow (here the test's, there the clone's .venv).
    patterns = [
        re.escape(line)
        .replace(re.escape("/…/segflow/.venv/bin/python"), re.escape(sys.executable))
        .replace(re.escape("/…/"), "/.+/")
        for line in shown.splitlines()
    ]
    printed = quick_start.stdout.splitlines()
    start = printed.index(shown.splitlines()[0])
    printed = printed[start : start + len(patterns)]
    assert len(printed) == len(patterns), quick_start.stdout
    for pattern, line in zip(patterns, printed, strict=True):
        assert re.fullmatch(pattern, line), f"README shows {pattern!r}, run printed {line!r}"


def test_open_lines_printed_by_the_quick_start_run(
    quick_start: subprocess.CompletedProcess[str], clone: Path
) -> None:
    opens = [
        line.split("open:", 1)[1].strip()
        for line in quick_start.stdout.splitlines()
        if line.strip().startswith("open:")
    ]
    assert len(opens) == 4
    for command in opens:
        # Printed for copying as it is: run it unchanged (its interpreter is sys.executable).
        assert "<xarray.Dataset>" in run(shlex.split(command), clone.parent).stdout


def test_python_open_snippet(quick_start: subprocess.CompletedProcess[str], clone: Path) -> None:
    [snippet] = [body for language, body in QUICK_START if language == "python"]
    run([sys.executable, "-c", snippet], clone)


@dataclass(frozen=True)
class ConfigComment:
    """The commands a config's header comment tells the user to run."""

    config: Path
    commands: list[str]  # Run: and Score: lines, shell text
    opens: list[str]  # Open the output: Python expressions

    @classmethod
    def read(cls, config: Path) -> ConfigComment:
        header = []
        for line in config.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line.removeprefix("#").strip())
        # A command goes on over the next comment line after a trailing backslash.
        text = "\n".join(header).replace("\\\n", " ")
        commands = re.findall(r"(?:Run|Score):\s+(segflow .+)", text)
        opens = re.findall(r"Open the output:\s+(xarray\.open_zarr\(.+?\))", text)
        return cls(config, [command.strip() for command in commands], opens)


def needs(config: Path) -> str | None:
    """Why ``config`` cannot run here, or None."""
    text = config.read_text(encoding="utf-8")
    if reads_shared_data(config) and not (SHARED / "data").is_dir():
        return f"{config.name} reads ../shared/data, which is absent"
    trained = re.search(r"op: model, path: (\.\./outputs/train/\S+?),", text)
    if trained:
        return (
            f"{config.name} needs a model trained first ({trained[1]}: "
            "`segflow train`, minutes of training, not run here)"
        )
    return None


def reads_shared_data(config: Path) -> bool:
    return "shared/data/" in config.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(config, id=config.stem, marks=[pytest.mark.shared_data])
        if reads_shared_data(config)
        else pytest.param(config, id=config.stem)
        for config in CONFIGS
    ],
)
def test_config_comment_commands(config: Path, clone: Path, prefect_harness: None) -> None:
    comment = ConfigComment.read(config)
    assert comment.commands, f"{config.name} has no '# Run:' line"
    reason = needs(config)
    if reason:
        pytest.skip(reason)
    from prefect.settings import PREFECT_API_URL

    # The session's Prefect test server, not one temporary server per command (about 18 s
    # each here); the commands are unchanged.
    api_url = str(PREFECT_API_URL.value())
    for command in comment.commands:
        result = run(as_argv(command), clone, PREFECT_API_URL=api_url)
        if command.startswith("segflow run"):
            assert f"{config.stem}: " in result.stdout
            assert " 0 failed" in result.stdout
    for expression in comment.opens:
        for group in groups_for(expression, clone):
            opened = re.sub(r'\.zarr/[^"]*"', f'.zarr/{group}"', expression)
            program = f"import xarray; print({opened})"
            assert "<xarray.Dataset>" in run([sys.executable, "-c", program], clone).stdout


def groups_for(expression: str, clone: Path) -> list[str]:
    """The group to open: as written, or each of the store's groups a ``<...>`` name stands for."""
    found = re.search(r'open_zarr\("([^"]+\.zarr)/([^"]*)"\)', expression)
    assert found, f"not an open_zarr('STORE/ITEM') call: {expression!r}"
    store, written = clone / found[1], found[2]
    if "<" not in written:
        return [written]
    # "<case>" or "<ImageId>_image": one item per input file, named from it.
    pattern = ".+".join(re.escape(part) for part in re.split(r"<[^>]+>", written))
    # Item groups have Zarr metadata; .segflow and the catalogue and vectors folders do not.
    groups = sorted(path.name for path in store.iterdir() if (path / "zarr.json").is_file())
    matching = [group for group in groups if re.fullmatch(pattern, group)]
    assert matching, f"no group of {store} ({groups}) matches {written!r}"
    return matching

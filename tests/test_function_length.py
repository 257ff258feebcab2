"""Functions stay short (STYLE.md, issue 20): none in the engine or the Prefect layer is
longer than :data:`MAX_LINES`, counted from its ``def`` to its last line, less its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
FOLDERS = ("src/segflow", "flows", "tasks")  # src/segflow/flows and tasks are links to these
MAX_LINES = 80


def function_lengths(source: str) -> dict[str, int]:
    """Each function of ``source`` (``Class.method`` or ``outer.inner`` by nesting) and its
    line count without its docstring."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                if ast.get_docstring(child, clean=False) is not None:
                    doc = child.body[0]
                    lines -= (doc.end_lineno or doc.lineno) - doc.lineno + 1
                lengths[name] = lines
            visit(
                child, f"{name}." if isinstance(child, ast.ClassDef | ast.FunctionDef) else prefix
            )

    visit(ast.parse(source), "")
    return lengths


def test_the_counter_leaves_out_docstrings_and_sees_methods() -> None:
    source = 'class A:\n    def f(self):\n        """Doc\n        string."""\n        return 1\n'

    assert function_lengths(source) == {"A.f": 2}


def test_no_function_is_longer_than_80_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{name} ({lines} lines)"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if not path.is_symlink()
        for name, lines in function_lengths(path.read_text()).items()
        if lines > MAX_LINES
    ]

    assert not long, f"split these into parts with one job each: {long}"

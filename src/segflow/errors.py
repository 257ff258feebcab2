"""Error hierarchy: every project error also subclasses the matching builtin."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class SegflowError(Exception):
    """Base class of every error segflow raises on purpose."""


class ConfigError(SegflowError, ValueError):
    """A pipeline configuration is invalid; ``problems`` holds one line per problem, and
    ``untrained`` those of them that name a model not there (yet): not trained, or not
    copied here."""

    def __init__(self, problems: list[str], *, untrained: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        self.untrained = [p for p in untrained if p in self.problems]
        super().__init__("\n".join(self.problems))


class PlanError(SegflowError, ValueError):
    """A pipeline cannot be planned for an item (channels, dimensions, block shape)."""


class ItemReadError(SegflowError, OSError):
    """An item of a collection cannot be opened or read."""


class StoreError(SegflowError, OSError):
    """An output store cannot be created or written as asked."""


class ModelError(SegflowError, ValueError):
    """A model, its checkpoint or its card cannot be used as asked (file, card, channels)."""


class EvaluationError(SegflowError, ValueError):
    """A reference cannot be scored against an item (another shape, no grid for polygons)."""


class ModelNotFoundError(ModelError):
    """A model's checkpoint folder or file does not exist (not trained, or not copied here)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'gaussian'?"`` for the choices closest to ``word`` (``difflib``),
    or ``""`` when none is close.

    Examples
    --------
    >>> did_you_mean("gausian", ["gaussian", "median", "otsu"])
    "did you mean 'gaussian'?"
    >>> did_you_mean("xyz", ["gaussian"])
    ''
    """
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.7)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# A union member's tag in a pydantic error location: `float`, `list[float]`, `literal['a']`.
_UNION_TAG = re.compile(r"(int|float|str|bool|bytes|none|[a-z][a-z0-9_-]*\[.*\])")
_NOUNS = {"int": "an integer", "float": "a number", "str": "a text", "bool": "true or false"}
_PLURALS = {"int": "integers", "float": "numbers", "str": "texts", "bool": "booleans"}


def collapse_unions(problems: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors (``ValidationError.errors()``) with each union's per-member errors
    merged into one, of type ``"union"``, whose ``msg`` says what is expected.

    A value that fits no member of ``float | list[float]`` gives one error per member,
    located ``sigma.float`` and ``sigma.list[float]``; merged, it reads ``expects a number
    or a list of numbers`` at ``sigma`` with the value given there.

    Examples
    --------
    >>> [p["msg"] for p in collapse_unions([
    ...     {"loc": ("sigma", "float"), "msg": "Input should be a valid number", "input": "a"},
    ...     {"loc": ("sigma", "list[float]"), "msg": "Input should be a valid list", "input": "a"},
    ... ])]
    ['expects a number or a list of numbers']
    """
    merged: list[dict[str, Any]] = []
    unions: dict[tuple[Any, ...], dict[str, Any]] = {}
    for problem in problems:
        loc = tuple(problem["loc"])
        at = next(
            (
                k
                for k, part in enumerate(loc)
                if isinstance(part, str) and _UNION_TAG.fullmatch(part)
            ),
            None,
        )
        if at is None:
            merged.append(dict(problem))
            continue
        where = loc[:at]
        if where not in unions:
            unions[where] = {
                "loc": where,
                "type": "union",
                "expected": [],
                "input": problem.get("input"),
            }
            merged.append(unions[where])
        union = unions[where]
        if (noun := _expected(loc[at])) not in union["expected"]:
            union["expected"].append(noun)
        if len(loc) == at + 1:  # the member's error about the value itself (not an element)
            union["input"] = problem.get("input")
    for union in unions.values():
        union["msg"] = "expects " + " or ".join(union["expected"])
    return merged


def _expected(tag: str) -> str:
    """``float`` -> ``a number``, ``list[int]`` -> ``a list of integers``."""
    if tag in _NOUNS:
        return _NOUNS[tag]
    if tag == "none":
        return "null"
    outer, _, inner = tag.partition("[")
    inner = inner.removesuffix("]").removesuffix(", ...")
    if outer in ("list", "tuple", "set", "frozenset"):
        return f"a list of {_PLURALS.get(inner, inner)}"
    if outer in ("dict", "typed-dict", "model"):
        return "a mapping"
    if outer == "literal":
        return f"one of {inner}"
    return tag

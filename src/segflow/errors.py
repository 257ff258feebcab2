"""Error hierarchy: every project error also subclasses the matching builtin."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegflowError(Exception):
    """Base class of every error segflow raises on purpose."""


class ConfigError(SegflowError, ValueError):
    """A pipeline configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
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

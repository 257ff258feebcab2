"""Error hierarchy: every project error also subclasses the matching builtin."""

from __future__ import annotations


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

"""segflow: segment huge image collections block by block.

The engine (this package) never imports Prefect; ``segflow.flows`` and ``segflow.tasks`` (the
repository's ``flows/`` and ``tasks/`` folders) wrap it. The public names below are loaded
when first used, so ``segflow --version`` and a CLI that only checks what is to do do not
pay for importing the engine's libraries.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segflow.config import SegflowConfig, load_config
    from segflow.engine import compile_pipeline, plan_blocks, segment
    from segflow.ops import get_operation, list_operations
    from segflow.store.opened import open_store

try:
    __version__ = version("segflow")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

_LAZY = {
    "SegflowConfig": "segflow.config",
    "load_config": "segflow.config",
    "compile_pipeline": "segflow.engine",
    "plan_blocks": "segflow.engine",
    "segment": "segflow.engine",
    "get_operation": "segflow.ops",
    "list_operations": "segflow.ops",
    "open_store": "segflow.store.opened",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segflow' has no attribute {name!r}")


__all__ = [
    "SegflowConfig",
    "__version__",
    "compile_pipeline",
    "get_operation",
    "list_operations",
    "load_config",
    "open_store",
    "plan_blocks",
    "segment",
]

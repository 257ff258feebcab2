"""Importing cellpose where torchvision does not import (tests and benchmarks).

cellpose 4.2.1 imports torchvision at module level (``cellpose.transforms``; segment_anything
for its network), and torchvision's PyPI wheels do not import against the CPU torch of this
project (``operator torchvision::nms does not exist``). The mask computation never calls
torchvision, so :func:`import_cellpose` puts a stand-in for the torchvision modules into
``sys.modules`` while cellpose imports (only where torchvision itself does not import), and
takes it out again: every attribute of it is a function that raises if called, so a code path
that needed the real torchvision fails loudly instead of being silently faked.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_STAND_IN = (
    "torchvision",
    "torchvision.ops",
    "torchvision.ops.boxes",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms._functional_tensor",
)


def _refusing_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def attribute(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"{name}.{attr}: a stand-in for torchvision")

        return refuse

    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def import_cellpose() -> Any:
    """``cellpose.dynamics`` (and ``cellpose.vit`` and ``cellpose.models`` where
    segment-anything is installed), with the torchvision stand-in only while they import:
    it leaves ``sys.modules`` then, so no other test mistakes it for torchvision."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or the CUDA wheel that fails against the CPU torch
        stand_in = True
    else:
        stand_in = False
    if stand_in:
        for name in _STAND_IN:
            sys.modules.pop(name, None)
        modules = {name: _refusing_module(name) for name in _STAND_IN}
        for name, module in modules.items():
            parent, _, leaf = name.rpartition(".")
            if parent:
                setattr(modules[parent], leaf, module)
            sys.modules[name] = module
    try:
        from cellpose import dynamics

        try:
            from cellpose import models, vit  # noqa: F401  (CPSAM; CellposeModel)
        except ImportError:
            pass
    finally:
        if stand_in:
            for name in _STAND_IN:
                sys.modules.pop(name, None)
    return dynamics

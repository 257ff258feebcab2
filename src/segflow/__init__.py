"""segflow: segment huge image collections block by block.

The engine (this package) never imports Prefect; ``segflow.flows`` and ``segflow.tasks`` (the
repository's ``flows/`` and ``tasks/`` folders) wrap it.
"""

from importlib.metadata import PackageNotFoundError, version

from segflow.config import SegflowConfig, load_config
from segflow.engine import compile_pipeline, plan_blocks, segment
from segflow.ops import get_operation, list_operations

try:
    __version__ = version("segflow")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "SegflowConfig",
    "__version__",
    "compile_pipeline",
    "get_operation",
    "list_operations",
    "load_config",
    "plan_blocks",
    "segment",
]

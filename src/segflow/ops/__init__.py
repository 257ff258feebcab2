"""Pipeline operations. Importing this package registers every built-in operation."""

from segflow.ops import filters, intensity, label, morphology, objects, threshold
from segflow.ops.registry import (
    Done,
    GlobalStatistic,
    OpContext,
    Operation,
    OpKind,
    OpParams,
    describe_params,
    get_operation,
    list_operations,
    register,
)

__all__ = [
    "Done",
    "GlobalStatistic",
    "OpContext",
    "OpKind",
    "OpParams",
    "Operation",
    "describe_params",
    "filters",
    "get_operation",
    "intensity",
    "label",
    "list_operations",
    "morphology",
    "objects",
    "register",
    "threshold",
]

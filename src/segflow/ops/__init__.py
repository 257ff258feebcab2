"""Pipeline operations. Importing this package registers every built-in operation."""

from segflow.ops import (
    distance,
    edges,
    filters,
    intensity,
    label,
    label_local,
    morphology,
    objects,
    threshold,
    watershed,
)
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
    "distance",
    "edges",
    "filters",
    "get_operation",
    "intensity",
    "label",
    "label_local",
    "list_operations",
    "morphology",
    "objects",
    "register",
    "threshold",
    "watershed",
]

"""The operation registry: every pipeline step is chosen by name from here.

An operation declares its *kind*, which tells the engine how to run it blockwise:

``pointwise``
    Each output pixel depends on the same input pixel only (halo 0).
``local``
    Each output pixel depends on a neighbourhood; the op declares its halo from its
    parameters, and its border mode is applied at the item border only.
``global``
    Needs a statistic of the whole item (a histogram, percentiles) before it can be applied
    pointwise. It declares a :class:`GlobalStatistic`, reduced over every block's core; with a
    ``halo`` it is applied to the block grown by it, like a local operation, once the
    statistic is known (a per-object check that needs whole objects and an item-wide number).
``connectivity``
    Block-local labelling plus a global merge across block faces (see ``segflow.stitch``).
    ``apply`` labels a block; an optional ``rule`` measures objects and decides which to
    keep (sizes, a strong pixel, touching the border: always of the whole object, across
    blocks); an optional ``finish`` turns the kept objects into the output (a mask, holes
    filled, ...). Without ``finish`` the output is the stitched labels.

Adding an operation is one function, one :func:`register` call and its tests. A separate
package adds one without touching segflow: an entry point in the group
:data:`ENTRY_POINT_GROUP` naming its :class:`Operation` object, for example in its
``pyproject.toml``::

    [project.entry-points."segflow.operations"]
    sharpen = "my_package.ops:SHARPEN"
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from segflow.errors import did_you_mean
from segflow.stitch.labels import ObjectRule

OpKind = Literal["pointwise", "local", "global", "connectivity"]
KINDS: tuple[OpKind, ...] = ("pointwise", "local", "global", "connectivity")


class OpParams(BaseModel):
    """Base of every operation's parameter model: strict, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LowHighParams(OpParams):
    """Parameters with a ``low <= high`` pair (subclasses redeclare them with defaults and
    descriptions; the check stays)."""

    low: float = Field(description="lower bound")
    high: float = Field(description="upper bound")

    @model_validator(mode="after")
    def _ordered(self) -> LowHighParams:
        if self.low > self.high:
            raise ValueError(f"`low` ({self.low}) must not exceed `high` ({self.high})")
        return self


P = TypeVar("P", bound=OpParams)

#: The classes of a class map: ``(value, name, colour or None)`` each, by value.
Categories = tuple[tuple[int, str, str | None], ...]


@dataclass(frozen=True)
class OpContext:
    """What an operation may know besides its input block.

    Attributes
    ----------
    spatial_ndim : int
        Number of spatial axes; the block has one more, the channel axis first.
    stat : Any
        The finished global statistic, for ``global`` operations only.
    spacing : tuple of float
        Physical size of a pixel along each spatial axis (``(z), y, x``).
    box : tuple of slice
        Where the block's data lies in the item (spatial axes), for operations whose output
        names item positions; empty when unknown.
    shape : tuple of int
        The item's spatial shape.
    resource : Any
        What the operation's ``setup(params)`` built (a loaded model), once per worker
        process; ``None`` for operations without ``setup``.
    source : numpy.ndarray or None
        What the block's phase started from (the item's input in the first phase), over
        the same region as the block (``(c, *spatial)``): a guide image for a step that
        refines a map made from it (``crf``).
    """

    spatial_ndim: int
    stat: Any = None
    spacing: tuple[float, ...] = ()
    box: tuple[slice, ...] = ()
    shape: tuple[int, ...] = ()
    resource: Any = None
    source: np.ndarray | None = None


@dataclass(frozen=True)
class Done:
    """Returned by :meth:`GlobalStatistic.combine` when the statistic is final.

    ``value`` is what every block's ``ctx.stat`` holds (and what the run reports), unless
    ``per_block`` is given: then block ``i`` (in the order of the partials) gets only
    ``per_block[i]``, so a per-block table never travels to every block. ``counted``, when
    the statistic knows it, is how many values it saw (NaN left out): the engine warns when
    that is less than half of the item.
    """

    value: Any
    per_block: Sequence[Any] | None = None
    counted: int | None = None


def map_statistic(
    statistic: GlobalStatistic,
    core: np.ndarray,
    state: Any,
    box: tuple[slice, ...],
    shape: tuple[int, ...],
) -> Any:
    """Call ``statistic.map`` with the block's position when the statistic asks for it."""
    if getattr(statistic, "positional", False):
        return statistic.map(core, state, box=box, shape=shape)  # type: ignore[call-arg]
    return statistic.map(core, state)


class GlobalStatistic(Protocol):
    """A statistic reduced over all blocks of an item, in one or more passes.

    The engine calls ``start`` once, then repeats: ``map`` on the core of every block (on the
    workers, where the blocks live), ``combine`` on the small partial results (on the client),
    until ``combine`` returns :class:`Done`. States and partials must be small. A statistic
    with ``positional = True`` gets ``map(core, state, box=..., shape=...)``: where the core
    lies in the item (for samples that must not depend on the block layout). A statistic
    with ``merge(partials, state)`` (several partials as one, associative) is reduced as a
    tree on the workers: the client then receives a few partials, not one per block.
    """

    def start(self) -> Any: ...

    def map(self, core: np.ndarray, state: Any) -> Any: ...

    def combine(self, partials: Sequence[Any], state: Any) -> Any | Done: ...


@dataclass(frozen=True)
class Operation(Generic[P]):
    """One registered pipeline operation.

    ``apply(image, params, ctx)`` maps a block shaped ``(c, *spatial)`` to a new block with the
    same spatial shape (``finish(image, mask, params)`` likewise for a step's whole core):
    the operation's array functions take the array first, as numpy's do. Every other hook
    takes the step's ``params`` first, then what it is asked about.
    ``halo(params, spatial_ndim)`` gives the halo per spatial axis.
    ``out_channels(params, channels)`` and ``out_dtype(params, dtype)`` let the planner check
    a pipeline before any data moves; ``check_channels(params, channels)`` returns a
    problem (one line) when the step cannot take that many channels.
    ``expand(params)``, when it returns parts ``(part, op_name, op_params)``, replaces the
    configured step by those steps (an operation that needs several passes of its own).
    ``item_nodata(params, nodata)`` fills parameters that default to the item's nodata value
    (``None`` when its metadata has none), or raises ``ValueError``.
    ``for_item(params, info)`` fills what a step takes from its item (the boxes of a boxes
    file that name it), from the item's :class:`~segflow.io.base.ItemInfo`, or raises
    ``ValueError``; ``check_collection(params, items)`` lists (one line each) what the step
    finds wrong with the whole collection, ``items`` being the items'
    :class:`~segflow.io.base.ItemInfo` (boxes for files that are not in it).
    ``region_extras(params)``, for the pipeline's last step, gives columns of the region
    table indexed by object id (``values[id]``: the row of the box an object came from).
    ``item_spacing(params, spacing, units)`` fills those that default to the item's pixel
    size (a model step's ``pixel_size``, for resampling).
    ``finish`` gets the step's whole input core ``(c, *spatial)`` and returns the output
    without a channel axis, or with one for several channels.
    ``check_layout(params, channels, spatial_ndim)`` returns a problem (naming the file or
    value) when the step cannot take the item's layout (a model card's channels, dims);
    ``check_spacing(params, spacing, units)`` one when it cannot take the item's pixel size
    (a model trained at another resolution).
    ``class_names(params)`` names the output channels of an operation that makes several
    (a model's classes): a multi-channel final or ``save_as`` array is stored with a
    ``class`` axis and these names as its coordinate.
    ``categories(params)`` names the values of a one-channel class map (``classify``):
    ``(value, name, colour or None)`` per class, stored with the array that holds the
    step's output (its attributes and ``NAME_value`` / ``NAME_name`` coordinates).
    ``setup(params)`` builds what ``apply`` needs once per worker process (a loaded model),
    cached under ``setup_key(params)`` and handed over as ``ctx.resource``
    (:mod:`segflow.engine.resources`); ``resources(params)`` names scarce devices a block
    task of the step holds (``{"GPU": 1}``), passed to Dask at submission.
    ``stat_of``, for a part of an expanded step, names the earlier part whose finished
    statistic this part's ``ctx.stat`` holds (a model's inference reads the item's non-zero
    bounding box that its statistics part found).
    """

    name: str
    kind: OpKind
    params: type[P]
    apply: Callable[[np.ndarray, P, OpContext], np.ndarray]
    summary: str
    halo: Callable[[P, int], tuple[int, ...]] | None = None
    halo_rule: str = "0"
    statistic: Callable[[P], GlobalStatistic] | None = None
    out_channels: Callable[[P, int], int] | None = None
    out_dtype: Callable[[P, np.dtype], np.dtype] | None = None
    needs_single_channel: bool = False
    check_channels: Callable[[P, int], str | None] | None = None
    check_layout: Callable[[P, int, int], str | None] | None = None
    check_spacing: Callable[[P, tuple[float, ...], str], str | None] | None = None
    ndims: tuple[int, ...] = (2, 3)
    rule: Callable[[P, OpContext], ObjectRule] | None = None
    finish: Callable[[np.ndarray, np.ndarray | None, P], np.ndarray] | None = None
    by_class: Callable[[P], bool] | None = None
    # Whether the step's input values are semantic classes (label with classes: true), which
    # the regions table reports as its ``class`` column. Other by_class steps join by the
    # ids they are given (remove_small_objects, clear_border, flow_dynamics' sizes): those
    # are no classes and are not reported.
    classes_in: Callable[[P], bool] | None = None
    halo_spacing: Callable[[P, int, tuple[float, ...]], tuple[int, ...]] | None = None
    expand: Callable[[P], Sequence[tuple[str, str, OpParams]]] | None = None
    # A global op whose output is instance ids (stat = their count); a local op's, with a
    # function of its parameters (from_boxes writes ids or classes).
    makes_labels: bool | Callable[[P], bool] = False
    keeps_ids: bool = False  # a connectivity op whose output is its input, some objects zeroed
    item_nodata: Callable[[P, float | None], P] | None = None
    for_item: Callable[[P, Any], P] | None = None
    check_collection: Callable[[P, Sequence[Any]], list[str]] | None = None
    region_extras: Callable[[P], Mapping[str, np.ndarray]] | None = None
    item_spacing: Callable[[P, tuple[float, ...], str], P] | None = None
    setup: Callable[[P], Any] | None = None
    class_names: Callable[[P], tuple[str, ...]] | None = None
    categories: Callable[[P], Categories] | None = None
    setup_key: Callable[[P], Hashable] | None = None
    resources: Callable[[P], Mapping[str, float]] | None = None
    stat_of: str | None = None

    def gives_labels(self, params: P) -> bool:
        """Whether the step's output is instance ids (see ``makes_labels``)."""
        if callable(self.makes_labels):
            return bool(self.makes_labels(params))
        return self.makes_labels

    def rule_for(self, params: P, ctx: OpContext) -> ObjectRule | None:
        return None if self.rule is None else self.rule(params, ctx)

    def connectivity_of(self, params: P, spatial_ndim: int) -> int:
        """The step's connectivity (``None`` in the parameters: ``spatial_ndim``)."""
        value = getattr(params, "connectivity", None)
        return spatial_ndim if value is None else int(value)

    def pairs_by_class(self, params: P) -> bool:
        """Whether labels join across blocks only where the input values match."""
        return self.by_class is not None and self.by_class(params)

    def reports_classes(self, params: P) -> bool:
        """Whether the regions table gets a ``class`` column from the step's input."""
        return self.classes_in is not None and self.classes_in(params)

    def keeps_source(self, params: P) -> bool:
        """Whether the block's input must stay with its labels until the output is made."""
        return self.finish is not None or self.pairs_by_class(params)

    def resources_of(self, params: P) -> Mapping[str, float]:
        """Scarce resources a block task running this step holds (``{}`` for most)."""
        return {} if self.resources is None else self.resources(params)

    def statistic_for(self, params: P) -> GlobalStatistic:
        if self.statistic is None:
            raise TypeError(f"operation {self.name!r} has no global statistic")
        return self.statistic(params)

    def halo_of(
        self, params: P, spatial_ndim: int, spacing: tuple[float, ...] = ()
    ) -> tuple[int, ...]:
        """Halo per spatial axis; ops with a physical reach (``halo_spacing``) use ``spacing``
        (the item's pixel size, 1 per axis when not given)."""
        if self.halo_spacing is not None:
            sizes = tuple(abs(s) for s in spacing) or (1.0,) * spatial_ndim
            return tuple(int(h) for h in self.halo_spacing(params, spatial_ndim, sizes))
        if self.halo is None:
            return (0,) * spatial_ndim
        return tuple(int(h) for h in self.halo(params, spatial_ndim))

    def channels_after(self, params: P, channels: int) -> int:
        return channels if self.out_channels is None else self.out_channels(params, channels)

    def dtype_after(self, params: P, dtype: np.dtype) -> np.dtype:
        return (
            np.dtype(dtype) if self.out_dtype is None else np.dtype(self.out_dtype(params, dtype))
        )


_REGISTRY: dict[str, Operation[Any]] = {}
ENTRY_POINT_GROUP = "segflow.operations"


def register(op: Operation[Any]) -> Operation[Any]:
    """Add ``op`` to the registry; names are unique."""
    if op.kind not in KINDS:
        raise ValueError(f"operation {op.name!r}: kind {op.kind!r} is not one of {KINDS}")
    if op.kind == "global" and op.statistic is None:
        raise ValueError(f"operation {op.name!r}: a global operation needs a statistic")
    if op.kind == "connectivity" and "connectivity" not in op.params.model_fields:
        raise ValueError(f"operation {op.name!r}: a connectivity operation needs `connectivity`")
    if op.name in _REGISTRY:
        raise ValueError(f"operation {op.name!r} is already registered")
    _REGISTRY[op.name] = op
    return op


def get_operation(name: str, *, public: bool = False) -> Operation[Any]:
    """Return the registered operation called ``name``; with ``public``, only operations a
    config may name (those starting with ``_`` are parts of another operation's expansion).

    Raises
    ------
    KeyError
        If no operation has that name; the message suggests the closest names.
    """
    if name not in _REGISTRY:
        _load_entry_points()
    if name in _REGISTRY and not (public and name.startswith("_")):
        return _REGISTRY[name]
    hint = did_you_mean(name, [op.name for op in list_operations()])
    raise KeyError(
        f"unknown operation {name!r}; {hint or 'none is close to it'} "
        "(`segflow ops` lists every operation)"
    )


def list_operations() -> list[Operation[Any]]:
    """The operations a config may name, sorted by name."""
    _load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY) if not name.startswith("_")]


@functools.cache
def _load_entry_points() -> None:
    """Register the operations other packages declare in :data:`ENTRY_POINT_GROUP` (once
    per process: a Dask worker looking a step up by name loads them too)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        op = entry.load()
        where = f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP!r}"
        if not isinstance(op, Operation):
            raise TypeError(f"{where} must name an Operation, got {type(op).__name__}")
        if _REGISTRY.get(op.name) is op:
            continue
        try:
            register(op)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def describe_params(op: Operation[Any]) -> list[tuple[str, str, str]]:
    """``(name, type, default)`` for each parameter of ``op``, for ``segflow ops``."""
    rows = []
    for name, field in op.params.model_fields.items():
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        annotation = annotation.replace("typing.", "")
        default = "required" if field.is_required() else repr(field.default)
        rows.append((name, annotation, default))
    return rows

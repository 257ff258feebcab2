"""Compile a pipeline (a list of named steps) into phases the engine can run blockwise.

A phase is everything one Dask task per block can do without hearing from other blocks:
read, then every pointwise and local operation in order. Phases end where the item must be
seen whole: before a global operation (its statistic is reduced over all blocks first) and at a
connectivity operation (labels are merged across block faces).

Each phase knows the halo it needs at its start (``halo_in``): the local operations (and a
global operation that declares a halo) from there up to the next connectivity operation. The
first phase reads it with the input; a phase after a global statistic keeps it from the phase
before; a phase after a connectivity operation starts from finished cores and gets its halo
from the neighbours' strips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

import segflow.ops  # noqa: F401  (registers the built-in operations)
from segflow.errors import (
    ConfigError,
    ModelNotFoundError,
    PlanError,
    collapse_unions,
    did_you_mean,
)
from segflow.ops.registry import Categories, Operation, OpParams, get_operation


@dataclass(frozen=True)
class Step:
    """One validated pipeline step: the operation, its parameters and its position.

    A configured step whose operation expands (``Operation.expand``) becomes several steps
    with the same ``index``; ``part`` names each (``"seed1"``) and ``origin`` is the operation
    the user wrote, so messages and statistics still point at the configured step.
    """

    index: int
    op: Operation[Any]
    params: OpParams
    save_as: str | None = None
    origin: str | None = None
    part: str = ""

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def key(self) -> str:
        """Unique within a plan: ``pipeline[i].name`` (``pipeline[i].origin.part`` when
        expanded); global statistics are stored and reported under it."""
        if self.origin is None:
            return f"pipeline[{self.index}].{self.op.name}"
        return f"pipeline[{self.index}].{self.origin}.{self.part}"

    @property
    def stat_key(self) -> str:
        """The key of the statistic this step's ``ctx.stat`` holds: its own, or that of
        the part its operation names in ``stat_of`` (a sibling part of the same step)."""
        if self.op.stat_of is None or self.origin is None:
            return self.key
        return f"pipeline[{self.index}].{self.origin}.{self.op.stat_of}"

    def describe(self) -> str:
        return f"pipeline[{self.index}] {self.origin or self.op.name!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Workers look the operation up by name: functions are never pickled by value.
        return (
            _make_step,
            (self.index, self.op.name, self.params, self.save_as, self.origin, self.part),
        )


def _make_step(
    index: int,
    name: str,
    params: OpParams,
    save_as: str | None,
    origin: str | None = None,
    part: str = "",
) -> Step:
    return Step(index, get_operation(name), params, save_as, origin, part)


@dataclass(frozen=True)
class Phase:
    """Steps run back to back in one task per block, then what ends the phase.

    ``ends_with`` is ``"statistic"`` (the next step is global and needs a reduction of this
    phase's output), ``"label"`` (``connectivity`` is the connectivity step to run on this
    phase's output) or ``"output"`` (the last phase writes the result).
    """

    steps: tuple[Step, ...]
    ends_with: str
    statistic_step: Step | None = None
    connectivity: Step | None = None
    halo_in: tuple[int, ...] = ()
    after: Step | None = None  # the connectivity step this phase starts from, if any


@dataclass(frozen=True)
class Plan:
    """A compiled pipeline for items with a given channel count, dtype and dimensionality."""

    steps: tuple[Step, ...]
    phases: tuple[Phase, ...]
    halo: tuple[int, ...]  # what the first phase reads around each block
    out_dtype: np.dtype
    out_kind: str  # "labels", "mask", "classes", "image" or "probabilities"
    saved: Mapping[str, np.dtype] = field(default_factory=dict)
    #: Channel names of a multi-channel output (stored with a leading ``class`` axis);
    #: empty for a single-channel output. ``saved_classes`` likewise per ``save_as`` array.
    out_classes: tuple[str, ...] = ()
    saved_classes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: ``(value, name, colour)`` of the classes of a one-channel class map (``classify``
    #: with names), for the output and per ``save_as`` array; empty when unnamed.
    out_categories: Categories = ()
    saved_categories: Mapping[str, Categories] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return any(p.connectivity is not None for p in self.phases)


def _unknown_parameter(key: str, value: Any, op_name: str, known: list[str]) -> str:
    """``unknown parameter of 'otsu' (got 3); did you mean 'nbins'?``, or the parameters
    when none is close (an operation has a handful)."""
    hint = did_you_mean(key, known)
    if not hint:
        hint = f"its parameters: {', '.join(known)}" if known else "it takes no parameters"
    return f"unknown parameter of {op_name!r} (got {value!r}); {hint}"


def parse_steps(pipeline: Sequence[Mapping[str, Any] | Step]) -> tuple[Step, ...]:
    """Validate raw pipeline steps (``{"op": NAME, **params}``) against the registry.

    Raises
    ------
    ConfigError
        With one line per problem, naming ``pipeline[i].key``, the value and what is expected.
    """
    steps: list[Step] = []
    problems: list[str] = []
    untrained: list[str] = []
    if not pipeline:
        raise ConfigError(["pipeline: must list at least one step, got an empty list"])
    for i, raw in enumerate(pipeline):
        if isinstance(raw, Step):
            expanded = raw.origin is not None  # already one part of an expansion: keep it
            steps.append(raw if expanded else Step(i, raw.op, raw.params, raw.save_as))
            continue
        if not isinstance(raw, Mapping):
            problems.append(f"pipeline[{i}]: expected a mapping with an `op` key, got {raw!r}")
            continue
        data = dict(raw)
        name = data.pop("op", None)
        save_as = data.pop("save_as", None)
        if name is None:
            problems.append(f"pipeline[{i}]: missing `op` (the operation name)")
            continue
        try:
            op = get_operation(str(name), public=True)
        except KeyError as error:
            problems.append(f"pipeline[{i}].op: {error.args[0]}")
            continue
        try:
            params = op.params.model_validate(data)
        except ValidationError as error:
            for problem in collapse_unions(error.errors()):
                where = ".".join(str(p) for p in problem["loc"])
                value = problem.get("input")
                key = f"pipeline[{i}].{where}" if where else f"pipeline[{i}] ({name})"
                message = str(problem["msg"]).removeprefix("Value error, ")
                if problem["type"] == "union":  # one line for a value that fits no member
                    problems.append(f"{key} {message} (got {value!r})")
                    continue
                if problem["type"] == "extra_forbidden":
                    known = list(op.params.model_fields)
                    message = _unknown_parameter(str(where), value, str(name), known)
                shown = "" if not where or "(got" in message else f" (got {value!r})"
                problems.append(f"{key}: {message}{shown}")
            continue
        if save_as is not None and not str(save_as).isidentifier():
            problems.append(f"pipeline[{i}].save_as: {save_as!r} is not a valid array name")
            continue
        try:
            steps.extend(_expand(Step(i, op, params, None if save_as is None else str(save_as))))
        except ValueError as error:  # an expansion reads files (a model card): name the step
            problems.append(f"pipeline[{i}] ({name}): {error}")
            if isinstance(error, ModelNotFoundError):
                untrained.append(problems[-1])
    if problems:
        raise ConfigError(problems, untrained=untrained)
    return tuple(steps)


def region_extras(plan: Plan) -> dict[str, np.ndarray]:
    """Columns the plan's last step adds to the region table, indexed by object id (empty
    for most steps)."""
    last = plan.steps[-1]
    if last.op.region_extras is None:
        return {}
    return dict(last.op.region_extras(last.params))


def collection_notes(
    pipeline: Sequence[Mapping[str, Any] | Step], infos: Sequence[Any]
) -> list[str]:
    """What the pipeline's steps find wrong with the whole collection (``check_collection``:
    boxes for files that are not in it), one line each naming the step; ``infos`` are the
    items' :class:`~segflow.io.base.ItemInfo`."""
    lines = []
    for step in parse_steps(pipeline):
        if step.op.check_collection is not None:
            found = step.op.check_collection(step.params, infos)
            lines += [f"{step.describe()}: {line}" for line in found]
    return lines


def _expand(step: Step) -> list[Step]:
    """The steps a configured step runs as: itself, or its operation's expansion."""
    parts = [] if step.op.expand is None else step.op.expand(step.params)
    if not parts:
        return [step]
    last = len(parts) - 1
    return [
        Step(
            step.index,
            get_operation(name),
            params,
            step.save_as if k == last else None,
            origin=step.op.name,
            part=part,
        )
        for k, (part, name, params) in enumerate(parts)
    ]


def compile_pipeline(
    pipeline: Sequence[Mapping[str, Any] | Step],
    *,
    spatial_ndim: int,
    channels: int,
    dtype: np.dtype | str,
    spacing: Sequence[float] = (),
    units: str = "pixel",
    nodata: float | None = None,
    item: Any = None,
) -> Plan:
    """Check a pipeline against an item's layout and split it into phases; ``nodata`` is the
    item's nodata value from its metadata (for ``mask_nodata`` without a ``value``);
    ``spacing`` (in ``units``) is the item's pixel size, when known; ``item`` is the item's
    :class:`~segflow.io.base.ItemInfo`, for steps that take something from it (``for_item``).

    Examples
    --------
    >>> plan = compile_pipeline(
    ...     [{"op": "gaussian", "sigma": 2}, {"op": "otsu"}, {"op": "label"}],
    ...     spatial_ndim=2, channels=1, dtype="float32")
    >>> [p.ends_with for p in plan.phases]
    ['statistic', 'label', 'output']
    >>> plan.halo
    (8, 8)
    """
    steps = list(parse_steps(pipeline))
    sizes = tuple(float(s) for s in spacing)
    trace = _Trace(dtype=np.dtype(dtype), channels=channels)
    for i, step in enumerate(steps):
        step = steps[i] = _bind_step(step, nodata=nodata, item=item, sizes=sizes, units=units)
        _check_step(
            step, spatial_ndim=spatial_ndim, channels=trace.channels, sizes=sizes, units=units
        )
        trace.follow(step, spatial_ndim, sizes)
    return _make_plan(steps, trace, spatial_ndim, sizes)


def _bind_step(
    step: Step, *, nodata: float | None, item: Any, sizes: tuple[float, ...], units: str
) -> Step:
    """``step`` with what it takes from the item filled into its parameters: the nodata
    value, anything of the item's info (``for_item``), its spacing (raises ``PlanError``)."""
    where = step.describe()
    if step.op.item_nodata is not None:
        try:
            step = replace(step, params=step.op.item_nodata(step.params, nodata))
        except ValueError as error:
            raise PlanError(f"{where}: {error}") from None
    if step.op.for_item is not None and item is not None:
        try:
            step = replace(step, params=step.op.for_item(step.params, item))
        except ValueError as error:
            raise PlanError(f"{where}: {error}") from None
    if step.op.item_spacing is not None and sizes:
        try:
            step = replace(step, params=step.op.item_spacing(step.params, sizes, units))
        except ValueError as error:  # e.g. the model file cannot be read
            raise PlanError(f"{where}: {error}") from None
    return step


def _check_step(
    step: Step, *, spatial_ndim: int, channels: int, sizes: tuple[float, ...], units: str
) -> None:
    """Refuse ``step`` on an item of ``spatial_ndim`` axes whose image has ``channels``
    channels at this step, or of this spacing (``PlanError`` naming the step)."""
    where = step.describe()
    if spatial_ndim not in step.op.ndims:
        raise PlanError(f"{where} works on {step.op.ndims}-D items, this item is {spatial_ndim}-D")
    if step.op.needs_single_channel and channels != 1:
        raise PlanError(
            f"{where} needs a single-channel image, got {channels} channels; add "
            "'select_bands' or 'combine_bands' before it"
        )
    problem = None
    if step.op.check_channels is not None:
        problem = step.op.check_channels(step.params, channels)
    if not problem and step.op.check_layout is not None:
        try:
            problem = step.op.check_layout(step.params, channels, spatial_ndim)
        except ValueError as error:  # e.g. the model file cannot be read
            problem = str(error)
    if not problem and step.op.check_spacing is not None and sizes:
        problem = step.op.check_spacing(step.params, sizes, units)
    if problem:
        raise PlanError(f"{where}: {problem}")


@dataclass
class _Trace:
    """What the image is after each step of a pipeline being compiled: its dtype, channels
    and their names, the value names of a class map, whether it holds labels, and what the
    steps so far save (``save_as``)."""

    dtype: np.dtype
    channels: int
    names: tuple[str, ...] | None = None  # channel names, where an operation gave them
    categories: Categories = ()  # the value names of the last step's class map, if any
    labels_out: bool = False
    saved: dict[str, np.dtype] = field(default_factory=dict)
    saved_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    saved_categories: dict[str, Categories] = field(default_factory=dict)

    def follow(self, step: Step, spatial_ndim: int, sizes: tuple[float, ...]) -> None:
        """Move past ``step`` (raises ``PlanError`` for parameters that do not fit)."""
        where = step.describe()
        before, channels_before = self.dtype, self.channels
        try:
            step.op.halo_of(step.params, spatial_ndim, sizes)
            self.channels = step.op.channels_after(step.params, self.channels)
            if step.op.class_names is not None:
                self.names = tuple(step.op.class_names(step.params))
            elif self.channels != channels_before:
                self.names = None
            self.dtype = step.op.dtype_after(step.params, self.dtype)
        except ValueError as error:
            raise PlanError(f"{where}: {error}") from None
        # Value names hold for this step's output only: any later step changes the values.
        self.categories = () if step.op.categories is None else step.op.categories(step.params)
        if step.op.kind == "connectivity":
            # Ids kept from a label image stay labels; a mask stays a mask.
            self.labels_out = step.op.finish is None or (step.op.keeps_ids and self.labels_out)
        elif step.op.gives_labels(step.params):
            self.labels_out = True
        elif self.dtype != before:
            self.labels_out = False
        if step.save_as is not None:
            self.saved[step.save_as] = _storage_dtype(self.dtype)
            if self.channels > 1:
                self.saved_classes[step.save_as] = _class_names(self.names, self.channels, where)
            if self.categories:
                self.saved_categories[step.save_as] = self.categories


def _make_plan(
    steps: Sequence[Step], trace: _Trace, spatial_ndim: int, sizes: tuple[float, ...]
) -> Plan:
    """The plan of the bound ``steps``, whose output ``trace`` describes."""
    phases = _split_phases(steps, spatial_ndim, sizes)
    out_kind = "labels" if trace.labels_out else _output_kind(trace.dtype)
    out_classes: tuple[str, ...] = ()
    if trace.channels > 1:
        where = f"the pipeline's output ({out_kind})"
        out_classes = _class_names(trace.names, trace.channels, where)
        if out_kind == "image" and trace.names is not None:  # a model's (or classifier's) map
            out_kind = "probabilities"
    return Plan(
        steps=tuple(steps),
        phases=phases,
        halo=phases[0].halo_in,
        out_dtype=_storage_dtype(trace.dtype),
        out_kind=out_kind,
        saved=trace.saved,
        out_classes=out_classes,
        saved_classes=trace.saved_classes,
        out_categories=trace.categories,
        saved_categories=trace.saved_categories,
    )


def _class_names(names: tuple[str, ...] | None, channels: int, where: str) -> tuple[str, ...]:
    """Names of ``channels`` output channels: the operation's, else ``c0, c1, ...``."""
    if names is None:
        return tuple(f"c{i}" for i in range(channels))
    if len(names) != channels:
        raise PlanError(f"{where}: {channels} channels but {len(names)} class names {names}")
    return names


def _split_phases(
    steps: Sequence[Step], ndim: int, spacing: tuple[float, ...]
) -> tuple[Phase, ...]:
    raw: list[tuple[list[Step], str, Step | None]] = []
    current: list[Step] = []
    for step in steps:
        if step.op.kind == "global":
            raw.append((current, "statistic", step))
            current = [step]
        elif step.op.kind == "connectivity":
            raw.append((current, "label", step))
            current = []
        else:
            current.append(step)
    raw.append((current, "output", None))
    # Halo needed at each phase's start: local halos up to the next connectivity step.
    halos: list[tuple[int, ...]] = []
    ahead = [0] * ndim
    for phase_steps, ends_with, _ in reversed(raw):
        if ends_with == "label":
            ahead = [0] * ndim
        for step in phase_steps:
            if step.op.kind in ("local", "global"):  # a global step may read around too
                h = step.op.halo_of(step.params, ndim, spacing)
                ahead = [a + x for a, x in zip(ahead, h, strict=True)]
        halos.append(tuple(ahead))
    halos.reverse()
    phases = []
    after: Step | None = None
    for (phase_steps, ends_with, boundary), halo in zip(raw, halos, strict=True):
        phases.append(
            Phase(
                tuple(phase_steps),
                ends_with,
                statistic_step=boundary if ends_with == "statistic" else None,
                connectivity=boundary if ends_with == "label" else None,
                halo_in=halo,
                after=after,
            )
        )
        after = boundary if ends_with == "label" else None
    return tuple(phases)


def _output_kind(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "mask"
    if np.issubdtype(dtype, np.integer):
        return "classes"
    return "image"


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """Zarr stores masks as uint8 (0/1)."""
    return np.dtype(np.uint8) if dtype == np.bool_ else np.dtype(dtype)

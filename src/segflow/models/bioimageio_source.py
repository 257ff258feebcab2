"""bioimage.io model packages as a model source: a folder or ``.zip`` with ``rdf.yaml``.

The package's ``rdf.yaml`` (or ``bioimageio.yaml``) is read with ``bioimageio.spec`` (format
0.4 descriptions are converted to 0.5 by it; nothing is fetched: IO checks are off and a
missing file is refused before the spec is asked). The card comes from it:

* the input (one tensor): its axes ``batch``, ``channel`` and ``space`` (``z``, ``y``, ``x``
  ids, any order: segflow transposes), its channel names, and its spatial ``scale`` and
  ``unit`` as the card's spacing. The tile is the test input's spatial shape (a valid size
  by the spec); a fixed size fixes it; for a ``min`` + ``step`` size the step's ``tile``
  overrides it, refused at load unless it is ``min + n * step`` on every axis;
* the preprocessing, mapped to whole-item statistics: ``scale_range`` (the item's
  percentiles; the spec's ``eps`` in the denominator is left out, a relative 1e-6 of the
  range), ``zero_mean_unit_variance`` (the item's mean and standard deviation; ``eps`` left
  out), ``fixed_zero_mean_unit_variance`` and ``scale_linear`` (fixed numbers), then
  ``clip`` and ``binarize`` on the scaled values (inside the network); ``ensure_dtype``
  passes. Statistics the spec computes *per sample* over the spatial axes are the *item's*
  here (``segflow models inspect`` says so); statistics over fewer axes (per row), jointly
  over several channels, or of another tensor are refused in one line;
* the output (the first tensor): its channel names are the classes (a one-channel output
  becomes ``background`` + its name, the background its complement) and its
  postprocessing ``sigmoid`` or ``softmax`` the activation of each tile (none: the
  network's values blended as they are); other postprocessing is refused. An output whose
  spatial size is not the input's is refused; an output ``halo`` is noted (segflow blends
  overlapping tiles instead of cropping their borders).

Weights, in this order of preference: ``torchscript``, ``onnx`` (ONNX Runtime, as
:mod:`segflow.models.onnx_source`) and ``pytorch_state_dict`` whose architecture comes from
an installed library (``import_from``): an architecture in a ``.py`` file of the package is
refused, segflow does not run downloaded code; state dicts are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from segflow.errors import ModelError
from segflow.models.card import ModelCard
from segflow.models.checkpoint import LoadedModel
from segflow.models.inference import Device, resolve_device
from segflow.models.sources import ModelSource, SourceCard

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
UNITS = {"millimeter": "mm", "micrometer": "um", "nanometer": "nm", "meter": "m",
         "centimeter": "cm"}  # fmt: skip
NORMALISING = ("scale_range", "zero_mean_unit_variance", "fixed_zero_mean_unit_variance",
               "scale_linear")  # fmt: skip
POINTWISE = ("clip", "binarize")


class Package:
    """The files of a package folder or zip, by their names in ``rdf.yaml``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        names = self.zip.namelist() if self.zip else [p.name for p in path.iterdir()]
        self.rdf = next((n for n in RDF_NAMES if n in names), None)
        if self.rdf is None:
            self.rdf = next(
                (n for n in names if n.endswith((".rdf.yaml", ".bioimageio.yaml"))), None
            )

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(name)
            return (self.path / name).read_bytes()
        except (KeyError, OSError):
            raise ModelError(
                f"bioimage.io package '{self.path}': {name} (named in {self.rdf}) is missing"
            ) from None


def open_package(path: Path) -> Package:
    try:
        package = Package(path)
    except zipfile.BadZipFile:
        raise ModelError(f"bioimage.io package '{path}' is not a readable zip file") from None
    if package.rdf is None:
        raise ModelError(
            f"bioimage.io package '{path}' has no rdf.yaml (or bioimageio.yaml): segflow reads "
            "the model's description from it"
        )
    return package


def read_description(path: Path) -> tuple[Any, Package]:
    """The package's model description (``bioimageio.spec``, format 0.5), one line when bad."""
    try:
        from bioimageio.spec import InvalidDescr, ValidationContext, build_description
    except ImportError:
        raise ModelError(
            "bioimage.io packages need bioimageio.spec: pip install 'segflow[ml]'"
        ) from None
    package = open_package(path)
    assert package.rdf is not None
    try:
        content = yaml.safe_load(package.read(package.rdf))
    except yaml.YAMLError as exc:
        raise ModelError(
            f"bioimage.io package '{path}': {package.rdf} is not YAML ({exc})"
        ) from None
    if not isinstance(content, dict):
        raise ModelError(f"bioimage.io package '{path}': {package.rdf} is not a YAML mapping")
    root: Any = package.zip if package.zip is not None else path
    context = ValidationContext(root=root, perform_io_checks=False, log_warnings=False)
    descr = build_description(content, context=context, format_version="latest")
    if isinstance(descr, InvalidDescr) or getattr(descr, "type", None) != "model":
        errors = getattr(descr.validation_summary, "errors", [])
        reason = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:2])
        raise ModelError(
            f"bioimage.io package '{path}': {package.rdf} is not a valid model description "
            f"({(reason or 'not a model').splitlines()[0][:300]})"
        )
    return descr, package


def _axes(tensor: Any, path: Path, role: str) -> list[Any]:
    kinds = [a.type for a in tensor.axes]
    if any(k not in ("batch", "channel", "space") for k in kinds) or kinds.count("space") not in (
        2,
        3,
    ):
        raise ModelError(
            f"bioimage.io package '{path}': {role} {tensor.id!r} has axes "
            f"{[str(a.id) for a in tensor.axes]}; segflow runs batch, channel and 2 or 3 "
            "space axes"
        )
    return list(tensor.axes)


def _space_ids(axes: Sequence[Any]) -> list[str]:
    return [str(a.id) for a in axes if a.type == "space"]


def _tile(inp: Any, package: Package, path: Path) -> tuple[tuple[int, ...], bool, list[str]]:
    """The tile: the test input's spatial shape; fixed when every space axis is."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    space = [a for a in inp.axes if a.type == "space"]
    test = np.load(io.BytesIO(package.read(str(inp.test_tensor.source))))
    if test.ndim != len(inp.axes):
        raise ModelError(
            f"bioimage.io package '{path}': test input of shape {test.shape} does not have "
            f"the {len(inp.axes)} axes of input {inp.id!r}"
        )
    tile = tuple(int(test.shape[i]) for i, a in enumerate(inp.axes) if a.type == "space")
    fixed = all(isinstance(a.size, int) for a in space)
    hints = [f"{a.id}: min {a.size.min}, step {a.size.step}" for a in space
             if isinstance(a.size, ParameterizedSize)]  # fmt: skip
    notes = [] if fixed else [f"tile: {tile}, the test input's; the step's `tile` overrides it "
                              f"with sizes min + n * step ({'; '.join(hints)})"]  # fmt: skip
    return tile, fixed, notes


def _reduced_over_item(kwargs: Any, inp: Any, channels: int) -> bool:
    """Whether statistics over ``kwargs.axes`` are per item and channel (see the docstring)."""
    axes = getattr(kwargs, "axes", None)
    names = {str(a.id): a.type for a in inp.axes}
    chosen = set(names) if axes is None else {str(a) for a in axes}
    spatial = {n for n, kind in names.items() if kind == "space"}
    channel_joint = any(names.get(a) == "channel" for a in chosen) and channels > 1
    return spatial <= chosen and not channel_joint


def _normalisation(step: Any, inp: Any, channels: int, path: Path) -> tuple[dict[str, Any], str]:
    kind, kwargs = str(step.id), step.kwargs
    refused = (
        f"bioimage.io package '{path}': preprocessing {kind} {kwargs.model_dump(mode='json')} "
        "has no whole-item equivalent in segflow"
    )
    if kind in ("scale_range", "zero_mean_unit_variance"):
        if getattr(kwargs, "reference_tensor", None) not in (None, inp.id):
            raise ModelError(f"{refused} (statistics of another tensor)")
        if not _reduced_over_item(kwargs, inp, channels):
            raise ModelError(f"{refused} (statistics over other axes than the spatial ones)")
        note = f"preprocessing {kind}: the spec's per-sample statistics are the item's"
        if kind == "zero_mean_unit_variance":
            return {"method": "zscore"}, note
        low, high = float(kwargs.min_percentile), float(kwargs.max_percentile)
        return {"method": "percentile", "low": low, "high": high}, note
    if getattr(kwargs, "axis", None) is not None:
        raise ModelError(f"{refused} (one value per channel)")
    if kind == "fixed_zero_mean_unit_variance":
        mean, std = float(kwargs.mean), float(kwargs.std)
        return {"method": "fixed", "low": mean, "high": mean + std}, f"preprocessing {kind}"
    gain, offset = float(kwargs.gain), float(kwargs.offset)
    if gain <= 0:
        raise ModelError(f"{refused} (a gain of {gain:g})")
    return {"method": "fixed", "low": -offset / gain, "high": (1 - offset) / gain}, kind


def _preprocessing(
    inp: Any, channels: int, path: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """The card's normalisation, the pointwise steps after it and notes."""
    norm: dict[str, Any] = {"method": "none"}
    pointwise: list[dict[str, Any]] = []
    notes: list[str] = []
    for step in inp.preprocessing:
        kind = str(step.id)
        if kind == "ensure_dtype":
            continue
        if kind in NORMALISING and norm["method"] == "none" and not pointwise:
            norm, note = _normalisation(step, inp, channels, path)
            notes.append(note)
        elif kind in POINTWISE and getattr(step.kwargs, "axis", None) is None:
            kwargs = step.kwargs.model_dump(mode="json")
            if kind == "clip" and (kwargs.get("min_percentile") or kwargs.get("max_percentile")):
                raise ModelError(
                    f"bioimage.io package '{path}': preprocessing clip at percentiles is not "
                    "mapped by segflow"
                )
            pointwise.append({"id": kind, **kwargs})
        else:
            raise ModelError(
                f"bioimage.io package '{path}': preprocessing {kind} (step "
                f"{[str(s.id) for s in inp.preprocessing].index(kind) + 1}) is not mapped by "
                "segflow: one scaling (scale_range, zero_mean_unit_variance, scale_linear, "
                "fixed_zero_mean_unit_variance), then clip or binarize"
            )
    return norm, pointwise, notes


def _output(out: Any, inp: Any, path: Path) -> tuple[list[str], str, list[str]]:
    """The classes, the activation and notes of the first output tensor."""
    axes = _axes(out, path, "output")
    if _space_ids(axes) != _space_ids(inp.axes):
        raise ModelError(
            f"bioimage.io package '{path}': output space axes {_space_ids(axes)} are not the "
            f"input's {_space_ids(inp.axes)}"
        )
    notes = []
    for axis in axes:
        size = getattr(axis, "size", None)
        if (
            axis.type == "space"
            and not (getattr(size, "axis_id", None) == axis.id and not getattr(size, "offset", 0))
            and not isinstance(size, int)
        ):
            raise ModelError(
                f"bioimage.io package '{path}': output axis {axis.id!r} is not the input's "
                "size; segflow needs an output on the input's grid"
            )
        if getattr(axis, "halo", 0):
            notes.append(f"output halo {axis.halo} on {axis.id}: segflow blends overlapping "
                         "tiles instead of cropping their borders")  # fmt: skip
    channel = next((a for a in axes if a.type == "channel"), None)
    names = [str(n) for n in channel.channel_names] if channel is not None else [str(out.id)]
    steps = [str(s.id) for s in out.postprocessing if str(s.id) != "ensure_dtype"]
    if steps not in ([], ["sigmoid"], ["softmax"]):
        raise ModelError(
            f"bioimage.io package '{path}': postprocessing {steps} is not mapped by segflow "
            "(none, sigmoid or softmax)"
        )
    activation = steps[0] if steps else "none"
    if len(names) == 1:
        names = ["background", names[0]]
        notes.append("output: one channel; class 'background' is its complement")
    return names, activation, notes


def _spatial_order(inp: Any, path: Path) -> list[str]:
    """The input's space axis ids in segflow's order ``(z), y, x``."""
    ids = _space_ids(inp.axes)
    if not set(ids) <= {"z", "y", "x"} or len(set(ids)) != len(ids):
        raise ModelError(
            f"bioimage.io package '{path}': input space axes {ids} are not named z, y, x"
        )
    return [a for a in ("z", "y", "x") if a in ids]


def _spacing(inp: Any, order: Sequence[str]) -> tuple[tuple[float, ...] | None, str | None]:
    space = {str(a.id): a for a in inp.axes if a.type == "space"}
    units = {UNITS.get(str(space[a].unit)) if space[a].unit else None for a in order}
    if len(units) != 1 or None in units:
        return None, None
    return tuple(float(space[a].scale) for a in order), units.pop()


def derive_card(path: Path) -> SourceCard:
    """The card of a bioimage.io package (see the module docstring)."""
    descr, package = read_description(path)
    inp, out = descr.inputs[0], descr.outputs[0]
    if len(descr.inputs) != 1:
        raise ModelError(
            f"bioimage.io package '{path}' has {len(descr.inputs)} inputs; segflow feeds one"
        )
    axes = _axes(inp, path, "input")
    order = _spatial_order(inp, path)
    channel = next((a for a in axes if a.type == "channel"), None)
    names = [str(n) for n in channel.channel_names] if channel is not None else [str(inp.id)]
    norm, pointwise, notes = _preprocessing(inp, len(names), path)
    tile_rdf, fixed, tile_notes = _tile(inp, package, path)
    rdf_space = _space_ids(inp.axes)
    tile = tuple(tile_rdf[rdf_space.index(a)] for a in order)
    classes, activation, out_notes = _output(out, inp, path)
    spacing, units = _spacing(inp, order)
    single = (
        len(classes) == 2
        and classes[0] == "background"
        and any(n.startswith("output: one channel") for n in out_notes)
    )
    complement = None if not single else ("negate" if activation == "sigmoid" else "one_minus")
    params = {"weights": _weights_format(descr, path), "pointwise": pointwise,
              "complement": complement}  # fmt: skip
    card = {
        "name": str(descr.name), "architecture": {"name": "bioimageio", "params": params},
        "spatial_dims": len(order),
        "channels": [{"name": n, "normalization": norm} for n in names],
        "classes": classes, "tile": tile, "overlap": 0.5, "spacing": spacing, "units": units,
        "output_activation": activation,
    }  # fmt: skip
    try:
        model_card = ModelCard.model_validate(card)
    except ValueError as exc:
        raise ModelError(
            f"bioimage.io package '{path}': its description does not make a model card "
            f"({' '.join(str(exc).splitlines()[:3])[:300]})"
        ) from None
    notes += tile_notes + out_notes + [f"weights: {params['weights']}"]
    where = f"{package.rdf} of {path.name}"
    return SourceCard(model_card, "bioimageio", where, fixed_tile=fixed, notes=tuple(notes))


def _weights_format(descr: Any, path: Path) -> str:
    weights = descr.weights
    for kind in ("torchscript", "onnx", "pytorch_state_dict"):
        entry = getattr(weights, kind, None)
        if entry is None:
            continue
        if kind == "pytorch_state_dict" and not hasattr(entry.architecture, "import_from"):
            raise ModelError(
                f"bioimage.io package '{path}': its only usable weights are a state dict whose "
                f"architecture is code in the package ({entry.architecture.source}); segflow "
                "does not run downloaded code (export TorchScript or ONNX weights)"
            )
        return kind
    raise ModelError(
        f"bioimage.io package '{path}' has no torchscript, onnx or pytorch_state_dict weights"
    )


def _relayout(x: torch.Tensor, have: Sequence[str], want: Sequence[str]) -> torch.Tensor:
    """``x`` with axes named ``have`` as axes ``want``: size-1 axes added or dropped."""
    for name in [n for n in have if n not in want]:
        x = x.squeeze(list(have).index(name))
        have = [n for n in have if n != name]
    for name in [n for n in want if n not in have]:
        x = x.unsqueeze(-1)
        have = [*have, name]
    return x.permute([list(have).index(n) for n in want])


class BioimageioNetwork(torch.nn.Module):
    """The package's network as segflow calls one: ``(batch, channels, (z), y, x)`` in,
    ``(batch, classes, (z), y, x)`` out; the pointwise preprocessing (clip, binarize) first,
    a one-channel output completed with its complement (see the module docstring)."""

    def __init__(self, network: Any, inputs: list[str], outputs: list[str], order: list[str],
                 pointwise: list[dict[str, Any]], complement: str | None) -> None:  # fmt: skip
        super().__init__()
        self.network = network
        self.inputs, self.outputs, self.order = inputs, outputs, order
        self.pointwise, self.complement = pointwise, complement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.pointwise:
            if step["id"] == "clip":
                x = torch.clamp(x, step.get("min"), step.get("max"))
            else:
                x = (x > step["threshold"]).to(x.dtype)
        ours = ["batch", "channel", *self.order]
        if "batch" in self.inputs:
            y = self._run(_relayout(x, ours, self.inputs))
        else:
            y = torch.stack([self._run(_relayout(s, ours[1:], self.inputs)) for s in x])
        y = _relayout(
            y, self.outputs if "batch" in self.outputs else ["batch", *self.outputs], ours
        )
        if self.complement == "negate":
            return torch.cat([-y, y], dim=1)
        if self.complement == "one_minus":
            return torch.cat([1 - y, y], dim=1)
        return y

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _names(tensor: Any) -> list[str]:
    return [a.type if a.type in ("batch", "channel") else str(a.id) for a in tensor.axes]


def load_network(descr: Any, package: Package, kind: str, device: Device) -> Any:
    """The package's network of weights ``kind`` on ``device`` (eval mode)."""
    entry = getattr(descr.weights, kind)
    data = package.read(str(entry.source))
    path = package.path
    try:
        if kind == "torchscript":
            import warnings

            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; users have it
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated")
                return torch.jit.load(io.BytesIO(data), map_location=resolve_device(device)).eval()
        if kind == "onnx":
            from segflow.models.onnx_source import OnnxNetwork, _runtime, providers

            session = _runtime().InferenceSession(data, providers=providers(device))
            return OnnxNetwork(session)
        return _state_dict_network(entry, data, path).to(resolve_device(device))
    except ModelError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelError(
            f"bioimage.io package '{path}': {kind} weights {entry.source} cannot be loaded "
            f"({type(exc).__name__}: {text})"
        ) from None


def _state_dict_network(entry: Any, data: bytes, path: Path) -> torch.nn.Module:
    import importlib

    arch = entry.architecture
    try:
        module = importlib.import_module(str(arch.import_from))
    except ImportError as exc:
        raise ModelError(
            f"bioimage.io package '{path}': architecture module {arch.import_from!r} is not "
            f"installed ({exc})"
        ) from None
    network = getattr(module, str(arch.callable))(**dict(arch.kwargs))
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"bioimage.io package '{path}': {entry.source} cannot be read as tensors only "
            f"({type(exc).__name__})"
        ) from None
    network.load_state_dict(state)
    return network.eval()


def check_tile(descr: Any, card: ModelCard, order: Sequence[str], path: Path) -> None:
    """Refuse a tile the input's sizes do not allow (fixed, or ``min + n * step``)."""
    space = {str(a.id): a.size for a in descr.inputs[0].axes if a.type == "space"}
    for side, axis in zip(card.tile, order, strict=True):
        size = space[axis]
        ok = side == size if isinstance(size, int) else (
            side >= size.min and (side - size.min) % max(size.step, 1) == 0
            if hasattr(size, "step") else True
        )  # fmt: skip
        if not ok:
            allowed = size if isinstance(size, int) else f"{size.min} + n * {size.step}"
            raise ModelError(
                f"bioimage.io package '{path}': `tile` {card.tile} does not fit input axis "
                f"{axis!r}, whose size must be {allowed}"
            )


class BioimageioSource(ModelSource):
    name = "bioimageio"
    description = "bioimage.io model package (folder or .zip with rdf.yaml)"

    def recognises(self, path: Path) -> bool:
        if path.is_dir():
            return any((path / n).is_file() for n in RDF_NAMES) or any(path.glob("*.rdf.yaml"))
        if path.suffix.lower() != ".zip":
            return False
        return True  # a zip without rdf.yaml is refused by describe, in one line

    def describe(self, path: Path) -> SourceCard:
        return derive_card(path)

    def load(self, path: Path, card: ModelCard, *, device: Device) -> LoadedModel:
        descr, package = read_description(path)
        inp, out = descr.inputs[0], descr.outputs[0]
        order = _spatial_order(inp, path)
        check_tile(descr, card, order, path)
        kind = str(card.architecture.params["weights"])
        network = load_network(descr, package, kind, device)
        params = card.architecture.params
        module = BioimageioNetwork(network, _names(inp), _names(out), order,
                                   list(params["pointwise"]), params["complement"])  # fmt: skip
        return LoadedModel(
            module=module.eval(), card=card, hash=self.identity(path, card), path=path,
            source=self.name, input_device="cpu" if kind == "onnx" else None,
        )  # fmt: skip

"""Pipeline configuration: one pydantic model per stage, loaded from YAML.

Config is data, never code: operations are chosen by name from the registry and their
parameters are validated by each operation's own model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from segflow.engine.pipeline import parse_steps
from segflow.errors import ConfigError, collapse_unions, did_you_mean


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MosaicConfig(_Model):
    """``input.mosaic``: how the tiles of a scene make one image."""

    overlap: Literal["first", "last", "mean"] = Field(
        "first",
        description="which tile's pixel a scene takes where tiles overlap: the first in path "
        "order with a value there, the last, or the mean of those with a value",
    )
    nodata: float | None = Field(
        None,
        description="the scene's nodata value (holes and the tiles' own nodata pixels); "
        "default: the nodata value the tiles agree on",
    )
    max_gap_km: float = Field(
        1000.0, gt=0, description="tiles farther than this from the others are refused"
    )
    crs: str | None = Field(
        None,
        description="warp the tiles onto this CRS (EPSG:32632, WKT); default: the tiles' "
        "own, or the CRS of most tiles when they differ",
    )
    resolution: float | tuple[float, float] | None = Field(
        None,
        description="the warped grid's pixel size (x, y or one for both) in the CRS's units; "
        "default: the pixel size of most tiles in the target CRS",
    )
    resampling: Literal["nearest", "bilinear", "cubic", "lanczos"] = Field(
        "nearest", description="how warping resamples (labels exact only with nearest)"
    )
    asset: str | None = Field(
        None,
        description="a STAC catalogue as the path: the asset of each Item that is its tile; "
        "default: the one GeoTIFF asset every Item has",
    )


class InputConfig(_Model):
    path: str = Field(description="a file, folder, glob or fsspec URL")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="reader options, e.g. {level: 1} for an OME-TIFF pyramid level "
        "(`segflow formats` lists each reader's)",
    )
    mosaic: MosaicConfig | None = Field(
        None,
        description="true (or a mapping of overlap, nodata, max_gap_km, crs, resolution, "
        "resampling, asset): every GeoTIFF the path matches (or a GDAL .vrt or a STAC .json "
        "lists) is a tile of ONE item, a scene on the union of their footprints",
    )

    @field_validator("mosaic", mode="before")
    @classmethod
    def _mosaic_switch(cls, value: Any) -> Any:
        """``true`` is the default settings, ``false`` none (one error for a bad mapping,
        not one per form the field takes)."""
        if value is True:
            return {}
        return None if value is False else value

    def reader_options(self) -> dict[str, Any]:
        """What discovery and the readers take: ``options``, with ``mosaic`` when set."""
        if self.mosaic is None:
            return dict(self.options)
        return {**self.options, "mosaic": self.mosaic.model_dump()}


class RetentionConfig(_Model):
    """Which old versions of each item a store keeps (``output.retention``); an item's
    latest version is always kept (:mod:`segflow.store.versions`)."""

    keep_last: int = Field(2, ge=1, description="the newest versions of each item kept")
    keep_days: float = Field(
        7.0, ge=0, description="versions younger than this many days are kept as well"
    )
    keep_tags: bool = Field(True, description="keep the versions a tag reads (segflow tag)")


class OutputConfig(_Model):
    store: str = Field(description="the Zarr store (folder or URL) that receives every item")
    chunks: list[int] | None = Field(None, description="Zarr chunk shape; default: blocks.shape")
    shards: list[int] | None = Field(None, description="Zarr shard shape (a multiple of chunks)")
    regions: bool = Field(
        False,
        description="also write ITEM/regions.parquet: per-object area, box, centroid and "
        "intensity (the pipeline must end in labels)",
    )
    regions_intensity: str | None = Field(
        "input",
        description="what the regions' intensity columns summarise: 'input' (the item), the "
        "name of a `save_as` array, or null for none",
    )
    vectors: bool = Field(
        False,
        description="also write ITEM/vectors.parquet: each object's polygon (holes kept) in "
        "the item's CRS, GeoParquet with the region columns (2-D items; the pipeline must end "
        "in labels)",
    )
    dicom_seg: bool = Field(
        False,
        description="also write ITEM/seg.dcm: the output (and named class maps) as a DICOM "
        "Segmentation referencing the source series, for a PACS or a DICOM viewer (DICOM "
        "items only; the pipeline must end in labels, a mask or classes)",
    )
    overwrite: bool = Field(
        False, description="redo items already done with the same input, config and code"
    )
    allow_other_configs: bool = Field(
        False,
        description="let this config write into a store whose items another config (another "
        "`name`) made; an item both make is replaced by the later run. Default: refused",
    )
    ome: bool = Field(
        True,
        description="also write the OME-Zarr 0.5 view of each item (ITEM/NAME_pyramid: a "
        "multiscale label image napari opens); false: the xarray layout only",
    )
    pyramid: int | None = Field(
        None,
        ge=0,
        description="with `ome`: at most this many pyramid levels beyond full resolution "
        "(null: halve until a level fits one chunk; 0: full resolution only)",
    )
    retention: RetentionConfig = Field(
        default_factory=lambda: RetentionConfig.model_validate({}),
        description="old item versions kept for readers and --as-of; a run prunes those of "
        "the items it committed, `segflow prune STORE` every item's",
    )
    plain_copy: bool = Field(
        True,
        description="object stores: also keep a plain copy of each item's latest version at "
        "STORE/ITEM for readers of plain paths (xarray.open_zarr, napari); false stores it "
        "once and only segflow.open_store reads the items (local stores link, no copy)",
    )
    writers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="output writers other packages register (entry point group "
        "`segflow.writers`), by name, each with its settings: a writer runs when named, "
        "e.g. {histogram: {bins: 32}}",
    )

    @field_validator("chunks", "shards")
    @classmethod
    def _positive_sides(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(v < 1 for v in value)):
            raise ValueError(f"every axis must be >= 1 (got {value})")
        return value

    @field_validator("writers")
    @classmethod
    def _registered_writers(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from segflow.store.writers import writer_settings

        for name, settings in value.items():
            try:
                writer_settings(name, settings)
            except KeyError as error:
                raise ValueError(str(error.args[0])) from None
            except ValidationError as error:
                problems = "; ".join(
                    f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} "
                    f"(got {e.get('input')!r})"
                    for e in error.errors()
                )
                raise ValueError(problems) from None
        return value

    @model_validator(mode="after")
    def _shards_hold_whole_chunks(self) -> OutputConfig:
        if self.shards is None:
            return self
        if self.chunks is None:
            return self  # chunks default to the block shape: checked against it per item
        if len(self.shards) != len(self.chunks) or any(
            s % c for s, c in zip(self.shards, self.chunks, strict=True)
        ):
            raise ValueError(
                f"`shards` {self.shards} must be a multiple of `chunks` {self.chunks} on every axis"
            )
        return self


class BlocksConfig(_Model):
    shape: list[int] | int | None = Field(
        None, description="core block shape over (z), y, x; default 2048^2 in 2D, 256^3 in 3D"
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, value: list[int] | int | None) -> list[int] | int | None:
        if value is None:
            return None
        values = [value] if isinstance(value, int) else value
        if not values or any(v < 1 for v in values):
            raise ValueError(f"every axis must be >= 1 (got {value})")
        return value


class ClusterConfig(_Model):
    address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://host:8786")
    n_workers: int | None = Field(
        None,
        ge=1,
        description="local workers; default: the usable cores, shared with the other segflow "
        "local clusters running on the machine",
    )
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="per local worker, e.g. '4GiB'")
    gpu_workers: int | None = Field(
        None,
        ge=0,
        description="local workers that each own one GPU (they advertise GPU=1, so model "
        "steps run one at a time per GPU); default: one per visible CUDA device",
    )


class RunConfig(_Model):
    batch: int | None = Field(
        None,
        ge=1,
        description="items per task run; default: 1 below 100 items, else about 16 Mpx of "
        "input per task run (at most 64 items)",
    )
    item_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds an item may run; one still running then fails (its blocks are "
        "cancelled) and the run goes on; default: no limit",
    )
    queue_timeout: float | None = Field(
        12 * 3600.0,
        gt=0,
        description="seconds a run may wait for its store while another run writes it "
        "(runs on one store take turns); a run still waiting then ends Failed with one line "
        "and writes nothing; null: wait as long as it takes; default 12 hours",
    )
    # A 100,000^2 RGB orthomosaic (28 GiB) or a 2,048^3 uint8 EM volume (8 GiB) fit; a
    # larger item is segmented once the user raises the limit.
    max_item_bytes: int = Field(
        64 * 2**30,
        gt=0,
        description="the largest item to segment, in bytes of decoded input (channels "
        "included), e.g. 2TiB; a larger one (or a header that claims so) fails alone before "
        "it is read; default 64 GiB",
    )

    # Pictures, not results (``run`` is outside the config hash): the first items a run
    # submits get STORE/ITEM/quicklook.png, linked from a small artifact of their task run.
    quicklooks: int = Field(
        10,
        ge=0,
        le=100,  # about 400 bytes of Prefect's database each: a run's stay well under 100 KB
        description="items of a run (the first submitted) that get a quick look, a PNG beside "
        "the item in the store (ITEM/quicklook.png) linked from a small artifact of their "
        "task run; 0 for none; default 10",
    )
    quicklook_size: int = Field(
        256,
        ge=16,
        le=4096,
        description="pixels of a quick look's longer side (the item's image thinned to it, "
        "with the output's outline); default 256",
    )

    @field_validator("max_item_bytes", mode="before")
    @classmethod
    def _parse_bytes(cls, value: Any) -> Any:
        if isinstance(value, str):
            from dask.utils import parse_bytes

            try:
                return parse_bytes(value)
            except ValueError:
                raise ValueError(f"expected a byte count such as 512GiB (got {value!r})") from None
        return value


class SegflowConfig(_Model):
    """The whole pipeline configuration (see ``configs/`` for examples)."""

    name: str = "segment"
    input: InputConfig
    output: OutputConfig
    blocks: BlocksConfig = Field(default_factory=lambda: BlocksConfig(shape=None))
    pipeline: list[dict[str, Any]]
    cluster: ClusterConfig = Field(default_factory=lambda: ClusterConfig.model_validate({}))
    run: RunConfig = Field(default_factory=lambda: RunConfig.model_validate({}))
    # What loading derived from the overrides (see fit_blocks_to_chunks); not hashed.
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """One line per setting that loading derived (``--set blocks.shape`` alone that did
        not fit the file's ``output.chunks`` changes the chunks too), to show the user."""
        return list(self._notes)

    def config_hash(self) -> str:
        """The identity of what this config writes: 16 hex digits of SHA-256 over
        :meth:`result_settings` (every setting but those in :data:`HASH_OPT_OUT`, and the
        content hash of every model the pipeline runs: a retrained checkpoint at the same
        path redoes the items, an unchanged one lets them be skipped).

        Derived, not listed: a field added to any section is part of the hash unless it is
        opted out, so no setting can change a stored byte while a rerun skips the item.
        """
        text = json.dumps(self.result_settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def result_settings(self) -> dict[str, Any]:
        """Every setting that can change a stored byte, as plain JSON data: the config less
        :data:`HASH_OPT_OUT`, pipeline steps with their parameters' defaults filled in (so
        ``sigma: 2`` and ``sigma: 2.0`` are one setting), and ``models``, the pipeline's
        models' content hash (when it runs any).

        Examples
        --------
        >>> data = {"input": {"path": "in"}, "output": {"store": "o.zarr"}}
        >>> config = parse_config({**data, "pipeline": [{"op": "otsu"}]})
        >>> sorted(config.result_settings())
        ['blocks', 'input', 'output', 'pipeline']
        >>> sorted(config.result_settings()["output"])  # doctest: +NORMALIZE_WHITESPACE
        ['chunks', 'dicom_seg', 'ome', 'pyramid', 'regions', 'regions_intensity', 'shards',
         'vectors']
        """
        settings = self.model_dump(mode="json")
        for dotted in HASH_OPT_OUT:
            *parents, last = dotted.split(".")
            section = settings
            for parent in parents:
                section = section[parent]
            del section[last]
        if settings["input"].get("mosaic") is None:
            del settings["input"]["mosaic"]  # no scene: the hash configs had before scenes
        elif settings["input"]["mosaic"]["asset"] is None:
            del settings["input"]["mosaic"]["asset"]  # the hash scenes had before STAC
        settings["pipeline"] = [_step_settings(step) for step in self.pipeline]
        settings["output"]["writers"] = _writers_settings(self.output.writers)
        if not settings["output"]["writers"]:
            del settings["output"]["writers"]  # no writer named: the hash stores had before
        models = self.model_hash()
        if models:
            settings["models"] = models
        boxes = boxes_files_hash(self.pipeline)
        if boxes:  # new boxes in the same file redo the items
            settings["boxes"] = boxes
        return settings

    def model_hash(self) -> str:
        """The content hash of the pipeline's models (``""`` without a ``model`` step)."""
        from segflow.ops.model import model_paths, models_hash

        return models_hash(model_paths(self.pipeline))


def boxes_files_hash(pipeline: Sequence[Any]) -> str:
    """One content hash of the boxes files of the pipeline's ``from_boxes`` steps (``""``
    without any)."""
    from segflow.io.boxes import file_hash

    paths = [
        str(step["boxes"])
        for step in pipeline
        if isinstance(step, Mapping)
        and step.get("op") == "from_boxes"
        and isinstance(step.get("boxes"), str)
    ]
    if not paths:
        return ""
    return hashlib.sha256("".join(file_hash(p) for p in paths).encode()).hexdigest()[:16]


# Settings that cannot change a stored byte, and why; every other setting of the config, in
# every section and every field added later, is part of a result's identity (config_hash).
HASH_OPT_OUT: dict[str, str] = {
    "name": "names the config; the store records it beside each item to refuse another config",
    "input.path": "where the files are; an item is its source file and that file's fingerprint",
    "output.store": "where the results go, not what they hold",
    "output.overwrite": "whether done items are redone, not what is written",
    "output.allow_other_configs": "whether another config may share the store, not its bytes",
    "output.retention": "how long old versions are kept, not what a version holds",
    "output.plain_copy": "whether an object store also copies the latest version to STORE/ITEM"
    " for plain readers; the versions hold the same bytes (a run applies a change to all)",
    "cluster": "where blocks run; a block's result is the same on any worker",
    "run": "how items are batched, how long they may run or wait, not what they give",
}


def _writers_settings(writers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each named writer's share of the hash: its settings with defaults filled in, less
    the ones it opts out (:func:`segflow.store.writers.hashed_settings`)."""
    from segflow.store.writers import hashed_settings

    return {name: hashed_settings(name, values) for name, values in sorted(writers.items())}


def _step_settings(step: Mapping[str, Any]) -> dict[str, Any]:
    """A raw pipeline step with its operation's defaults filled in and its values in their
    validated types (``{"op": "gaussian", "sigma": 2}`` and ``sigma: 2.0`` are one step)."""
    from segflow.ops.registry import get_operation

    data = dict(step)
    name, save_as = data.pop("op"), data.pop("save_as", None)
    params = get_operation(str(name), public=True).params.model_validate(data)
    values = params.model_dump(mode="json")
    for key, field in type(params).model_fields.items():
        extra = field.json_schema_extra
        default = field.get_default(call_default_factory=True)
        if isinstance(extra, dict) and extra.get("hash_when_set") and values.get(key) == default:
            del values[key]  # a parameter added later, at its default: the hash before it
    return {"op": name, "save_as": save_as, **values}


#: The parameter of each step that names a file, relative to the config file when relative.
STEP_FILES = {"model": "path", "from_boxes": "boxes"}


def _resolve_step_file(step: Any, base_dir: Path) -> Any:
    """A raw step with its file (a model, a boxes file) taken relative to ``base_dir``."""
    if not isinstance(step, Mapping) or step.get("op") not in STEP_FILES:
        return step
    key = STEP_FILES[str(step["op"])]
    if not isinstance(step.get(key), str):
        return step  # absent (a problem named later) or inline boxes
    return {**step, key: _resolve(str(step[key]), base_dir)}


def parse_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> SegflowConfig:
    """Validate a config mapping; relative paths are taken relative to ``base_dir``.

    Raises
    ------
    ConfigError
        One line per problem: the key path, what is wrong and the value received.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"config: expected a mapping of keys, got {type(data).__name__}"])
    problems: list[str] = []
    if base_dir is not None and isinstance(data.get("pipeline"), list):
        # A model's path is relative to the config file, like the input and the store.
        data = {
            **data,
            "pipeline": [_resolve_step_file(step, base_dir) for step in data["pipeline"]],
        }
    try:
        config = SegflowConfig.model_validate(dict(data))
    except ValidationError as error:
        problems += _describe(error)
    pipeline = data.get("pipeline")
    untrained: list[str] = []
    if isinstance(pipeline, list):
        try:
            parse_steps(pipeline)  # names pipeline[i].key, the value and what is expected
        except ConfigError as error:
            problems += error.problems
            untrained += error.untrained
    if problems:
        raise ConfigError(problems, untrained=untrained)
    if base_dir is not None:
        config = config.model_copy(
            update={
                "input": config.input.model_copy(
                    update={"path": _resolve(config.input.path, base_dir)}
                ),
                "output": config.output.model_copy(
                    update={"store": _resolve(config.output.store, base_dir)}
                ),
            }
        )
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SegflowConfig:
    """Load a YAML config, apply ``key.path=value`` overrides, validate.

    Relative ``input.path`` and ``output.store`` in the file are resolved against the config
    file's folder; given as overrides, against the current directory (where the user typed
    them). Override values are parsed as YAML scalars (``blocks.shape=[512,512]`` works).

    Examples
    --------
    >>> config = load_config("configs/nuclei.yaml", ["blocks.shape=128"])  # doctest: +SKIP
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError([f"config {str(path)!r}: cannot read it ({error.strerror})"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"config {str(path)!r}: not valid YAML ({error})"]) from None
    overrides = [_absolute_path_override(o) for o in overrides]
    data = apply_overrides(data if data is not None else {}, overrides)
    data, notes = fit_blocks_to_chunks(data, {o.partition("=")[0].strip() for o in overrides})
    try:
        config = parse_config(data, base_dir=path.resolve().parent)
    except ConfigError as error:
        raise ConfigError(
            [_name_override(p, overrides) for p in error.problems],
            untrained=[_name_override(p, overrides) for p in error.untrained],
        ) from None
    config._notes = notes
    return config


def _name_override(problem: str, overrides: Sequence[str]) -> str:
    """``problem`` prefixed with the ``--set KEY=VALUE`` that gave the value it names.

    Examples
    --------
    >>> _name_override("pipeline[2].sigma: must be >= 0 (got -1)", ["pipeline.2.sigma=-1"])
    '--set pipeline.2.sigma=-1: pipeline[2].sigma: must be >= 0 (got -1)'
    >>> _name_override("output.store: required key is missing", ["blocks.shape=64"])
    'output.store: required key is missing'
    """
    located = re.match(r"[A-Za-z_][\w.\[\]]*", problem)
    if located is None:
        return problem
    where = re.sub(r"\[(\d+)\]", r".\1", located.group()).rstrip(".")
    for override in overrides:
        key = override.partition("=")[0].strip()
        if where == key or where.startswith(f"{key}.") or key.startswith(f"{where}."):
            return f"--set {override}: {problem}"
    return problem


def fit_blocks_to_chunks(
    data: dict[str, Any], overridden: Collection[str]
) -> tuple[dict[str, Any], list[str]]:
    """Derive ``output.chunks`` or ``blocks.shape`` when an override set only the other and
    it no longer fits: every block must cover whole chunks.

    ``--set blocks.shape=B`` alone, over file chunks that do not divide ``B``: the chunks
    become ``B``. ``--set output.chunks=C`` alone, under file blocks that are no multiple of
    ``C``: the blocks become the smallest multiple of ``C`` holding the file's blocks.
    Returns the data and one note per derived setting. Nothing is derived with shards, when
    both or neither are overridden, or when the two already fit (a misfit left is reported
    per item, naming the ``--set`` that fixes it).

    Examples
    --------
    >>> data = {"blocks": {"shape": [128, 128]}, "output": {"chunks": [256, 256]}}
    >>> fitted, notes = fit_blocks_to_chunks(data, {"blocks.shape"})
    >>> fitted["output"]["chunks"]
    [128, 128]
    >>> fit_blocks_to_chunks(data, {"output.chunks"})[0]["blocks"]["shape"]
    [256, 256]
    """
    blocks_set, chunks_set = "blocks.shape" in overridden, "output.chunks" in overridden
    blocks: Any = (data.get("blocks") or {}).get("shape")
    output = data.get("output") or {}
    chunks: Any = output.get("chunks")
    if blocks_set == chunks_set or output.get("shards") is not None:
        return data, []
    if not (_is_shape(chunks) and (_is_shape(blocks) or _is_side(blocks))):
        return data, []  # invalid or default: validation or planning reports it
    blocks = [blocks] * len(chunks) if isinstance(blocks, int) else blocks
    if len(blocks) != len(chunks) or all(b % c == 0 for b, c in zip(blocks, chunks, strict=True)):
        return data, []
    if blocks_set:
        note = (
            f"output.chunks {chunks} (from the file) do not divide --set blocks.shape "
            f"{blocks}: using output.chunks={blocks}"
        )
        return {**data, "output": {**output, "chunks": list(blocks)}}, [note]
    fitted = [-(-b // c) * c for b, c in zip(blocks, chunks, strict=True)]
    note = (
        f"blocks.shape {blocks} (from the file) is no multiple of --set output.chunks "
        f"{chunks}: using blocks.shape={fitted}"
    )
    return {**data, "blocks": {**(data.get("blocks") or {}), "shape": fitted}}, [note]


def _is_side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_side(v) for v in value)


PATH_KEYS = ("input.path", "output.store")


def _absolute_path_override(override: str) -> str:
    """``output.store=out.zarr`` typed in ``/home/me`` means ``/home/me/out.zarr``."""
    key, sep, raw = override.partition("=")
    if not sep or key.strip() not in PATH_KEYS or not raw.strip():
        return override
    return f"{key}={_resolve(raw.strip(), Path.cwd())}"


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied."""
    result: Any = json.loads(json.dumps(data, default=str))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {override!r}: expected KEY=VALUE, e.g. blocks.shape=512"])
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            index = _index(node, last, key)
            node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError([f"--set {key}: {'.'.join(parts[:-1])} is not a mapping or list"])
    return dict(result)


def _child(node: Any, part: str, where: str, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError([f"--set {where}: cannot descend into a {type(node).__name__}"])
    if part not in node and create:
        node[part] = {}
    return node[part]


def _index(node: list[Any], part: str, where: str) -> int:
    try:
        index = int(part)
        node[index]
    except (ValueError, IndexError):
        raise ConfigError(
            [f"--set {where}: {part!r} is not an index of a list of {len(node)} items"]
        ) from None
    return index


def _describe(error: ValidationError) -> list[str]:
    lines = []
    for problem in collapse_unions(error.errors()):
        where = ".".join(str(p) for p in problem["loc"]) or "config"
        if problem["type"] == "union":  # one line for a value that fits no member
            lines.append(f"{where} {problem['msg']} (got {problem.get('input')!r})")
        elif problem["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; {_known_keys_hint(problem['loc'])}")
        else:
            message = str(problem["msg"]).removeprefix("Value error, ")
            got = f" (got {problem.get('input')!r})" if "(got" not in message else ""
            lines.append(f"{where}: {message}{got}")
    return lines


def _known_keys_hint(loc: tuple[int | str, ...]) -> str:
    """The closest keys of the section that ``loc`` names, or all of them (a few)."""
    model: Any = SegflowConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return "not a key of the config"
    known = list(model.model_fields)
    return did_you_mean(str(loc[-1]), known) or f"expected one of: {', '.join(known)}"


def _resolve(path: str, base_dir: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())

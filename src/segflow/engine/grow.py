"""A growing scene: a rerun over a scene whose tiles changed recomputes only the blocks
that read new, changed or removed tiles.

Design (issue 25). A scene's fingerprint digests its tiles, so a tile that comes, changes
or goes makes the scene's next run redo it. Before that run plans its blocks,
:func:`plan_growth` compares the scene with the item's committed version (the one
``STORE/ITEM`` links to): when that version was made by the same config, code and models,
on the same grid (same transform, so the same origin; the grid may have grown on its far
side, down or right, and tiles may have filled holes), a block is *untouched* when it
existed before with the same core and the same haloed window, and that window meets no
tile that is new, changed or gone. Its output is a function of that window alone (the
pipeline has only pointwise and local steps before its labels), so the stored output is
its output again.

The run is the item's ordinary run into staging, with one difference: an untouched block
takes the previous version's output for its core as its source and runs none of the
pipeline's steps (:class:`StoredOutput`); the others read the scene and run every step.
For a pipeline that ends in ``label``, every block is labelled again (the untouched ones
label their stored objects' pixels, the same mask the label step saw), the faces are
stitched over the whole scene as in a fresh run, and the objects are numbered by
:mod:`segflow.stitch.keep_ids`: each keeps the id its pixels had, new objects get ids after
the previous largest. So the partition is a fresh run's, untouched objects keep their ids,
and every block is written again into the new version (a table lookup per block, no
pipeline step): the commit, the checks, the region and vector tables, the pyramid and the
resume records are an item's, and until the commit ``STORE/ITEM`` is the previous version.

Anything else redoes every block, with one line saying why (:func:`plan_growth`): a
whole-scene statistic (Otsu over the scene changes with its tiles), a grid whose origin,
pixel size or CRS moved, a warped scene, a grid that grew under a step that depends on the
scene's size (a model's tiles end flush with its edge: :data:`SIZE_BOUND_STEPS`), other
connectivity steps, ``save_as`` arrays, an object store (its items are written in place).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow.engine.blocks import Block, BlockGrid, Box, intersect, plan_blocks, relative
from segflow.io.base import ItemInfo

#: The connectivity step a growing scene can stitch again from its stored objects.
REGROWN_CONNECTIVITY = "label"
#: Steps whose output depends on the scene's size, not only on a block's window: a model's
#: tiles end flush with the edge; Cellpose flows name masks by flat index and size them
#: against the item; boxes are placed on the whole item. A grid that grew redoes them.
SIZE_BOUND_STEPS = {
    "_model_infer": "a model step's tiles end flush with its edge",
    "flow_dynamics": "flow_dynamics names its masks by their place in the whole scene",
    "_flow_check": "flow_dynamics measures its masks against the scene's size",
    "from_boxes": "from_boxes places its boxes on the whole scene",
}


@dataclass(frozen=True)
class Growth:
    """How a growing scene reuses its previous version (see the module note)."""

    version: str  # the previous version's name (resume records are keyed by it)
    stored: StoredOutput  # its output array, read by untouched blocks
    untouched: frozenset[int]  # linear numbers (on the new grid) of the reused blocks
    max_label: int  # the largest id the previous version gave (labels), else 0

    def is_untouched(self, block: Block) -> bool:
        return block.linear in self.untouched


class StoredOutput:
    """Windowed reads of an item version's output array, channels first like a reader's
    (``(1, *window)`` for labels); picklable (a path, an array name, the array's shape)."""

    def __init__(self, group: str, name: str, shape: tuple[int, ...]) -> None:
        self.group, self.name, self.shape = group, name, tuple(shape)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_array"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def read(self, region: Box) -> np.ndarray:
        """``region`` of the stored array (it must lie inside it)."""
        import zarr

        array: Any = self.__dict__.get("_array")
        if array is None:
            array = self.__dict__["_array"] = zarr.open_array(self.group, path=self.name, mode="r")
        data = np.asarray(array[(Ellipsis, *region)])
        return data if data.ndim > len(region) else data[np.newaxis]

    def old_ids(self, labels: np.ndarray, box: Box, stored: np.ndarray | None = None) -> np.ndarray:
        """For each local label ``0..n`` of ``labels`` (covering ``box`` of the new grid),
        the smallest id its pixels had here (0: none): what it claims
        (:mod:`segflow.stitch.keep_ids`). ``stored``: the stored ids of ``box`` that
        ``labels`` labelled (a reused block): each label has one of them, read off once."""
        n = int(labels.max(initial=0))
        if stored is not None:  # labels of the stored ids' pixels: one id per label
            claims = np.zeros(n + 1, dtype=np.int64)
            claims[labels.ravel()] = stored.ravel()
            claims[0] = 0
            return claims
        claims = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
        inside = intersect(box, tuple(slice(0, s) for s in self.shape[-len(box) :]))
        if all(s.stop > s.start for s in inside):
            old = self.read(inside)[0].astype(np.int64)
            local = labels[relative(inside, box)]
            both = (old > 0) & (local > 0)
            np.minimum.at(claims, local[both], old[both])
        claims[claims == np.iinfo(np.int64).max] = 0
        claims[0] = 0
        return claims

    def __repr__(self) -> str:
        return f"StoredOutput({self.group!r}, {self.name!r})"


def plan_growth(
    store: str,
    info: ItemInfo,
    plan: Any,
    *,
    block_shape: Sequence[int],
    storage_unit: Sequence[int] | None,
    record: Mapping[str, Any],
) -> tuple[Growth | None, str | None]:
    """Whether the scene ``info`` grows from its committed version (``record``, its commit
    record, made by the same config, code and models on other tiles), and if not, the one
    line that says why every block is redone (None when there is nothing to grow from).

    Returns ``(growth, None)`` or ``(None, line)``.
    """
    from segflow.store.lock import is_local
    from segflow.store.versions import current_version, resolve_item

    old_tiles = _old_attrs(store, info.id)
    new_tiles = info.attrs.get("tiles")
    if old_tiles is None or not isinstance(new_tiles, list):
        return None, None
    attrs, tiles = old_tiles
    changed = _changed_windows(tiles, new_tiles)
    head = (
        f"scene '{info.id}': {len(changed)} tile(s) new, changed or gone since its last "
        "version; every block redone"
    )
    why = _why_not(store, info, plan, attrs, is_local(store))
    output = _stored_output(store, info.id, plan, attrs)
    if why is None and output is None:
        why = "its last version has no output array of this pipeline's kind"
    if why is not None:
        return None, f"{head}: {why}"
    assert output is not None
    grid = plan_blocks(info.spatial_shape, block_shape, halo=plan.halo, storage_unit=storage_unit)
    old_shape = output.shape[-len(info.spatial_shape) :]
    old = plan_blocks(old_shape, block_shape, halo=plan.halo, storage_unit=storage_unit)
    bound = [SIZE_BOUND_STEPS[s.op.name] for s in plan.steps if s.op.name in SIZE_BOUND_STEPS]
    if old_shape != info.spatial_shape and bound:
        return None, f"{head}: the scene's grid grew and {bound[0]}"
    untouched = frozenset(b.linear for b in grid.blocks() if _untouched(b, old, changed))
    version = current_version(store, info.id) or resolve_item(store, info.id)
    max_label = int(record.get("max_label") or record.get("object_count") or 0)
    return Growth(version, output, untouched, max_label), None


def growth_for(
    store: str,
    info: ItemInfo,
    plan: Any,
    *,
    block_shape: Sequence[int],
    storage_unit: Sequence[int] | None,
    made_by: Mapping[str, str],
) -> tuple[Growth | None, str | None]:
    """:func:`plan_growth` where the item's committed version is a scene made by the same
    ``made_by`` (``config_hash``, ``code_version``, ``model_hash``) from other tiles; else
    ``(None, None)``: the item runs as any item (a new config redoes it, unsaid)."""
    from segflow.store.commit import read_commit

    if not isinstance(info.attrs.get("tiles"), list):
        return None, None
    try:
        record = read_commit(store, info.id)
    except Exception:  # a newer item's record: its own check refuses it before any write
        return None, None
    if record is None or record.get("fingerprint") == info.fingerprint:
        return None, None
    if any(record.get(key) != value for key, value in made_by.items()):
        return None, None
    return plan_growth(
        store, info, plan, block_shape=block_shape, storage_unit=storage_unit, record=record
    )


def _old_attrs(store: str, item_id: str) -> tuple[dict[str, Any], list[Any]] | None:
    """The committed version's group attributes and its tiles (None: not a scene)."""
    import zarr

    from segflow.store.versions import resolve_item

    try:
        attrs = dict(zarr.open_group(resolve_item(store, item_id), mode="r").attrs)
    except Exception:  # no group, or not readable: nothing to grow from
        return None
    tiles = attrs.get("tiles")
    return (attrs, tiles) if isinstance(tiles, list) else None


def _changed_windows(old: Sequence[Any], new: Sequence[Any]) -> list[tuple[int, ...]]:
    """The footprints (first row, first column, rows, columns) of the tiles that came,
    changed (fingerprint, place or size) or went."""

    def keyed(tiles: Sequence[Any]) -> set[tuple[Any, ...]]:
        return {(t["path"], t["fingerprint"], *(int(w) for w in t["window"])) for t in tiles}

    before, after = keyed(old), keyed(new)
    return sorted(tuple(t[2:]) for t in before ^ after)


def _why_not(
    store: str, info: ItemInfo, plan: Any, attrs: Mapping[str, Any], local: bool
) -> str | None:
    """Why the scene cannot grow from its last version (None: it can)."""
    statistic = next((p.statistic_step for p in plan.phases if p.statistic_step), None)
    if statistic is not None:
        return (
            f"its pipeline takes a whole-scene statistic ({statistic.key}), which the new "
            "tiles change"
        )
    if not local:
        return "growing needs a local store (an object store's item is written in place)"
    if "mosaic_grid" in info.attrs or "mosaic_grid" in attrs:
        return "a warped scene's grid is drawn again from its tiles"
    old_transform = attrs.get("transform")
    new_transform = list(info.transform or ())
    moved = old_transform is None or [float(v) for v in old_transform] != new_transform
    if moved or attrs.get("crs") != info.crs_wkt:
        return (
            "its grid moved (tiles added above or left of it move the origin; another "
            "pixel size or CRS)"
        )
    old_shape = tuple(attrs.get("source_shape") or ())
    if len(old_shape) != len(info.shape) or any(
        a > b for a, b in zip(old_shape[1:], info.shape[1:], strict=True)
    ):
        return "it shrank (tiles gone from its edge)"
    if old_shape[0] != info.shape[0] or attrs.get("source_dtype") != info.dtype:
        return "its bands or dtype changed"
    if not _same_number(attrs.get("nodata"), info.nodata):
        return "its nodata value changed"
    return _why_not_pipeline(plan)


def _why_not_pipeline(plan: Any) -> str | None:
    if plan.saved:
        return "its pipeline saves intermediate arrays (save_as)"
    phases = plan.phases
    if len(phases) == 1 and plan.out_kind != "labels":
        return None
    first = phases[0]
    step = first.connectivity
    if (
        len(phases) != 2
        or step is None
        or step.op.name != REGROWN_CONNECTIVITY
        or getattr(step.params, "classes", False)
        or phases[1].steps
    ):
        return (
            "growing is built for pipelines of pointwise and local steps, ending in `label` "
            "or not labelling at all"
        )
    return None


def _same_number(old: Any, new: float | None) -> bool:
    if old is None or new is None:
        return old is None and new is None
    if old == "NaN":
        return bool(np.isnan(new))
    return float(old) == float(new)


def _stored_output(
    store: str, item_id: str, plan: Any, attrs: Mapping[str, Any]
) -> StoredOutput | None:
    import zarr

    from segflow.store.versions import resolve_item

    group = resolve_item(store, item_id)
    try:
        array = zarr.open_array(group, path=plan.out_kind, mode="r")
    except Exception:
        return None
    return StoredOutput(group, plan.out_kind, tuple(array.shape))


def _untouched(block: Block, old: BlockGrid, changed: Sequence[tuple[int, ...]]) -> bool:
    """Whether ``block`` reads the same window as before and no changed tile meets it."""
    if not old.contains(block.index):
        return False
    before = old.block(block.index)
    if before.core != block.core or before.outer != block.outer:
        return False
    rows, cols = block.outer[-2], block.outer[-1]
    return not any(
        r < rows.stop and r + h > rows.start and c < cols.stop and c + w > cols.start
        for r, c, h, w in changed
    )

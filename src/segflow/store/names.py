"""The names a store keeps for itself at its root, where item groups live too.

Item groups sit at ``STORE/ITEM_ID`` beside the store's own files: its Zarr metadata
(``zarr.json``), the collection index (``index.parquet``), the collection's vector table
(``vectors.parquet``), the evaluation table (``evaluation.parquet``), the catalogue
(``catalogue.parquet``), its STAC Collection (``stac``) and its bookkeeping folder
(``.segflow``). An item named like one
of them would take its place and break the store for every later run, so item ids never
take a reserved name (:func:`is_reserved_name`, consulted by
:func:`segflow.io.assign_item_ids`), and a store where an item group already sits on one
is refused with what to do (:func:`check_reserved_names`).

A writer that puts a file of its own at the store's root registers its name with
:func:`reserve_name` when its module is imported.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

from segflow.errors import StoreError
from segflow.store.fs import fresh_fs

ZARR_JSON = "zarr.json"
INDEX_NAME = "index.parquet"
VECTORS_NAME = "vectors.parquet"  # STORE/vectors.parquet (and STORE/ITEM/vectors.parquet)
EVALUATION_NAME = "evaluation.parquet"
CATALOGUE_NAME = "catalogue.parquet"  # a dataset directory: one part file per hash bucket
SEGFLOW_DIR = ".segflow"  # segflow's bookkeeping inside a store: lock, records, staging
STAC_DIR = "stac"  # the STAC Collection of a georeferenced store (segflow.store.stac)

_DATASETS = {CATALOGUE_NAME, INDEX_NAME, VECTORS_NAME, STAC_DIR}  # folders by design
# name -> what a store keeps there: "where a store keeps ROLE" (in notes and messages)
_RESERVED: dict[str, str] = {
    ZARR_JSON: "its Zarr metadata",
    INDEX_NAME: "its collection index",
    VECTORS_NAME: "its collection vector table",
    EVALUATION_NAME: "its evaluation table",
    CATALOGUE_NAME: "its collection catalogue",
    STAC_DIR: "its STAC collection",
    SEGFLOW_DIR: "its bookkeeping folder",
}


def reserve_name(name: str, role: str) -> None:
    """Keep ``name`` at the store's root for a writer's own file (``role`` says what it is);
    item ids never take it from then on.

    Examples
    --------
    >>> reserve_name("evaluation.parquet", "its evaluation table")
    >>> is_reserved_name("Evaluation.parquet")
    True
    """
    if not name or "/" in name:
        raise ValueError(f"a reserved store name must be one path component, got {name!r}")
    _RESERVED[name] = role


def reserved_names() -> dict[str, str]:
    """Every reserved root name and what the store keeps there."""
    return dict(_RESERVED)


def _fold(name: str) -> str:
    # Case folded: on a case-insensitive filesystem (macOS, Windows) ``Index.parquet`` is
    # the same entry as ``index.parquet``.
    return unicodedata.normalize("NFC", name).casefold()


def reserved_role(name: str) -> str | None:
    """What the store keeps at ``name``, if ``name`` is reserved: one of the reserved names,
    in any case, or one followed by ``.`` and more (``zarr.json.segflow-tmp``, where the
    store writes a file before renaming it into place); None otherwise.

    Examples
    --------
    >>> reserved_role("index.parquet"), reserved_role("index_parquet")
    ('its collection index', None)
    """
    folded = _fold(name)
    for key, prefixes, role in _folded(tuple(_RESERVED.items())):
        if folded == key or folded.startswith(prefixes):
            return role
    return None


def reserved_mask(names: Any) -> Any:
    """:func:`is_reserved_name` of each text of the Arrow array ``names`` (nulls: False),
    as a numpy boolean array: ASCII names on columns (their fold is their lower case),
    the others one by one (a million ids in well under a second).

    Examples
    --------
    >>> import pyarrow as pa
    >>> reserved_mask(pa.array(["tile", "Index.Parquet", "zarr.json.x", None])).tolist()
    [False, True, True, False]
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lower = pc.utf8_lower(names)
    hit = pa.array(np.zeros(len(names), dtype=bool))
    for key, prefixes, _ in _folded(tuple(_RESERVED.items())):
        hit = pc.or_(hit, pc.equal(lower, key))
        for prefix in prefixes:
            hit = pc.or_(hit, pc.starts_with(lower, prefix))
    ascii_ = pc.fill_null(pc.string_is_ascii(names), True)  # null: no name, not reserved
    mask = np.array(pc.and_(ascii_, pc.fill_null(hit, False)), dtype=bool)
    other = np.flatnonzero(~np.array(ascii_, dtype=bool))
    for k in other:
        mask[k] = is_reserved_name(names[int(k)].as_py())
    return mask


@functools.lru_cache(maxsize=8)
def _folded(reserved: tuple[tuple[str, str], ...]) -> list[tuple[str, tuple[str, str], str]]:
    """Each reserved name folded, with its prefixes (computed once per set of names: every
    discovered item's id is checked)."""
    out = []
    for name, role in reserved:
        key = _fold(name)
        out.append((key, (f"{key}.", f".{key}."), role))
    return out


def is_reserved_name(name: str) -> bool:
    """Whether an item group named ``name`` would sit where the store keeps its own files."""
    return reserved_role(name) is not None


def unreserved_id(item_id: str) -> str:
    """``item_id`` itself, or for a reserved name the same with every ``.`` made ``_``
    (``index.parquet`` -> ``index_parquet``, ``.segflow`` -> ``_segflow``), then ``_``
    appended while still reserved: the same answer every run.

    Examples
    --------
    >>> unreserved_id("zarr.json"), unreserved_id("Vectors.Parquet"), unreserved_id("tile")
    ('zarr_json', 'Vectors_Parquet', 'tile')
    """
    if not is_reserved_name(item_id):
        return item_id
    safe = item_id.replace(".", "_")
    while is_reserved_name(safe):
        safe += "_"
    return safe


def check_reserved_names(store: str) -> None:
    """Refuse a store where a folder (an item group an earlier segflow wrote for an image
    named like the store's own files) sits where the store keeps a file of its own.

    Raises
    ------
    StoreError
        Naming the store, the folder and what to do.
    """
    fs, root = fresh_fs(str(store))
    for name, role in _RESERVED.items():
        if name == SEGFLOW_DIR:
            continue  # a folder by design
        path = f"{root.rstrip('/')}/{name}"
        # The index, the catalogue, the vectors and the STAC view are folders by design:
        # an item group there is one with Zarr metadata.
        if fs.isdir(path) and (name not in _DATASETS or fs.exists(f"{path}/{ZARR_JSON}")):
            shown = f"{str(store).rstrip('/')}/{name}"
            raise StoreError(
                f"output.store '{store}': '{shown}' is a folder (an item group of an image "
                f"named '{name}', from a segflow that did not reserve the name) where the "
                f"store keeps {role}: move that folder out of the store, and the next run "
                f"segments the image again as '{unreserved_id(name)}'"
            )

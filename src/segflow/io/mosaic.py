"""A scene: every georeferenced tile an input matches, read as one item on one grid.

Asked for with ``input.mosaic: true`` (or a mapping of :class:`MosaicSettings`). The
scene's grid is the union of the tiles' footprints on their common CRS and resolution;
its shape is the bounding box of the tiles, and a window of it is read through an index
of the tiles' footprints (interval arrays, queried per window): only the tiles a window
touches are read, each through its own windowed GeoTIFF read, and nothing is copied into
one raster. The engine sees one item, so blocks cross tile borders like any other,
statistics are over the scene and labels are stitched across it.

Where tiles overlap, ``overlap`` decides: ``first`` (the first tile in path order with a
value there), ``last``, or ``mean`` (of the tiles with a value there; integers rounded
half to even). A tile's nodata pixels never win. Pixels no tile covers (holes) are the
scene's nodata: ``nodata`` when given, else the nodata value the tiles agree on; a scene
with holes and neither is refused, never zero-filled.

Tiles must share band count and dtype. Tiles of one CRS and pixel size must lie on one
pixel grid and are read as they are; tiles of several CRSs or pixel sizes (or a given
``crs`` or ``resolution``) are warped onto one grid (:mod:`segflow.io.warp_mosaic`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segflow.errors import ItemReadError
from segflow.io._common import check_region
from segflow.io.base import ItemInfo, Reader

Overlap = Literal["first", "last", "mean"]
Resampling = Literal["nearest", "bilinear", "cubic", "lanczos"]
# Offsets of a tile from the scene grid smaller than this (in pixels) are rounding in the
# georeferencing (float64 corner coordinates), not a misaligned tile.
GRID_TOLERANCE = 1e-3
# Tiles whose files a thread keeps open at once (the ones it read last): a scene of
# thousands of tiles must not hold a file handle per tile on every worker.
MAX_OPEN_TILES = 32


@dataclass(frozen=True)
class MosaicSettings:
    """How the tiles of a scene make one image (``input.mosaic``).

    ``max_gap_km``: tiles whose centres lie farther than this from every tile of the main
    group are refused as far away (a stray file of another landscape).
    """

    overlap: Overlap = "first"
    nodata: float | None = None
    max_gap_km: float = 1000.0
    crs: str | None = None
    resolution: float | tuple[float, float] | None = None
    resampling: Resampling = "nearest"


@dataclass(frozen=True)
class Tile:
    """One tile: its reader and its footprint on the scene grid, in pixels (first row and
    column, rows and columns)."""

    reader: Reader
    row: int
    col: int
    rows: int
    cols: int


class MosaicReader:
    """Windowed reads of a scene of tiles, bands first: ``(c, y, x)``.

    Built by :func:`open_mosaic`; pickles as its tiles' readers (paths and metadata).
    """

    info: ItemInfo

    def __init__(
        self, info: ItemInfo, tiles: Sequence[Tile], *, overlap: Overlap, nodata: float | None
    ) -> None:
        self.info = info
        self.path = info.path
        self.tiles = tuple(tiles)
        self.overlap = overlap
        self.fill = nodata
        bounds = [(t.row, t.row + t.rows, t.col, t.col + t.cols) for t in self.tiles]
        self._bounds = np.array(bounds, dtype=np.int64).reshape(-1, 4)

    def _read_tile(self, i: int, region: tuple[slice, slice]) -> np.ndarray:
        """Read ``region`` of tile ``i``, closing the file of the tile this thread read
        longest ago when more than :data:`MAX_OPEN_TILES` are open."""
        local = self.__dict__.get("_open")
        if local is None:
            local = self.__dict__["_open"] = threading.local()
        recent = local.__dict__.setdefault("tiles", OrderedDict())
        values = self.tiles[i].reader.read(region)
        recent[i] = None
        recent.move_to_end(i)
        while len(recent) > MAX_OPEN_TILES:
            oldest, _ = recent.popitem(last=False)
            close = getattr(self.tiles[oldest].reader, "close_handle", None)
            if close is not None:
                close()
        return values

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def tiles_in(self, region: tuple[slice, ...]) -> list[int]:
        """Indices (in path order) of the tiles whose footprint meets ``region``."""
        rows, cols = check_region(self.info, region)
        b = self._bounds
        hit = (b[:, 0] < rows.stop) & (b[:, 1] > rows.start)
        hit &= (b[:, 2] < cols.stop) & (b[:, 3] > cols.start)
        return [int(i) for i in np.flatnonzero(hit)]

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` = ``(rows, cols)`` of the scene; returns ``(c, rows, cols)``."""
        rows, cols = check_region(self.info, region)
        hits = self.tiles_in((rows, cols))
        if len(hits) == 1 and self._covers(hits[0], rows, cols):
            tile = self.tiles[hits[0]]
            if tile.reader.info.nodata in (None, self.fill):
                return self._read_tile(hits[0], _shift(rows, cols, tile))
        shape = (self.info.n_channels, rows.stop - rows.start, cols.stop - cols.start)
        if self.overlap == "mean":
            return self._read_mean(hits, rows, cols, shape)
        out = np.full(shape, 0 if self.fill is None else self.fill, dtype=self.info.dtype)
        order = hits if self.overlap == "last" else hits[::-1]  # the winner is painted last
        for i in order:
            target, values, valid = self._tile_part(i, rows, cols)
            np.copyto(out[target], values, where=valid)
        return out

    def _read_mean(
        self, hits: list[int], rows: slice, cols: slice, shape: tuple[int, ...]
    ) -> np.ndarray:
        total = np.zeros(shape, dtype=np.float64)
        count = np.zeros(shape, dtype=np.int32)
        for i in hits:
            target, values, valid = self._tile_part(i, rows, cols)
            total[target] += np.where(valid, values, 0)
            count[target] += valid
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
        if np.dtype(self.info.dtype).kind in "iu":
            mean = np.rint(mean)
        fill = 0 if self.fill is None else self.fill
        return np.where(count > 0, mean, fill).astype(self.info.dtype)

    def _tile_part(
        self, i: int, rows: slice, cols: slice
    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray | bool]:
        """Where tile ``i`` lands in the window, its values there, and which are valid."""
        tile = self.tiles[i]
        r0, r1 = max(rows.start, tile.row), min(rows.stop, tile.row + tile.rows)
        c0, c1 = max(cols.start, tile.col), min(cols.stop, tile.col + tile.cols)
        values = self._read_tile(i, _shift(slice(r0, r1), slice(c0, c1), tile))
        target = (
            slice(None),
            slice(r0 - rows.start, r1 - rows.start),
            slice(c0 - cols.start, c1 - cols.start),
        )
        return target, values, _valid(values, tile.reader.info.nodata)

    def _covers(self, i: int, rows: slice, cols: slice) -> bool:
        r0, r1, c0, c1 = self._bounds[i]
        return bool(r0 <= rows.start and rows.stop <= r1 and c0 <= cols.start and cols.stop <= c1)

    def __repr__(self) -> str:
        return f"MosaicReader({self.path!r}, item_id={self.info.id!r}, tiles={len(self.tiles)})"


def _shift(rows: slice, cols: slice, tile: Tile) -> tuple[slice, slice]:
    return (
        slice(rows.start - tile.row, rows.stop - tile.row),
        slice(cols.start - tile.col, cols.stop - tile.col),
    )


def _valid(values: np.ndarray, nodata: float | None) -> np.ndarray | bool:
    if nodata is None:  # every value counts (NaN too: a float tile's own "no value")
        return True
    if math.isnan(nodata):
        return ~np.isnan(values)
    return values != np.asarray(nodata).astype(values.dtype)


def open_mosaic(
    path: str,
    item_id: str,
    readers: Sequence[Reader],
    settings: MosaicSettings,
    *,
    notes: list[str] | None = None,
) -> MosaicReader:
    """One scene item ``item_id`` from the tiles' ``readers`` (in path order); tiles of
    several CRSs or pixel sizes (or a given ``crs``/``resolution``) are warped onto one
    grid (:mod:`segflow.io.warp_mosaic`), which ``notes`` receives a line on.

    Raises
    ------
    ItemReadError
        One line naming the scene and the tile, when the tiles do not make one scene:
        not georeferenced, other bands, dtype, CRS or resolution, off the grid, a
        duplicate footprint, far from the others, or holes without a nodata value.
    """
    from segflow.io.scene_grid import check_tiles, place_tiles

    where = f"scene '{item_id}' ({path})"
    share_crs_text(readers)
    if needs_warping(readers, settings):
        from segflow.io.warp_mosaic import open_warped_mosaic

        return open_warped_mosaic(where, path, item_id, readers, settings, notes=notes)
    check_tiles(where, readers, max_gap_km=settings.max_gap_km)
    tiles, transform, shape = place_tiles(where, readers)
    nodata = scene_nodata(where, tiles, shape, settings.nodata)
    info = scene_info(path, item_id, tiles, transform, shape, nodata, settings)
    return MosaicReader(info, tiles, overlap=settings.overlap, nodata=nodata)


def share_crs_text(readers: Sequence[Reader]) -> None:
    """Make tiles of one CRS hold one WKT string object: a pickled scene (sent with each
    block's task) then carries each CRS once, not some 600 bytes per tile."""
    shared: dict[str, str] = {}
    for reader in readers:
        wkt = reader.info.crs_wkt
        if wkt is not None:
            reader.info = dataclasses.replace(reader.info, crs_wkt=shared.setdefault(wkt, wkt))


def needs_warping(readers: Sequence[Reader], settings: MosaicSettings) -> bool:
    """Whether the tiles go through warping: a target CRS or resolution is given, or the
    tiles differ in CRS or pixel size."""
    from segflow.io.scene_grid import crs_name

    if settings.crs is not None or settings.resolution is not None:
        return True
    crs = {crs_name(r.info.crs_wkt) for r in readers if r.info.crs_wkt is not None}
    steps = {tuple(np.round(r.info.spacing, 12)) for r in readers}
    return len(crs) > 1 or len(steps) > 1


def scene_info(
    path: str,
    item_id: str,
    tiles: Sequence[Tile],
    transform: tuple[float, ...],
    shape: tuple[int, int],
    nodata: float | None,
    settings: MosaicSettings,
    crs_wkt: str | None = None,
) -> ItemInfo:
    """The scene item's metadata: its grid, its tiles and their fingerprints."""
    first = tiles[0].reader.info
    digest = hashlib.sha256()
    for tile in tiles:
        digest.update(f"{tile.reader.info.path}\0{tile.reader.info.fingerprint}\n".encode())
    a, e = transform[0], transform[4]
    return ItemInfo(
        id=item_id,
        path=path,
        format="mosaic",
        shape=(first.n_channels, *shape),
        dtype=first.dtype,
        axes=("c", "y", "x"),
        spacing=(e, a),
        origin=(transform[5] + 0.5 * e, transform[2] + 0.5 * a),
        units=first.units,
        crs_wkt=crs_wkt or first.crs_wkt,
        transform=transform,
        nodata=nodata,
        # Any tile that changes (or comes or goes) changes the scene's fingerprint.
        fingerprint=digest.hexdigest()[:16],
        attrs={"mosaic_overlap": settings.overlap, "tiles": tile_records(tiles)},
    )


def tile_records(tiles: Sequence[Tile]) -> list[dict[str, Any]]:
    """The scene's tiles as the item records them: path, fingerprint, footprint."""
    return [
        {
            "path": t.reader.info.path,
            "fingerprint": t.reader.info.fingerprint,
            "window": [t.row, t.col, t.rows, t.cols],  # first row, first col, rows, cols
        }
        for t in tiles
    ]


def given_nodata(where: str, given: float, dtype: np.dtype) -> float:
    """``input.mosaic.nodata`` as given, refused in one line when the tiles' dtype cannot
    hold it."""
    if not fits_dtype(given, dtype):
        raise ItemReadError(
            f"{where}: `input.mosaic.nodata` ({given}) is not a {dtype} value, the "
            "tiles' dtype: choose one it holds"
        )
    return float(given)


def scene_nodata(
    where: str, tiles: Sequence[Tile], shape: tuple[int, int], given: float | None
) -> float | None:
    """The scene's nodata: ``given``, else the value the tiles agree on; refuse holes
    (pixels no tile covers) without one, and a value the tiles' dtype cannot hold."""
    dtype = np.dtype(tiles[0].reader.info.dtype)
    if given is not None:
        return given_nodata(where, given, dtype)
    values = {t.reader.info.path: t.reader.info.nodata for t in tiles}
    found = {v for v in values.values() if v is not None}
    if len({"nan" if math.isnan(v) else v for v in found}) > 1:
        shown = ", ".join(f"{v} in '{p}'" for p, v in list(values.items()) if v is not None)
        raise ItemReadError(
            f"{where}: the tiles' nodata values differ ({shown}): set `input.mosaic.nodata`"
        )
    if found:
        return float(found.pop())
    if has_holes(tiles, shape):
        raise ItemReadError(
            f"{where}: the tiles leave holes in the scene's {shape[0]} x {shape[1]} grid and "
            "have no nodata value to fill them with: set `input.mosaic.nodata`"
        )
    return None


def fits_dtype(value: float, dtype: np.dtype[Any]) -> bool:
    if dtype.kind == "f":
        return math.isnan(value) or bool(np.isfinite(np.asarray(value, dtype=dtype)))
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max


def has_holes(tiles: Sequence[Tile], shape: tuple[int, int]) -> bool:
    """Whether the tiles' footprints leave a pixel of ``shape`` uncovered (on the grid of
    their distinct edges, so the cost grows with the tiles, not the pixels)."""
    edges_r = np.unique([0, shape[0], *(t.row for t in tiles), *(t.row + t.rows for t in tiles)])
    edges_c = np.unique([0, shape[1], *(t.col for t in tiles), *(t.col + t.cols for t in tiles)])
    covered = np.zeros((len(edges_r) - 1, len(edges_c) - 1), dtype=bool)
    for t in tiles:
        i0, i1 = np.searchsorted(edges_r, [t.row, t.row + t.rows])
        j0, j1 = np.searchsorted(edges_c, [t.col, t.col + t.cols])
        covered[i0:i1, j0:j1] = True
    return not bool(covered.all())

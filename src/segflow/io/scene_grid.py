"""Whether georeferenced tiles make one scene, and where each lies on the scene's grid.

Every refusal is one line naming the scene, the tile and what to do
(:func:`segflow.io.mosaic.open_mosaic` raises them for the reader).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from segflow.errors import ItemReadError
from segflow.io.base import ItemInfo, Reader
from segflow.io.mosaic import GRID_TOLERANCE, Tile

# Below this many tiles the far-tile check compares every pair; above, the edges of a
# Delaunay triangulation of the centres (it holds the minimum spanning tree, so the groups
# of tiles within a distance of each other come out the same).
_ALL_PAIRS_BELOW = 64
_METRES_PER_DEGREE = 111_320.0  # at the equator; the far-tile check only needs its order


def check_tiles(where: str, readers: Sequence[Reader], *, max_gap_km: float) -> None:
    """Refuse tiles that cannot share one grid (:func:`check_tile_kinds`), a tile without
    a CRS among tiles with one, and tiles far from the others (:func:`far_tiles`). Tiles of
    several CRSs or pixel sizes are warped (:mod:`segflow.io.warp_mosaic`), not seen here."""
    check_tile_kinds(where, readers)
    check_crs_given(where, [r.info for r in readers])
    refuse_far(where, far_tiles([r.info for r in readers], max_gap_km=max_gap_km), max_gap_km)


def check_tile_kinds(where: str, readers: Sequence[Reader]) -> None:
    """Refuse a tile that is not a georeferenced raster, or has another band count or
    dtype than the first tile."""
    first = readers[0].info
    for reader in readers:
        info = reader.info
        if info.transform is None or info.format != "geotiff":
            raise ItemReadError(
                f"{where}: tile '{info.path}' is not a georeferenced raster (read as "
                f"{info.format}): a scene is made of GeoTIFFs"
            )
        for what, value, ref in (
            ("bands", info.n_channels, first.n_channels),
            ("dtype", info.dtype, first.dtype),
        ):
            if value != ref:
                raise ItemReadError(
                    f"{where}: tile '{info.path}' has {what} {value}, the first tile "
                    f"'{first.path}' {ref}: every tile of a scene must have the same {what}"
                )


def refuse_far(where: str, far: Sequence[str], max_gap_km: float) -> None:
    """One line naming the tiles far from the others, if any."""
    if far:
        shown = ", ".join(f"'{p}'" for p in far[:3]) + (
            f" (+{len(far) - 3})" if len(far) > 3 else ""
        )
        raise ItemReadError(
            f"{where}: tile(s) {shown} lie more than {max_gap_km:g} km from the scene's other "
            "tiles (`input.mosaic.max_gap_km`): leave them out or raise it"
        )


def check_crs_given(where: str, infos: Sequence[ItemInfo]) -> None:
    """Refuse a tile without a CRS among tiles with one."""
    with_crs = [i for i in infos if i.crs_wkt is not None]
    if not with_crs:
        return  # a local grid (world files without a CRS): tiles agree by their transforms
    common, _ = Counter(crs_name(i.crs_wkt) for i in with_crs).most_common(1)[0]
    for info in infos:
        if info.crs_wkt is None:
            raise ItemReadError(
                f"{where}: tile '{info.path}' has no CRS, the scene's other tiles are in "
                f"{common}: give it one (gdal_edit.py -a_srs) or leave it out"
            )


@functools.lru_cache(maxsize=64)
def crs_name(wkt: str) -> str:
    """A CRS as a person names it (``EPSG:32632``), else its WKT's first words."""
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    return crs.to_string() if crs.to_epsg() is not None else wkt[:60]


def far_tiles(infos: Sequence[ItemInfo], *, max_gap_km: float) -> list[str]:
    """Paths of the tiles outside the largest group of tiles whose centres chain together
    within ``max_gap_km`` (single linkage); none without a CRS (units unknown)."""
    if len(infos) < 2 or infos[0].crs_wkt is None:
        return []
    limit = max_gap_km * 1000.0 / metres_per_unit(infos[0].crs_wkt)
    centres = np.array([_centre(i) for i in infos])
    outside = outside_main_group(centres, limit)
    return [infos[i].path for i in outside]


def outside_main_group(centres: np.ndarray, limit: float) -> list[int]:
    """Indices of the points outside the largest group of points that chain together
    within ``limit`` of each other (single linkage)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(centres)
    if n < 2:
        return []
    pairs = _candidate_pairs(centres)
    length = np.linalg.norm(centres[pairs[:, 0]] - centres[pairs[:, 1]], axis=1)
    near = pairs[length <= limit]
    graph = coo_matrix((np.ones(len(near)), (near[:, 0], near[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    main = np.bincount(group).argmax()
    return [int(i) for i in np.flatnonzero(group != main)]


def _candidate_pairs(centres: np.ndarray) -> np.ndarray:
    n = len(centres)
    if n < _ALL_PAIRS_BELOW:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1)
    from scipy.spatial import Delaunay

    simplices = Delaunay(centres, qhull_options="QJ").simplices
    edges = np.concatenate([simplices[:, [0, 1]], simplices[:, [1, 2]], simplices[:, [0, 2]]])
    return np.unique(np.sort(edges, axis=1), axis=0)


def _centre(info: ItemInfo) -> tuple[float, float]:
    rows, cols = info.spatial_shape
    return (
        info.origin[1] + (cols - 1) / 2 * info.spacing[1],
        info.origin[0] + (rows - 1) / 2 * info.spacing[0],
    )


def metres_per_unit(wkt: str) -> float:
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    if crs.is_geographic:
        return _METRES_PER_DEGREE
    return float(crs.linear_units_factor[1])


def place_tiles(
    where: str, readers: Sequence[Reader]
) -> tuple[list[Tile], tuple[float, ...], tuple[int, int]]:
    """Each tile's first row and column on the scene grid (the bounding box of the tiles,
    at the first tile's resolution), the scene's affine transform and its shape.

    Raises
    ------
    ItemReadError
        If a tile lies off the grid by a fraction of a pixel, or two tiles share one
        footprint (a duplicate).
    """
    a, _, c0, _, e, f0 = readers[0].info.transform or ()
    offsets = []
    for reader in readers:
        _, _, c, _, _, f = reader.info.transform or ()
        off = np.array([(f - f0) / e, (c - c0) / a])
        snapped = np.rint(off)
        if np.abs(off - snapped).max() > GRID_TOLERANCE:
            raise ItemReadError(
                f"{where}: tile '{reader.info.path}' lies off the scene's pixel grid by "
                f"{np.abs(off - snapped).max():.3f} pixel (rows, cols {off[0]:.3f}, "
                f"{off[1]:.3f} from the first tile): align it first (gdalwarp -tap)"
            )
        offsets.append(snapped.astype(np.int64))
    low = np.min(offsets, axis=0)
    tiles = [
        Tile(r, int(o[0] - low[0]), int(o[1] - low[1]), *r.info.spatial_shape)
        for r, o in zip(readers, offsets, strict=True)
    ]
    _check_duplicates(where, tiles)
    shape = (max(t.row + t.rows for t in tiles), max(t.col + t.cols for t in tiles))
    transform = (a, 0.0, c0 + low[1] * a, 0.0, e, f0 + low[0] * e)
    return tiles, tuple(float(v) for v in transform), shape


def _check_duplicates(where: str, tiles: Sequence[Tile]) -> None:
    seen: dict[tuple[int, int, int, int], str] = {}
    for tile in tiles:
        key = (tile.row, tile.col, tile.rows, tile.cols)
        path = tile.reader.info.path
        if key in seen:
            raise ItemReadError(
                f"{where}: tiles '{seen[key]}' and '{path}' cover the same "
                f"footprint ({key[2]} x {key[3]} pixels at row {key[0]}, col {key[1]}): a "
                "duplicate tile; leave one out"
            )
        seen[key] = path

"""A scene of tiles in several CRSs or pixel sizes, warped onto one grid window by window.

The target grid is ``input.mosaic.crs`` at ``input.mosaic.resolution`` (default: the CRS
of most tiles, and the pixel size of most tiles in it), its origin on a multiple of the
resolution, covering every tile. A window of the scene warps, from each tile it meets,
the tile's pixels that window needs plus a halo wide enough for the resampling kernel
(scaled by the pixel-size ratio), with GDAL's exact transformer (``tolerance=0``): each
output pixel is computed from its own centre's position in the tile, so a window equals
the same pixels of the whole scene warped at once (exactly for nearest-neighbour).
Overlaps and nodata follow :class:`~segflow.io.mosaic.MosaicReader`'s rules.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from affine import Affine

from segflow.errors import ItemReadError
from segflow.io.base import ItemInfo, Reader
from segflow.io.mosaic import MosaicReader, MosaicSettings, Overlap, Tile, scene_info

# The resampling kernel's radius in source pixels (at 1:1), plus one for the pixel whose
# centre lies just outside: what a window must read around the pixels it maps to.
KERNEL_HALO = {"nearest": 1, "bilinear": 2, "cubic": 3, "lanczos": 4}


class WarpedMosaicReader(MosaicReader):
    """Windowed reads of a warped scene, bands first: ``(c, y, x)``."""

    def __init__(
        self,
        info: ItemInfo,
        tiles: Sequence[Tile],
        *,
        overlap: Overlap,
        nodata: float,
        resampling: str,
        scales: Sequence[tuple[float, float]],
    ) -> None:
        super().__init__(info, tiles, overlap=overlap, nodata=nodata)
        self.resampling = resampling
        self.scales = tuple(scales)  # per tile: grid pixels per tile pixel along x, y
        self.warp_fill = nodata  # never None: warping always leaves pixels no tile covers

    def _covers(self, i: int, rows: slice, cols: slice) -> bool:
        return False  # every tile is warped: no window is one tile's pixels as they are

    def _tile_part(
        self, i: int, rows: slice, cols: slice
    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray | bool]:
        from rasterio.enums import Resampling
        from rasterio.warp import reproject

        tile, info = self.tiles[i], self.tiles[i].reader.info
        r0, r1 = max(rows.start, tile.row), min(rows.stop, tile.row + tile.rows)
        c0, c1 = max(cols.start, tile.col), min(cols.stop, tile.col + tile.cols)
        target = (
            slice(None),
            slice(r0 - rows.start, r1 - rows.start),
            slice(c0 - cols.start, c1 - cols.start),
        )
        out = np.full((info.n_channels, r1 - r0, c1 - c0), self.warp_fill, dtype=info.dtype)
        dst_transform = Affine(*self.info.transform or ()) @ Affine.translation(c0, r0)
        window = self._source_window(tile, dst_transform, out.shape[1:])
        if window is None:
            return target, out, False
        src_transform = Affine(*info.transform or ())
        src_transform @= Affine.translation(window[1].start, window[0].start)
        reproject(
            self._read_tile(i, window),
            out,
            src_transform=src_transform,
            src_crs=_crs(info.crs_wkt),
            src_nodata=info.nodata,
            dst_transform=dst_transform,
            dst_crs=_crs(self.info.crs_wkt),
            dst_nodata=self.warp_fill,
            resampling=Resampling[self.resampling],
            tolerance=0,  # the exact transformer: a window maps as the whole scene does
            # GDAL scales a kernel by the ratio of the chunk it warps, which depends on the
            # window: the tile's own ratio, fixed, makes every window resample alike.
            XSCALE=self.scales[i][0],
            YSCALE=self.scales[i][1],
        )
        return target, out, _valid(out, self.warp_fill)

    def _source_window(
        self, tile: Tile, dst_transform: Affine, shape: tuple[int, ...]
    ) -> tuple[slice, slice] | None:
        """The tile's pixels a window of ``shape`` at ``dst_transform`` reads, with the
        resampling kernel's halo; None when it reads none."""
        from rasterio.warp import transform_bounds

        info = tile.reader.info
        left, top = dst_transform @ (0, 0)
        right, bottom = dst_transform @ (shape[1], shape[0])
        bounds = transform_bounds(
            _crs(self.info.crs_wkt), _crs(info.crs_wkt), left, bottom, right, top, densify_pts=21
        )
        inverse = ~Affine(*info.transform or ())
        xs, ys = zip(*(inverse @ (x, y) for x in bounds[::2] for y in bounds[1::2]), strict=True)
        ratio = max(
            1.0, (max(xs) - min(xs)) / max(shape[1], 1), (max(ys) - min(ys)) / max(shape[0], 1)
        )
        halo = math.ceil(KERNEL_HALO[self.resampling] * ratio)
        rows, cols = info.spatial_shape
        r0, r1 = max(0, math.floor(min(ys)) - halo), min(rows, math.ceil(max(ys)) + halo)
        c0, c1 = max(0, math.floor(min(xs)) - halo), min(cols, math.ceil(max(xs)) + halo)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def _valid(values: np.ndarray, nodata: float) -> np.ndarray:
    return ~np.isnan(values) if math.isnan(nodata) else values != np.asarray(nodata, values.dtype)


@functools.lru_cache(maxsize=64)
def _crs(wkt: str | None) -> Any:
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt)


def open_warped_mosaic(
    where: str,
    path: str,
    item_id: str,
    readers: Sequence[Reader],
    settings: MosaicSettings,
    *,
    notes: list[str] | None = None,
) -> WarpedMosaicReader:
    """The scene of ``readers`` warped onto one grid (see the module's text); ``notes``
    receives the line that says which grid."""
    from segflow.io.scene_grid import check_tile_kinds

    check_tile_kinds(where, readers)
    infos = [r.info for r in readers]
    for info in infos:
        if info.crs_wkt is None:
            raise ItemReadError(
                f"{where}: tile '{info.path}' has no CRS, so it cannot be warped onto the "
                "scene's grid: give it one (gdal_edit.py -a_srs) or leave it out"
            )
    crs_wkt, resolution, said = target_grid(where, infos, settings)
    bounds = [tile_bounds(info, crs_wkt) for info in infos]
    check_far(where, infos, bounds, crs_wkt, settings.max_gap_km)
    transform, shape = grid_over(bounds, resolution)
    tiles = [footprint(r, b, transform, shape) for r, b in zip(readers, bounds, strict=True)]
    nodata = warped_nodata(where, infos, settings.nodata)
    info = scene_info(path, item_id, tiles, transform, shape, nodata, settings, crs_wkt=crs_wkt)
    info.attrs["mosaic_grid"] = said
    if notes is not None:
        notes.append(f"{where}: {said}")
    return WarpedMosaicReader(
        info,
        tiles,
        overlap=settings.overlap,
        nodata=nodata,
        resampling=settings.resampling,
        scales=[kernel_scale(i, b, resolution) for i, b in zip(infos, bounds, strict=True)],
    )


def kernel_scale(
    info: ItemInfo, bounds: tuple[float, float, float, float], resolution: tuple[float, float]
) -> tuple[float, float]:
    """Grid pixels per tile pixel along x and y (GDAL's ``XSCALE``, ``YSCALE``): below 1
    where the grid is coarser, which widens the resampling kernel."""
    rows, cols = info.spatial_shape
    x = (bounds[2] - bounds[0]) / resolution[0] / cols
    y = (bounds[3] - bounds[1]) / resolution[1] / rows
    return round(x, 9), round(y, 9)


def target_grid(
    where: str, infos: Sequence[ItemInfo], settings: MosaicSettings
) -> tuple[str, tuple[float, float], str]:
    """The target CRS (WKT), pixel size ``(x, y)`` and one line saying where they came from."""
    from rasterio.crs import CRS

    from segflow.io.scene_grid import crs_name

    names = [crs_name(i.crs_wkt or "") for i in infos]
    if settings.crs is not None:
        try:
            crs_wkt = CRS.from_user_input(settings.crs).to_wkt()
        except Exception as exc:
            raise ItemReadError(
                f"{where}: `input.mosaic.crs` ({settings.crs!r}) is not a CRS: give an EPSG "
                f"code such as EPSG:32632, or WKT ({type(exc).__name__}: {exc})"
            ) from None
        crs_from = "given"
    else:
        common, n = Counter(names).most_common(1)[0]
        crs_wkt = infos[names.index(common)].crs_wkt or ""
        crs_from = f"{n} of {len(infos)} tiles"
    resolution, res_from = _resolution(where, infos, names, crs_wkt, settings.resolution)
    said = (
        f"warping {len(infos)} tiles onto {crs_name(crs_wkt)} ({crs_from}) at "
        f"{resolution[0]:g} x {resolution[1]:g} ({res_from}), {settings.resampling} "
        "resampling; set input.mosaic.crs / resolution / resampling to choose"
    )
    return crs_wkt, resolution, said


def _resolution(
    where: str,
    infos: Sequence[ItemInfo],
    names: Sequence[str],
    crs_wkt: str,
    given: float | tuple[float, float] | None,
) -> tuple[tuple[float, float], str]:
    from segflow.io.scene_grid import crs_name

    if given is not None:
        x, y = (given, given) if isinstance(given, int | float) else given
        if not (x > 0 and y > 0):
            raise ItemReadError(f"{where}: `input.mosaic.resolution` ({given}) must be > 0")
        return (float(x), float(y)), "given"
    target = crs_name(crs_wkt)
    steps = [
        (abs(i.spacing[1]), abs(i.spacing[0]))
        for i, n in zip(infos, names, strict=True)
        if n == target
    ]
    if not steps:
        raise ItemReadError(
            f"{where}: no tile is in {target}, so no pixel size to take: set "
            "`input.mosaic.resolution`"
        )
    common, n = Counter(steps).most_common(1)[0]
    return common, f"{n} of {len(infos)} tiles"


def tile_bounds(info: ItemInfo, crs_wkt: str) -> tuple[float, float, float, float]:
    """A tile's footprint ``(left, bottom, right, top)`` in ``crs_wkt``."""
    from rasterio.warp import transform_bounds

    a, _, c, _, e, f = info.transform or ()
    rows, cols = info.spatial_shape
    xs, ys = (c, c + a * cols), (f, f + e * rows)
    box = (min(xs), min(ys), max(xs), max(ys))
    return tuple(transform_bounds(_crs(info.crs_wkt), _crs(crs_wkt), *box, densify_pts=21))


def grid_over(
    bounds: Sequence[tuple[float, float, float, float]], resolution: tuple[float, float]
) -> tuple[tuple[float, ...], tuple[int, int]]:
    """A north-up grid at ``resolution`` covering ``bounds``, its origin on a multiple of
    the resolution (as ``gdalwarp -tap``): its transform and shape."""
    rx, ry = resolution
    left = math.floor(min(b[0] for b in bounds) / rx) * rx
    top = math.ceil(max(b[3] for b in bounds) / ry) * ry
    cols = math.ceil((max(b[2] for b in bounds) - left) / rx)
    rows = math.ceil((top - min(b[1] for b in bounds)) / ry)
    return (rx, 0.0, left, 0.0, -ry, top), (rows, cols)


def footprint(
    reader: Reader,
    bounds: tuple[float, float, float, float],
    transform: tuple[float, ...],
    shape: tuple[int, int],
) -> Tile:
    """The grid pixels a tile may cover: its bounds' pixels and one more around (a warped
    footprint's edge pixels are partly outside; those the tile misses stay invalid)."""
    rx, _, left, _, ry, top = transform
    c0 = max(0, math.floor((bounds[0] - left) / rx) - 1)
    c1 = min(shape[1], math.ceil((bounds[2] - left) / rx) + 1)
    r0 = max(0, math.floor((bounds[3] - top) / ry) - 1)
    r1 = min(shape[0], math.ceil((bounds[1] - top) / ry) + 1)
    return Tile(reader, r0, c0, r1 - r0, c1 - c0)


def check_far(
    where: str,
    infos: Sequence[ItemInfo],
    bounds: Sequence[tuple[float, float, float, float]],
    crs_wkt: str,
    max_gap_km: float,
) -> None:
    """Refuse tiles far from the others, by their centres on the target grid."""
    from segflow.io.scene_grid import metres_per_unit, outside_main_group, refuse_far

    centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in bounds])
    outside = outside_main_group(centres, max_gap_km * 1000.0 / metres_per_unit(crs_wkt))
    refuse_far(where, [infos[i].path for i in outside], max_gap_km)


def warped_nodata(where: str, infos: Sequence[ItemInfo], given: float | None) -> float:
    """A warped scene's nodata: ``given``, else the tiles' common nodata value. Warping
    leaves pixels no tile covers at the footprints' slanted edges, so one is needed."""
    from segflow.io.mosaic import given_nodata

    dtype = np.dtype(infos[0].dtype)
    if given is not None:
        return given_nodata(where, given, dtype)
    found = {"nan" if v is not None and math.isnan(v) else v for v in (i.nodata for i in infos)}
    if len(found) == 1 and None not in found:
        value = found.pop()
        return math.nan if value == "nan" else float(value)  # type: ignore[arg-type]
    raise ItemReadError(
        f"{where}: a warped scene needs a nodata value for the pixels no tile covers, and "
        "the tiles do not share one: set `input.mosaic.nodata`"
    )

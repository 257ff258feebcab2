"""An item's label or class array as a Cloud-Optimized GeoTIFF, written block by block.

GDAL's COG driver only copies a whole dataset, so the array goes first into a tiled
GeoTIFF beside the target, one window of Zarr chunks at a time; each overview level
(nearest neighbour: a label is never averaged with its neighbour) is made from the level
before it, window by window, into a GeoTIFF of its own; a VRT names the levels as the
overviews of the first, and the COG driver copies it into the COG layout (overviews after
the header, tiles in order). At no step does the raster exist in memory: a window is the
largest array segflow holds, and GDAL's block cache is capped at one window. What still
grows with the item is GDAL's: the COG driver copies one row of tiles across the whole
width at a time (tile side x width x dtype). GDAL's own overview pass
(``build_overviews``), used at first, read full-width strips too: on a 16384^2 uint16 item
its peak was 21 MB higher with 512^2 tiles, 41 MB with 2048^2 (``bench_export.py``,
2026-12-07). The file is renamed into place when complete: no half-written COG is seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.errors import StoreError
from segflow.export.stored import StoredItem, open_integer_array
from segflow.store.ome import _rgba

# COG tile side (GDAL's default); overviews are made until one fits in a tile.
BLOCK = 512
# GDAL's block cache, in windows (4 used 10-20 MB more and were no faster, 2026-12-07).
CACHE_WINDOWS = 1


@dataclass(frozen=True)
class CogResult:
    path: str
    shape: tuple[int, int]
    overviews: tuple[int, ...]
    window: tuple[int, int]


def write_cog(
    item: StoredItem,
    array: str,
    path: str | os.PathLike[str],
    *,
    block: int = BLOCK,
    compress: str = "deflate",
    cache_windows: float = CACHE_WINDOWS,
) -> CogResult:
    """Write ``item``'s 2-D integer ``array`` to ``path`` as a COG.

    The COG has the item's CRS and transform, overviews by factors of 2 down to one tile
    (nearest neighbour: see :func:`halve`), ``block`` x ``block`` tiles, and for a class
    map its class names (band tags ``flag_values``/``flag_meanings``) and colour table.
    Every step reads and writes a window of whole tiles (and Zarr chunks) at a time;
    GDAL's block cache holds ``cache_windows`` windows (at least 1 MiB).

    Raises
    ------
    StoreError
        When the array is not a 2-D integer array of the item, or ``block`` is not a
        positive multiple of 16 (a GeoTIFF tile side).
    """
    import rasterio
    import rasterio.shutil

    source = open_integer_array(
        item, array, "a COG export takes 2-D integer arrays (labels, masks, class maps)"
    )
    if block <= 0 or block % 16:
        raise StoreError(f"`block` ({block}) must be a positive multiple of 16 (a tile side)")
    shape = (int(source.shape[0]), int(source.shape[1]))
    window = _window(tuple(source.chunks), block)
    target = Path(path)
    factors = overview_factors(shape, block)
    scratch = [target.with_name(f".{target.name}.{k}.tif") for k in range(len(factors) + 1)]
    vrt, staged = target.with_name(f".{target.name}.vrt"), target.with_name(f".{target.name}~")
    cache = int(cache_windows * window[0] * window[1] * np.dtype(source.dtype).itemsize)
    try:
        with rasterio.Env(GDAL_CACHEMAX=max(cache, 1 << 20), GDAL_NUM_THREADS="1"):
            profile = _profile(item, source, block)
            with rasterio.open(scratch[0], "w", **profile) as dst:
                for rows, cols in windows(shape, window):
                    dst.write(np.asarray(source[rows, cols]), 1, window=_box(rows, cols))
                _describe(dst, source, array)
            for level in range(1, len(scratch)):
                write_halved(scratch[level - 1], scratch[level], profile, window)
            _overview_vrt(scratch[0], scratch[1:], vrt)
            rasterio.shutil.copy(
                vrt, staged, driver="COG", BLOCKSIZE=block, COMPRESS=compress.upper(),
                PREDICTOR="YES", OVERVIEWS="FORCE_USE_EXISTING", BIGTIFF="IF_SAFER",
            )  # fmt: skip
        os.replace(staged, target)
    finally:
        for leftover in (*scratch, vrt, staged):
            leftover.unlink(missing_ok=True)
    return CogResult(str(target), shape, factors, window)


def halve(data: np.ndarray) -> np.ndarray:
    """Nearest-neighbour halving along both axes: output pixel ``i`` is input pixel
    ``2 i + 1`` (the second of the two it covers, as GDAL's nearest picks), the last
    input pixel where the size is odd.

    Examples
    --------
    >>> halve(np.arange(15).reshape(3, 5)).tolist()
    [[6, 8, 9], [11, 13, 14]]
    """
    for axis in (0, 1):
        picked = np.minimum(np.arange(1, data.shape[axis] + 1, 2), data.shape[axis] - 1)
        data = np.take(data, picked, axis=axis)
    return data


def write_halved(
    source: Path, target: Path, profile: dict[str, Any], window: tuple[int, int]
) -> None:
    """Write the :func:`halve` of the GeoTIFF ``source`` into ``target``, window by window
    (windows of even sides: each output pixel comes from one window)."""
    import rasterio

    with rasterio.open(source) as src:
        height, width = src.shape
        shape = (-(-height // 2), -(-width // 2))
        with rasterio.open(
            target, "w", **{**profile, "height": shape[0], "width": shape[1]}
        ) as dst:
            for rows, cols in windows((height, width), window):
                halved = halve(src.read(1, window=_box(rows, cols)))
                out = (slice(rows.start // 2, rows.start // 2 + halved.shape[0]),
                       slice(cols.start // 2, cols.start // 2 + halved.shape[1]))  # fmt: skip
                dst.write(halved, 1, window=_box(*out))


def _overview_vrt(base: Path, levels: list[Path], vrt: Path) -> None:
    """A VRT of ``base`` whose overviews are the files ``levels`` (GDAL's COG driver then
    copies them as they are, with OVERVIEWS=FORCE_USE_EXISTING)."""
    import rasterio.shutil

    rasterio.shutil.copy(base, vrt, driver="VRT")
    overviews = "".join(
        f'<Overview><SourceFilename relativeToVRT="1">{level.name}</SourceFilename>'
        "<SourceBand>1</SourceBand></Overview>"
        for level in levels
    )
    text = vrt.read_text()
    vrt.write_text(text.replace("</VRTRasterBand>", f"{overviews}</VRTRasterBand>", 1))


def _box(rows: slice, cols: slice) -> tuple[tuple[int, int], tuple[int, int]]:
    return (rows.start, rows.stop), (cols.start, cols.stop)


def overview_factors(shape: tuple[int, int], block: int) -> tuple[int, ...]:
    """Factors 2, 4, 8, ... until the overview fits in one ``block`` tile.

    Examples
    --------
    >>> overview_factors((718, 791), 128)
    (2, 4, 8)
    >>> overview_factors((100, 100), 512)
    ()
    """
    levels = math.ceil(math.log2(max(max(shape) / block, 1.0)))
    return tuple(2**k for k in range(1, levels + 1))


def _window(chunks: tuple[int, ...], block: int) -> tuple[int, int]:
    """Rows and columns read at once: whole tiles, and whole Zarr chunks where chunks
    and tiles nest (powers of two); else a chunk is decoded by each window it meets.

    Examples
    --------
    >>> _window((2048, 2048), 512), _window((128, 128), 512), _window((100, 700), 512)
    ((2048, 2048), (512, 512), (512, 1024))
    """
    rows, cols = (-(-max(int(c), block) // block) * block for c in chunks[-2:])
    return rows, cols


def windows(shape: tuple[int, int], step: tuple[int, int]) -> Iterator[tuple[slice, slice]]:
    """Row-major windows of ``step`` covering ``shape`` (the last ones cut at the edge)."""
    for y in range(0, shape[0], step[0]):
        for x in range(0, shape[1], step[1]):
            yield slice(y, min(y + step[0], shape[0])), slice(x, min(x + step[1], shape[1]))


def _profile(item: StoredItem, source: Any, block: int) -> dict[str, Any]:
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    height, width = source.shape
    return {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": str(source.dtype),
        "crs": CRS.from_wkt(item.crs_wkt) if item.crs_wkt else None,
        "transform": Affine(*item.transform),
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "zstd",
        "BIGTIFF": "IF_SAFER",
    }


def _describe(dst: Any, source: Any, array: str) -> None:
    """Band description, and a class map's names (tags) and colours (colour table)."""
    dst.set_band_description(1, array)
    attrs = dict(source.attrs)
    values, names = attrs.get("flag_values"), attrs.get("class_names")
    if values and names:
        dst.update_tags(
            1,
            flag_values=" ".join(str(v) for v in values),
            flag_meanings=" ".join(str(n).replace(" ", "_") for n in names),
        )
    colors = attrs.get("class_colors")
    if values and colors and np.dtype(source.dtype) in (np.uint8, np.uint16):
        rgba = {int(v): _rgba(c) for v, c in zip(values, colors, strict=True)}
        table = {v: tuple(c) for v, c in rgba.items() if c is not None}
        if table:
            dst.write_colormap(1, table)


def cog_arrays(item: StoredItem) -> list[str]:
    """The item's arrays a COG can hold: 2-D integer arrays (labels, masks, class maps)."""
    import zarr

    names = []
    for name in sorted(item.arrays):
        array = zarr.open_array(item.store, path=item.array_path(name), mode="r")
        if array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
            names.append(name)
    return names

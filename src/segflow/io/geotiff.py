"""GeoTIFF (and any georeferenced raster GDAL opens) through rasterio windowed reads."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from segflow.io._common import (
    check_region,
    fingerprint_file,
    is_url,
    raise_read_error,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import ItemInfo, LazyHandleReader

# rasterio spells linear units as GDAL does; ItemInfo.units uses short names where one exists.
_UNIT_NAMES = {"metre": "m", "meter": "m", "metres": "m", "meters": "m", "foot": "ft"}


class GeoTIFFReader(LazyHandleReader):
    """Windowed reads of a georeferenced raster, bands first: ``(c, y, x)``.

    Metadata (CRS as WKT, affine transform, nodata) is read once when the reader is built.
    The dataset handle is opened lazily, once per process and thread (GDAL handles are not
    thread-safe), and never pickled: a pickled reader is just its path and :class:`ItemInfo`.

    Parameters
    ----------
    path : str
        Local path or a URL GDAL understands (``s3://…``, ``https://…``).
    item_id : str, optional
        Item id; defaults to the file stem made safe for Zarr.

    Raises
    ------
    ItemReadError
        If the file cannot be opened, or has a rotated or sheared geotransform.

    Examples
    --------
    >>> reader = GeoTIFFReader("tests/data/aerial/RGB.byte.tif")
    >>> reader.info.axes, reader.info.shape, reader.info.units
    (('c', 'y', 'x'), (3, 718, 791), 'm')
    >>> reader.read((slice(0, 2), slice(0, 4))).shape
    (3, 2, 4)
    """

    info: ItemInfo

    def __init__(self, path: str, item_id: str | None = None) -> None:
        self.path = strip_file_scheme(path)
        self.info = _read_geotiff_info(self.path, item_id)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` = ``(rows, cols)``; returns ``(c, rows, cols)`` in the file dtype."""
        rows, cols = check_region(self.info, region)
        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        what = f"cannot read window {window}"
        with wrap_read_errors(self.path, what, damaged="the file is damaged or cut short"):
            if _through_fsspec(self.path):
                # rasterio's Python opener must be closed in the context that opened it
                # (a handle kept per thread and closed by the garbage collector is not):
                # one open per window, whose cost is a small ranged read of the header.
                with _open_dataset(self.path) as dataset:
                    return np.asarray(dataset.read(window=window))
            return np.asarray(self.handle().read(window=window))

    def open_handle(self) -> Any:
        return _open_dataset(self.path)


def _open_dataset(path: str) -> Any:
    # A TIFF without georeferencing is still readable: its CRS is None and its transform the
    # identity, which _read_geotiff_info handles, so GDAL's warning about it is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if _through_fsspec(path):
            # Object stores through fsspec, as every other segflow path: the same
            # credentials and endpoint (AWS_ENDPOINT_URL, a profile) for reads and writes.
            # GDAL reads through the file object in ranges, never the whole file.
            import fsspec

            fs, inner = fsspec.core.url_to_fs(path)
            return rasterio.open(inner, opener=fs)
        return rasterio.open(path)


def _through_fsspec(path: str) -> bool:
    """Object-store URLs (s3://, gs://, az://...) are read through fsspec; http(s) and local
    paths through GDAL itself."""
    return is_url(path) and not path.startswith(("http://", "https://"))


def _read_geotiff_info(path: str, item_id: str | None) -> ItemInfo:
    try:
        with _open_dataset(path) as src, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # see _open_dataset
            crs = src.crs
            transform = src.transform
            shape = (src.count, src.height, src.width)
            dtype = str(np.result_type(*src.dtypes))
            nodata = src.nodata
    except Exception as exc:
        raise_read_error(path, "not a readable GeoTIFF", exc)
    if transform.b != 0 or transform.d != 0:
        raise_read_error(
            path,
            "rotated or sheared geotransform is not supported",
            ValueError(f"b={transform.b}, d={transform.d}; warp it north-up first (gdalwarp)"),
        )
    # Centre of pixel (0, 0): the corner (c, f) plus half a pixel along each axis.
    x0 = transform.c + 0.5 * transform.a
    y0 = transform.f + 0.5 * transform.e
    if crs is None:
        units = "unknown"
    elif crs.is_geographic:
        units = "degree"
    else:
        name = crs.linear_units or "unknown"
        units = _UNIT_NAMES.get(name.lower(), name)
    stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return ItemInfo(
        id=item_id if item_id is not None else sanitize_id(stem),
        path=path,
        format="geotiff",
        shape=shape,
        dtype=dtype,
        axes=("c", "y", "x"),
        spacing=(float(transform.e), float(transform.a)),
        origin=(float(y0), float(x0)),
        units=units,
        crs_wkt=crs.to_wkt() if crs is not None else None,
        transform=tuple(float(v) for v in transform[:6]),
        nodata=None if nodata is None else float(nodata),
        fingerprint=fingerprint_file(path),
    )

"""OME-TIFF through tifffile: physical sizes, channel names, pyramid levels, windowed reads."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from segflow.errors import ItemReadError
from segflow.io._common import (
    check_region,
    fingerprint_file,
    raise_read_error,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import ItemInfo, LazyHandleReader

# OME's length units as segflow writes them (ItemInfo.units).
_UNITS = {"µm": "um", "um": "um", "nm": "nm", "mm": "mm", "cm": "cm", "m": "m", "Å": "angstrom"}


class OmeTiffReader(LazyHandleReader):
    """Windowed reads of an OME-TIFF image as ``(c, (z), y, x)``.

    The first image of the file is read; its ``C`` (or RGB ``S``) axis is the channel axis,
    ``Z``, ``Y``, ``X`` the spatial ones (a ``T`` axis longer than 1 is refused). Spacing
    comes from ``PhysicalSizeX/Y/Z`` and their units (OME's default, micrometres, where a
    unit is not given); channel names go to ``info.attrs["channel_names"]``. Tiled files
    are read window by window through tifffile's Zarr view, never whole.

    Parameters
    ----------
    path : str
        Local path of an OME-TIFF file.
    item_id : str, optional
        Item id; defaults to the file name without ``.ome.tif``.
    level : int
        Pyramid level: 0 (full resolution, the default) or a reduced one; its spacing is
        the full-resolution spacing times the reduction.

    Raises
    ------
    ItemReadError
        If the file is not OME-TIFF, has no such level, or has a time axis.
    """

    info: ItemInfo

    def __init__(self, path: str, item_id: str | None = None, *, level: int = 0) -> None:
        import tifffile

        self.path = strip_file_scheme(path)
        self.level = level
        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.is_ome:
                    raise ValueError("no OME-XML in the first page")
                series = tif.series[0]
                levels = [tuple(int(n) for n in lv.shape) for lv in series.levels]
                axes = str(series.axes)
                dtype = str(np.dtype(series.dtype))
                pixels = _pixels_metadata(tifffile.xml2dict(tif.ome_metadata or ""))
        except Exception as exc:
            raise_read_error(self.path, "not a readable OME-TIFF", exc)
        if not 0 <= level < len(levels):
            raise ItemReadError(
                f"item '{self.path}': `level` {level} does not exist; the file has levels "
                f"0..{len(levels) - 1} {levels}"
            )
        self.info, self._order = _make_info(self.path, item_id, axes, levels, level, dtype, pixels)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(c, *region_shape)``."""
        bounded = check_region(self.info, region)
        with wrap_read_errors(self.path, "cannot read OME-TIFF data"):
            array = self.handle()
            index: list[Any] = []
            spatial = iter(bounded)
            for axis in self._order:
                index.append(slice(None) if axis in "CS" else next(spatial) if axis in "ZYX" else 0)
            block = np.asarray(array[tuple(index)])
        kept = [a for a in self._order if a in "CSZYX"]
        if "C" in kept or "S" in kept:
            channel = kept.index("C") if "C" in kept else kept.index("S")
            return np.ascontiguousarray(np.moveaxis(block, channel, 0))
        return block[np.newaxis]

    def open_handle(self) -> Any:
        """tifffile's Zarr view of the level (the file stays open with it)."""
        import tifffile
        import zarr

        tif = tifffile.TiffFile(self.path)
        array = zarr.open_array(tif.series[0].aszarr(level=self.level), mode="r")
        weakref.finalize(array, tif.close)  # the file closes with the reader's last handle
        return array

    def __repr__(self) -> str:
        return f"OmeTiffReader({self.path!r}, item_id={self.info.id!r}, level={self.level})"


def _pixels_metadata(ome: dict[str, Any]) -> dict[str, Any]:
    image = ome.get("OME", {}).get("Image", {})
    if isinstance(image, list):
        image = image[0]
    pixels = image.get("Pixels", {})
    return pixels if isinstance(pixels, dict) else {}


def _make_info(
    path: str,
    item_id: str | None,
    axes: str,
    levels: list[tuple[int, ...]],
    level: int,
    dtype: str,
    pixels: dict[str, Any],
) -> tuple[ItemInfo, str]:
    shape = levels[level]
    full = levels[0]
    for axis, n in zip(axes, shape, strict=True):
        if axis not in "CSZYX" and n > 1:
            raise ItemReadError(
                f"item '{path}': OME-TIFF axis {axis!r} has length {n} (axes {axes!r}); "
                "segflow reads one time point: split the file"
            )
    if "C" in axes and "S" in axes and shape[axes.index("S")] > 1:
        raise ItemReadError(f"item '{path}': both C and S channel axes (axes {axes!r})")
    spatial = [a for a in axes if a in "ZYX"]
    spacing, origin, units = [], [], set()
    for axis in spatial:
        size = float(pixels.get(f"PhysicalSize{axis}", 1.0) or 1.0)
        reduction = full[axes.index(axis)] / shape[axes.index(axis)]
        spacing.append(size * reduction)
        origin.append((reduction - 1) / 2 * size)  # a reduced pixel's centre, level 0 frame
        if f"PhysicalSize{axis}" in pixels:
            unit = str(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            units.add(_UNITS.get(unit, unit))
    if len(units) > 1:
        raise ItemReadError(
            f"item '{path}': PhysicalSize units differ across axes ({sorted(units)})"
        )
    channels = pixels.get("Channel", [])
    if isinstance(channels, dict):
        channels = [channels]
    names = [str(c.get("Name", "")) for c in channels]
    n_channels = 1
    for axis in "CS":
        if axis in axes:
            n_channels *= shape[axes.index(axis)]
    attrs: dict[str, object] = {"ome_level": level, "ome_levels": [list(s) for s in levels]}
    if any(names) and len(names) == n_channels:
        attrs["channel_names"] = names
    spatial_shape = tuple(shape[axes.index(a)] for a in spatial)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    has_channels = any(a in axes for a in "CS")
    info = ItemInfo(
        id=item_id if item_id is not None else sanitize_id(name),
        path=path,
        format="ome-tiff",
        shape=((n_channels,) if has_channels else ()) + spatial_shape,
        dtype=dtype,
        axes=(("c",) if has_channels else ()) + tuple(a.lower() for a in spatial),
        spacing=tuple(spacing),
        origin=tuple(origin),
        units=units.pop() if units else "pixel",
        fingerprint=fingerprint_file(path),
        attrs=attrs,
    )
    return info, axes

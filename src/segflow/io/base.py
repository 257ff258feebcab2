"""What every reader gives the engine: item metadata and windowed reads."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Format = Literal[
    "geotiff",
    "nifti",
    "nrrd",
    "dicom",
    "ome-tiff",
    "tiff",
    "png",
    "jpeg",
    "zarr",
    "array",
    "mosaic",
]


@dataclass(frozen=True)
class ItemInfo:
    """Identity and physical metadata of one item of a collection.

    Axes are ordered channels first, then ``(z), y, x``: ``axes`` is for example
    ``("c", "y", "x")`` for a multi-band raster or ``("z", "y", "x")`` for a volume.
    ``spacing`` and ``origin`` are given per *spatial* axis, in ``units``; ``origin`` is the
    coordinate of the centre of the first pixel, so the centre of pixel ``i`` along an axis is
    ``origin + i * spacing`` (spacing may be negative, as for north-up rasters along y).
    """

    id: str
    path: str
    format: Format
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    units: str = "pixel"
    crs_wkt: str | None = None
    # rasterio/affine order (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f.
    # (GDAL's GeoTransform is (c, a, b, f, d, e).)
    transform: tuple[float, ...] | None = None
    affine: tuple[tuple[float, ...], ...] | None = None  # volumes: 4x4 voxel-to-world
    nodata: float | None = None
    fingerprint: str = ""
    attrs: dict[str, object] = field(default_factory=dict, hash=False, compare=False)

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        return tuple(a for a in self.axes if a != "c")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(n for n, a in zip(self.shape, self.axes, strict=True) if a != "c")

    @property
    def n_channels(self) -> int:
        return self.shape[0] if self.axes[0] == "c" else 1


@runtime_checkable
class Reader(Protocol):
    """Windowed access to one item. Must pickle cheaply (paths, not open handles)."""

    info: ItemInfo

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` (one slice per spatial axis, steps of 1, inside the item).

        Returns an array shaped ``(c, *region_shape)``: the channel axis is always present,
        of length 1 for single-channel items.
        """
        ...


class LazyHandleReader:
    """Base of readers that keep an open handle (a GDAL dataset, a Zarr array, a TIFF file).

    The handle is opened by :meth:`open_handle` on first use, once per process and thread
    (GDAL and TIFF handles are not thread-safe), and never pickled: a pickled reader is its
    plain attributes (path, :class:`ItemInfo`, options) and opens its own handle where it
    lands, on a Dask worker say.
    """

    info: ItemInfo
    path: str

    def open_handle(self) -> Any:
        raise NotImplementedError

    def handle(self) -> Any:
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__["_local"] = threading.local()
        handle = getattr(local, "handle", None)
        if handle is None or getattr(handle, "closed", False):
            handle = local.handle = self.open_handle()
        return handle

    def close_handle(self) -> None:
        """Close this thread's handle, if open; the next read opens it again (a scene of
        many tiles keeps a few of them open, not one per tile)."""
        local = self.__dict__.get("_local")
        handle = getattr(local, "handle", None)
        if handle is not None:
            handle.close()
            local.handle = None  # type: ignore[union-attr]

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, item_id={self.info.id!r})"

"""The readers segflow ships, as registry backends, in the order they are tried."""

from __future__ import annotations

import os
from typing import Any

from segflow.errors import ItemReadError
from segflow.io._common import is_url, read_head
from segflow.io.base import Reader
from segflow.io.registry import ReaderBackend

# World files and GDAL sidecars that georeference a TIFF without GeoTIFF tags.
GEO_SIDECARS = (".tfw", ".tifw", ".tiffw", ".wld", ".aux.xml")
TIFF_SUFFIXES = (".tif", ".tiff")
# Magic numbers: a few bytes tell PNG from JPEG whatever the file is called.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ZarrBackend(ReaderBackend):
    name = "zarr"
    description = "Zarr v2/v3 array or OME-Zarr image (a folder)"
    suffixes = (".zarr",)
    item = "folder"
    metadata = "dimension names; OME-Zarr scale, translation and units"
    options = ("array_path",)

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.zarr import ZarrReader

        return ZarrReader(path, item_id, **options)


class NiftiBackend(ReaderBackend):
    name = "nifti"
    description = "NIfTI-1/2 volume"
    suffixes = (".nii.gz", ".nii")
    metadata = "affine (RAS+ mm), spacing, origin, orientation code"

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.nifti import NiftiReader

        return NiftiReader(path, item_id)


class NrrdBackend(ReaderBackend):
    name = "nrrd"
    description = "NRRD volume or image (attached or detached header)"
    suffixes = (".nrrd", ".nhdr")
    metadata = "space directions, space origin, space (LPS/RAS), units"

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.nrrd import NrrdReader

        return NrrdReader(path, item_id)


class DicomBackend(ReaderBackend):
    name = "dicom"
    description = "DICOM series (one item per SeriesInstanceUID; enhanced multi-frame too)"
    suffixes = (".dcm", ".dicom", ".ima")
    item = "series"
    sniffs = True
    metadata = "slice positions and orientation (affine), spacing, rescale to HU, series UID"

    def guess_can_open(self, path: str) -> bool:
        if is_url(path):
            return self.claims_suffix(path)
        return _starts_with(path, b"DICM", offset=128)

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.dicom import DicomSeriesReader

        return DicomSeriesReader(path, item_id)

    def group(self, paths: Any) -> tuple[list[str], list[str]]:
        from segflow.io.dicom import group_series

        return group_series(list(paths))

    def item_name(self, path: str) -> str | None:
        from segflow.io.dicom import series_name

        return series_name(path)


class GeoTIFFBackend(ReaderBackend):
    name = "geotiff"
    description = "GeoTIFF / Cloud-optimised GeoTIFF (windowed reads, local or URL)"
    suffixes = TIFF_SUFFIXES
    metadata = "CRS, affine transform, nodata, band count"

    def guess_can_open(self, path: str) -> bool:
        return self.claims_suffix(path) and (is_url(path) or is_georeferenced(path))

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.geotiff import GeoTIFFReader

        return GeoTIFFReader(path, item_id)


class OmeTiffBackend(ReaderBackend):
    name = "ome-tiff"
    description = "OME-TIFF (physical sizes, channel names, pyramid levels)"
    suffixes = (".ome.tif", ".ome.tiff", *TIFF_SUFFIXES)
    metadata = "physical sizes and units, channel names; `level` option picks a pyramid level"
    options = ("level",)

    def guess_can_open(self, path: str) -> bool:
        if not self.claims_suffix(path) or is_url(path):
            return False
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                return bool(tif.is_ome)
        except Exception:
            return False  # the plain TIFF reader says what is wrong with it

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.ometiff import OmeTiffReader

        return OmeTiffReader(path, item_id, **options)


class TiffBackend(ReaderBackend):
    name = "tiff"
    description = "TIFF image or z-stack (channels from its axes)"
    suffixes = TIFF_SUFFIXES
    metadata = "channel axis (from the file, or `input.options.axes`); no physical size"
    options = ("axes",)

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.image import ImageReader

        return ImageReader(path, item_id, **options)


class PictureBackend(ReaderBackend):
    name = "picture"
    description = "PNG or JPEG picture (told apart by content, not by name)"
    suffixes = (".png", ".jpg", ".jpeg")
    metadata = "channels (grey, RGB, RGBA); no physical size"

    def guess_can_open(self, path: str) -> bool:
        if not self.claims_suffix(path) or is_url(path):
            return self.claims_suffix(path)
        return _starts_with(path, _PNG_MAGIC) or _starts_with(path, _JPEG_MAGIC)

    def open(self, path: str, item_id: str | None = None, **options: Any) -> Reader:
        from segflow.io.image import ImageReader

        return ImageReader(path, item_id)


BUILTIN_BACKENDS: tuple[type[ReaderBackend], ...] = (
    ZarrBackend,
    NiftiBackend,
    NrrdBackend,
    DicomBackend,
    GeoTIFFBackend,
    OmeTiffBackend,
    TiffBackend,
    PictureBackend,
)


def is_georeferenced(path: str) -> bool:
    """Whether a local TIFF has GeoTIFF tags or a world-file / GDAL sidecar."""
    import tifffile

    base = path.rsplit(".", 1)[0]
    if any(os.path.exists(base + s) or os.path.exists(path + s) for s in GEO_SIDECARS):
        return True
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages.first.is_geotiff)
    except Exception as exc:
        raise ItemReadError(
            f"item '{path}': not a readable GeoTIFF/TIFF ({type(exc).__name__}: {exc})"
        ) from exc


def _starts_with(path: str, magic: bytes, *, offset: int = 0) -> bool:
    return read_head(path, offset + len(magic))[offset:] == magic

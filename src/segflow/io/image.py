"""Plain images: TIFF (tifffile) and PNG/JPEG (imageio), read whole and cached per process."""

from __future__ import annotations

import functools
import io

import imageio.v3 as iio
import numpy as np
import tifffile

from segflow.errors import ItemReadError
from segflow.io._common import (
    check_region,
    fingerprint_file,
    is_url,
    mtime_ns,
    raise_read_error,
    read_bytes,
    read_head,
    sanitize_id,
    strip_file_scheme,
    wrap_read_errors,
)
from segflow.io.base import Format, ItemInfo

TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageReader:
    """Reads of a TIFF, PNG or JPEG file as ``(c, (z), y, x)``.

    These formats have no cheap windowed access in general, so the first read decodes the whole
    file (once per process; the four most recent files are cached, keyed by path and
    modification time) and every read slices that array. Axes:

    * TIFF: tifffile's sample (``S``) or channel (``C``) axis is the channel axis; otherwise a
      2-D page is ``(y, x)``, a 3-D array whose last axis has length 3 or 4 is RGB(A)
      ``(y, x, c)``, and any other 3-D array is a stack ``(z, y, x)``.
    * PNG/JPEG: greyscale is ``(y, x)``; grey+alpha, RGB and RGBA put the channels first.

    Spacing is 1.0 and units ``"pixel"``: these formats carry no trustworthy physical size.

    Parameters
    ----------
    path : str
        Local path of a ``.tif``/``.tiff``/``.png``/``.jpg``/``.jpeg`` file.
    item_id : str, optional
        Item id; defaults to the file stem made safe for Zarr.

    Raises
    ------
    ItemReadError
        If the file cannot be decoded or has an unsupported number of dimensions.

    Examples
    --------
    >>> reader = ImageReader("tests/data/nuclei/003cee89357d9fe1/image.png")
    >>> reader.info.axes, reader.info.shape
    (('c', 'y', 'x'), (4, 256, 256))
    >>> reader.read((slice(0, 8), slice(0, 8))).shape
    (4, 8, 8)
    """

    info: ItemInfo

    def __init__(self, path: str, item_id: str | None = None, *, axes: str | None = None) -> None:
        self.path = strip_file_scheme(path)
        lower = self.path.lower()
        if lower.endswith(TIFF_SUFFIXES):
            self.info, self._channel_axis = _read_tiff_info(self.path, item_id, axes)
        elif lower.endswith(PICTURE_SUFFIXES):
            self.info, self._channel_axis = _read_picture_info(self.path, item_id)
        else:
            raise ValueError(
                f"`path` {path!r} must end with one of {TIFF_SUFFIXES + PICTURE_SUFFIXES}"
            )

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``(z), y, x`` order; returns ``(c, *region_shape)``."""
        bounded = check_region(self.info, region)
        with wrap_read_errors(self.path, f"cannot decode {self.info.format.upper()} data"):
            array = _load_channels_first(self.path, mtime_ns(self.path), self._channel_axis)
        return np.array(array[(slice(None), *bounded)])

    def __repr__(self) -> str:
        return f"ImageReader({self.path!r}, item_id={self.info.id!r})"


@functools.lru_cache(maxsize=4)
def _load_channels_first(path: str, mtime: int, channel_axis: int | None) -> np.ndarray:
    """The whole image of ``path`` as ``(c, (z), y, x)``; ``mtime`` keys the cache."""
    if path.lower().endswith(TIFF_SUFFIXES):
        array = np.asarray(tifffile.imread(io.BytesIO(read_bytes(path)) if is_url(path) else path))
    else:
        array = np.asarray(iio.imread(_read_bytes(path), extension=_suffix(path)))
    if channel_axis is None:
        array = array[np.newaxis]
    else:
        array = np.moveaxis(array, channel_axis, 0)
    array = np.ascontiguousarray(array)
    array.flags.writeable = False  # shared by every read in this process
    return array


def _read_tiff_info(
    path: str, item_id: str | None, given: str | None = None
) -> tuple[ItemInfo, int | None]:
    try:
        with tifffile.TiffFile(io.BytesIO(read_bytes(path)) if is_url(path) else path) as tif:
            series = tif.series[0]
            shape = tuple(int(n) for n in series.shape)
            axes = str(series.axes)
            dtype = str(np.dtype(series.dtype))
    except Exception as exc:
        raise_read_error(path, "not a readable TIFF", exc)
    if given is not None:  # `input.options.axes`: the user says what the dimensions are
        axes = _given_axes(path, given, shape)
    channel_axes = [i for i, a in enumerate(axes) if a in "SC"]
    if len(channel_axes) > 1:
        raise_read_error(
            path, f"TIFF axes {axes!r} {shape}", ValueError("more than one channel axis")
        )
    if channel_axes:
        channel_axis: int | None = channel_axes[0]
    elif len(shape) in (3, 4) and shape[-1] in (3, 4):
        channel_axis = len(shape) - 1
    else:
        channel_axis = None
    return _make_info(path, item_id, "tiff", shape, dtype, channel_axis), channel_axis


def _given_axes(path: str, given: str, shape: tuple[int, ...]) -> str:
    """``input.options.axes`` (``"cyx"``, ``"zyx"``, ``"yxc"``...) checked against the
    file's dimensions, in tifffile's letters (C for channels)."""
    letters = given.strip().upper()
    spatial = letters.replace("C", "")
    if (
        len(letters) != len(shape)
        or set(letters) - set("CZYX")
        or len(set(letters)) != len(letters)
        or spatial not in ("YX", "ZYX")
    ):
        raise ItemReadError(
            f"item '{path}': `input.options.axes` {given!r} does not fit the image's "
            f"{len(shape)} dimensions {shape}: give one of c, z, y, x per dimension, the "
            f"spatial ones in z, y, x order, e.g. {'cyx' if len(shape) == 3 else 'czyx'!r}"
        )
    return letters


def _read_picture_info(path: str, item_id: str | None) -> tuple[ItemInfo, int | None]:
    try:
        props = iio.improps(_read_bytes(path), extension=_suffix(path))
    except Exception as exc:
        raise_read_error(path, "not a readable PNG/JPEG image", exc)
    shape = tuple(int(n) for n in props.shape)
    channel_axis = 2 if len(shape) == 3 else None
    fmt: Format = "png" if _suffix(path) == ".png" else "jpeg"
    return _make_info(path, item_id, fmt, shape, str(props.dtype), channel_axis), channel_axis


def _read_bytes(path: str) -> bytes:
    # imageio given a path leaves file handles open when its plugins fail on a broken file;
    # given bytes, nothing is left open. These files are decoded whole anyway.
    return read_bytes(path)


def _suffix(path: str) -> str:
    """The decoder's extension: from the file's first bytes (a JPEG named .png is JPEG),
    else from its name."""
    head = read_head(path, 8)
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    return "." + path.rsplit(".", 1)[-1].lower()


def _make_info(
    path: str,
    item_id: str | None,
    fmt: Format,
    shape: tuple[int, ...],
    dtype: str,
    channel_axis: int | None,
) -> ItemInfo:
    spatial_shape = tuple(n for i, n in enumerate(shape) if i != channel_axis)
    if len(spatial_shape) not in (2, 3):
        raise_read_error(
            path,
            f"image shape {shape} is not supported",
            ValueError("expected 2-D or 3-D spatial data, with at most one channel axis"),
        )
    spatial_axes = ("z", "y", "x")[3 - len(spatial_shape) :]
    if channel_axis is None:
        axes, full_shape = spatial_axes, spatial_shape
    else:
        axes, full_shape = ("c", *spatial_axes), (shape[channel_axis], *spatial_shape)
    stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return ItemInfo(
        id=item_id if item_id is not None else sanitize_id(stem),
        path=path,
        format=fmt,
        shape=full_shape,
        dtype=dtype,
        axes=axes,
        spacing=(1.0,) * len(spatial_shape),
        origin=(0.0,) * len(spatial_shape),
        units="pixel",
        fingerprint=fingerprint_file(path),
    )

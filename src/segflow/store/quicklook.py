"""A quick look at one segmented item: its image, downsampled, with the output's outline.

The input is read in bands of rows and thinned to every ``step``-th pixel on the way, so
the memory held is a band and the small picture, whatever the item's size; the output array
is read from the store the same way. Volumes show their middle ``z`` slice.

A run keeps its quick looks in the store, beside the item's arrays: ``STORE/ITEM/quicklook.png``
(:data:`QUICKLOOK_NAME`; no array takes the name, since ``save_as`` names are identifiers),
written into the staged item before its commit, and links them from its artifacts, so
Prefect's database holds a path, not a picture.
"""

from __future__ import annotations

import math

import numpy as np

from segflow.io.base import Reader

QUICKLOOK_NAME = "quicklook.png"  # STORE/ITEM/quicklook.png
OUTLINE_RGB = (255, 221, 0)  # yellow: visible over grey, RGB and most false colours
BAND_PIXELS = 4_000_000  # input pixels read at once (per channel)


def render_quicklook(
    reader: Reader, store: str, item_id: str, output: str, *, size: int = 256
) -> bytes:
    """A PNG of at most ``size`` pixels on its longer side: the item's image with the
    outline of the output array ``STORE/ITEM_ID/OUTPUT`` (labels, mask or classes) over it.

    The image is every ``step``-th pixel of the item (``step = ceil(longest side / size)``),
    its first three channels as RGB (one channel: grey), each stretched from its 2nd to its
    98th percentile (NaN black). Outline pixels are those whose output value differs from
    the next pixel down or to the right, where either is not background (0).

    Examples
    --------
    >>> import numpy as np, tempfile, zarr
    >>> from segflow.io import ArrayReader
    >>> image = np.zeros((40, 60), np.float32); image[10:20, 10:30] = 1
    >>> store = tempfile.mkdtemp()
    >>> zarr.create_array(f"{store}/tile/labels", data=(image > 0).astype(np.uint8)).shape
    (40, 60)
    >>> png = render_quicklook(ArrayReader(image, "tile"), store, "tile", "labels", size=30)
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    import imageio.v3 as iio

    if size < 1:
        raise ValueError(f"`size` ({size}) must be at least 1 pixel")
    rgb = quicklook_rgb(reader, store, item_id, output, size=size)
    return bytes(iio.imwrite("<bytes>", rgb, extension=".png"))


def write_quicklook(
    reader: Reader, store: str, item_id: str, output: str, *, size: int = 256
) -> tuple[str, int]:
    """Render the item's quick look (:func:`render_quicklook`) into
    ``STORE/ITEM_ID/quicklook.png``; return where it is (an absolute path for a local store,
    else the object's URL) and its size in bytes.

    A run calls it on the item's staged group (``store`` its staging root), before the
    commit: the picture is part of the committed version, which is never written again,
    so a quick look never shows other data than its version's. A local file is written
    under a temporary name and renamed into place (a reader never sees half a PNG).
    """
    import os

    from segflow.store.fs import fresh_fs
    from segflow.store.lock import is_local, local_path

    png = render_quicklook(reader, store, item_id, output, size=size)
    if is_local(store):
        path = os.path.join(os.path.abspath(local_path(store)), item_id, QUICKLOOK_NAME)
        partial = f"{path}.segflow-tmp"
        with open(partial, "wb") as file:
            file.write(png)
        os.replace(partial, path)
        return path, len(png)
    fs, root = fresh_fs(store)
    fs.pipe_file(f"{root.rstrip('/')}/{item_id}/{QUICKLOOK_NAME}", png)
    return f"{str(store).rstrip('/')}/{item_id}/{QUICKLOOK_NAME}", len(png)


def quicklook_rgb(
    reader: Reader, store: str, item_id: str, output: str, *, size: int = 256
) -> np.ndarray:
    """The picture of :func:`render_quicklook` as a ``(y, x, 3)`` uint8 array."""
    import zarr

    spatial = tuple(int(n) for n in reader.info.spatial_shape)
    step = max(1, math.ceil(max(spatial[-2:]) / size))
    middle = (spatial[0] // 2,) if len(spatial) == 3 else ()
    image = _thinned_image(reader, spatial, middle, step)
    array = zarr.open_array(store, path=f"{item_id}/{output}", mode="r")
    values = np.asarray(array[(*middle, slice(None, None, step), slice(None, None, step))])
    rgb = _stretch(image)
    rgb[_outline(values)] = OUTLINE_RGB
    return rgb


def _thinned_image(
    reader: Reader, spatial: tuple[int, ...], middle: tuple[int, ...], step: int
) -> np.ndarray:
    """Every ``step``-th pixel of the item's ``(c, y, x)`` image (of slice ``middle``)."""
    height, width = spatial[-2:]
    band = max(step, BAND_PIXELS // max(width, 1) // step * step)  # a multiple of step
    z = tuple(slice(k, k + 1) for k in middle)
    parts = []
    for top in range(0, height, band):
        block = reader.read((*z, slice(top, min(top + band, height)), slice(0, width)))
        block = block.reshape(block.shape[0], *block.shape[-2:])  # drop the z axis of 1
        parts.append(block[:, ::step, ::step])
    return np.concatenate(parts, axis=1)


def _stretch(image: np.ndarray) -> np.ndarray:
    """``(c, y, x)`` to ``(y, x, 3)`` uint8, each channel from its 2nd to 98th percentile."""
    channels = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, axis=0)
    out = np.zeros((*channels.shape[1:], 3), dtype=np.uint8)
    for k, channel in enumerate(channels.astype(np.float64)):
        finite = channel[np.isfinite(channel)]
        if finite.size == 0:
            continue
        low, high = np.percentile(finite, [2, 98])
        scaled = (channel - low) / (high - low) if high > low else (channel > low) * 1.0
        out[..., k] = np.round(np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1) * 255)
    return out


def _outline(values: np.ndarray) -> np.ndarray:
    """Pixels whose value differs from the next one down or to the right, where either of
    the two is not background."""
    edge = np.zeros(values.shape, dtype=bool)
    down = (values[1:] != values[:-1]) & ((values[1:] != 0) | (values[:-1] != 0))
    right = (values[:, 1:] != values[:, :-1]) & ((values[:, 1:] != 0) | (values[:, :-1] != 0))
    edge[:-1] |= down
    edge[:, :-1] |= right
    return edge

"""Region properties of stitched objects, measured per block and merged without the item.

Each block measures the objects in its core from sums that add up across blocks (pixel count,
coordinate sums, bounding-box extremes, intensity sum/min/max). Objects that do not touch the
block's faces are complete there and are finished on the worker; the partial rows of objects
on the faces (few: they live on block faces) are merged by label on the client. Column names
follow ``skimage.measure.regionprops_table``.

Tolerances: counts, boxes, minima and maxima are exact; centroids are float64 sums of the
same values in another order (relative 1e-12 against scikit-image in the tests). Intensity
means are float64 sums here, while scikit-image averages in the input's dtype: for float32
images they agree to float32 rounding (relative 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segflow.stitch.labels import Box, block_faces


@dataclass
class RegionPartial:
    """Additive measurements of objects (one row per final label), possibly partial."""

    label: np.ndarray  # (m,) int64
    count: np.ndarray  # (m,) int64
    coord_sum: np.ndarray  # (m, ndim) float64, item pixel coordinates
    bbox_min: np.ndarray  # (m, ndim) int64
    bbox_max: np.ndarray  # (m, ndim) int64, exclusive
    intensity_sum: np.ndarray | None = None  # (m, c) float64
    intensity_min: np.ndarray | None = None
    intensity_max: np.ndarray | None = None
    class_value: np.ndarray | None = None  # (m,) int64, for components per class

    def take(self, rows: np.ndarray) -> RegionPartial:
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return RegionPartial(
            self.label[rows],
            self.count[rows],
            self.coord_sum[rows],
            self.bbox_min[rows],
            self.bbox_max[rows],
            pick(self.intensity_sum),
            pick(self.intensity_min),
            pick(self.intensity_max),
            pick(self.class_value),
        )


def measure_regions(
    dense: np.ndarray,
    finals: np.ndarray,
    box: Box,
    intensity: np.ndarray | None = None,
    classes: np.ndarray | None = None,
) -> tuple[RegionPartial, np.ndarray]:
    """Measure a block's objects.

    Parameters
    ----------
    dense
        The block core's labels as dense local numbers ``0..n`` (0 = background).
    finals
        ``(n + 1,)`` final label of each local number (0 = dropped).
    box
        The core in item coordinates.
    intensity
        ``(c, *core)`` values to summarise per object, or ``None``.
    classes
        The class map of the core (components per class), or ``None``.

    Returns
    -------
    (RegionPartial, numpy.ndarray)
        Rows by final label, and a boolean per row: true where the object touches the
        block's faces (its row may be partial).
    """
    n = len(finals) - 1
    count, coord_sum, bbox_min, bbox_max = _run_measures(dense, n, box)
    flat = dense.ravel()
    where = local = None
    if intensity is not None or classes is not None:
        where = np.flatnonzero(flat)
        local = flat[where]
    sums = lows = highs = None
    if intensity is not None:
        assert where is not None and local is not None
        values = intensity.reshape(intensity.shape[0], -1)[:, where].astype(np.float64)
        sums = np.stack([np.bincount(local, weights=v, minlength=n + 1) for v in values], 1)
        lows = np.full((n + 1, len(values)), np.inf)
        highs = np.full((n + 1, len(values)), -np.inf)
        for c, v in enumerate(values):
            np.minimum.at(lows[:, c], local, v)
            np.maximum.at(highs[:, c], local, v)
    class_value = None
    if classes is not None:
        assert where is not None and local is not None
        class_value = np.zeros(n + 1, dtype=np.int64)
        class_value[local] = classes.ravel()[where]  # one class per component
    partial = RegionPartial(
        finals.astype(np.int64), count, coord_sum, bbox_min, bbox_max, sums, lows, highs,
        class_value,
    )  # fmt: skip
    present = (count > 0) & (finals > 0)
    present[0] = False
    on_faces = np.zeros(n + 1, dtype=bool)
    for first, last in block_faces(dense):
        on_faces[first] = True
        on_faces[last] = True
    rows = merge_rows([partial.take(np.flatnonzero(present))])
    touching = np.isin(rows.label, finals[on_faces & present])
    return rows, touching


def _run_measures(
    dense: np.ndarray, n: int, box: Box
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count, coordinate sums and bounding box of labels ``0..n``, from runs.

    A run is a stretch of equal labels along the last axis; there are far fewer runs than
    pixels, and each run adds to its label's count, coordinate sums and box in closed form
    (measured on 2048^2 blobs: 4x faster than per-pixel weighted bincounts).
    """
    ndim = dense.ndim
    width = dense.shape[-1]
    rows = dense.reshape(-1, width)
    change = np.empty(rows.shape, dtype=bool)
    change[:, 0] = True
    np.not_equal(rows[:, 1:], rows[:, :-1], out=change[:, 1:])
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], rows.size)  # every row starts a run: runs never wrap
    label = rows.ravel()[starts]
    keep = label != 0
    starts, ends, label = starts[keep], ends[keep], label[keep].astype(np.intp)
    length = ends - starts
    row, first = np.divmod(starts, width)
    last = first + length  # exclusive
    leading = np.unravel_index(row, dense.shape[:-1]) if ndim > 1 else ()
    count = np.bincount(label, weights=length, minlength=n + 1).astype(np.int64)
    coord_sum = np.empty((n + 1, ndim))
    bbox_min = np.full((n + 1, ndim), np.iinfo(np.int64).max, dtype=np.int64)
    bbox_max = np.zeros((n + 1, ndim), dtype=np.int64)
    for axis, coordinate in enumerate(leading):
        coord_sum[:, axis] = np.bincount(label, weights=length * coordinate, minlength=n + 1)
        np.minimum.at(bbox_min[:, axis], label, coordinate)
        np.maximum.at(bbox_max[:, axis], label, coordinate + 1)
    # sum of first .. last - 1 = length * first + length * (length - 1) / 2
    inside = length * first + length * (length - 1) // 2
    coord_sum[:, -1] = np.bincount(label, weights=inside, minlength=n + 1)
    np.minimum.at(bbox_min[:, -1], label, first)
    np.maximum.at(bbox_max[:, -1], label, last)
    offset = np.array([b.start for b in box], dtype=np.int64)
    coord_sum += count[:, np.newaxis] * offset
    present = count > 0
    bbox_min[present] += offset
    bbox_max[present] += offset
    bbox_min[~present] = 0
    return count, coord_sum, bbox_min, bbox_max


def merge_rows(parts: Sequence[RegionPartial]) -> RegionPartial:
    """Combine rows with the same label (parts of one object), sorted by label."""
    parts = [p for p in parts if len(p.label)] or list(parts[:1])
    if not parts:
        raise ValueError("merge_rows needs at least one part")

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    label = np.concatenate([p.label for p in parts])
    labels, group = np.unique(label, return_inverse=True)
    m = len(labels)

    def reduce(values: np.ndarray | None, how: np.ufunc, start: float) -> np.ndarray | None:
        if values is None:
            return None
        out = np.full((m, *values.shape[1:]), start, dtype=values.dtype)
        how.at(out, group, values)
        return out

    count = reduce(cat("count"), np.add, 0)
    coord_sum = reduce(cat("coord_sum"), np.add, 0.0)
    bbox_min = reduce(cat("bbox_min"), np.minimum, np.iinfo(np.int64).max)
    bbox_max = reduce(cat("bbox_max"), np.maximum, 0)
    assert count is not None and coord_sum is not None
    assert bbox_min is not None and bbox_max is not None
    return RegionPartial(
        labels,
        count,
        coord_sum,
        bbox_min,
        bbox_max,
        reduce(cat("intensity_sum"), np.add, 0.0),
        reduce(cat("intensity_min"), np.minimum, np.inf),
        reduce(cat("intensity_max"), np.maximum, -np.inf),
        reduce(cat("class_value"), np.maximum, 0),
    )


def region_columns(
    rows: RegionPartial,
    *,
    spacing: Sequence[float],
    origin: Sequence[float],
    ellipsoid: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """The finished table: ``regionprops_table`` names plus physical and world columns.

    ``area_physical`` is in the item's units to the power of its dimensionality;
    ``centroid_world-i`` is the centre in the item's coordinates (CRS units or millimetres),
    ``origin + centroid * spacing``, as in the labels' coordinate variables. For a 2-D
    item in a geographic CRS (degrees), ``ellipsoid`` (semi-major axis in metres, inverse
    flattening) adds ``area_m2``: :func:`geodesic_cell_area` at each object's centroid
    latitude times its pixel count.
    """
    ndim = rows.coord_sum.shape[1]
    count = rows.count.astype(np.float64)
    spacing = tuple(float(s) for s in spacing) or (1.0,) * ndim
    origin = tuple(float(o) for o in origin) or (0.0,) * ndim
    columns: dict[str, np.ndarray] = {"label": rows.label.astype(np.int64)}
    if rows.class_value is not None:
        columns["class"] = rows.class_value
    columns["area"] = rows.count.astype(np.int64)
    columns["area_physical"] = count * math.prod(abs(s) for s in spacing)
    for axis in range(ndim):
        columns[f"bbox-{axis}"] = rows.bbox_min[:, axis]
    for axis in range(ndim):
        columns[f"bbox-{ndim + axis}"] = rows.bbox_max[:, axis]
    centroid = rows.coord_sum / count[:, np.newaxis] if len(count) else rows.coord_sum
    for axis in range(ndim):
        columns[f"centroid-{axis}"] = centroid[:, axis]
    for axis in range(ndim):
        columns[f"centroid_world-{axis}"] = origin[axis] + centroid[:, axis] * spacing[axis]
    if ellipsoid is not None and ndim == 2:
        latitude = columns["centroid_world-0"]
        cell = geodesic_cell_area(latitude, abs(spacing[0]), abs(spacing[1]), *ellipsoid)
        columns["area_m2"] = count * cell
    columns["equivalent_diameter_area"] = (2 * ndim * count / math.pi) ** (1 / ndim)
    if rows.intensity_sum is not None:
        assert rows.intensity_min is not None and rows.intensity_max is not None
        channels = rows.intensity_sum.shape[1]
        mean = rows.intensity_sum / np.maximum(count, 1)[:, np.newaxis]
        for name, values in (
            ("intensity_mean", mean),
            ("intensity_min", rows.intensity_min),
            ("intensity_max", rows.intensity_max),
        ):
            for c in range(channels):
                columns[name if channels == 1 else f"{name}-{c}"] = values[:, c]
    return columns


def geodesic_cell_area(
    latitude: np.ndarray,
    dlat: float,
    dlon: float,
    semi_major: float = 6378137.0,
    inverse_flattening: float = 298.257223563,
) -> np.ndarray:
    """Area in m^2 of a ``dlat`` x ``dlon`` degree cell centred at ``latitude``, on the
    ellipsoid (WGS 84 by default): the zone between its two latitudes, exactly
    (the authalic-latitude formula), times its share of the longitudes.

    An object's area from this at its centroid latitude differs from the sum over its
    rows by the curvature of the cosine: under 1e-6 relative for objects less than
    0.1 degree tall.

    Examples
    --------
    >>> round(float(geodesic_cell_area(np.array([0.0]), 1.0, 1.0)[0]) / 1e6)  # km^2
    12309
    """
    flattening = 1.0 / inverse_flattening
    e2 = flattening * (2 - flattening)
    e = math.sqrt(e2)

    def q(phi: np.ndarray) -> np.ndarray:
        s = np.sin(phi)
        return s / (1 - e2 * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)

    lat = np.radians(np.asarray(latitude, dtype=np.float64))
    half = math.radians(dlat) / 2
    zone = semi_major**2 * (1 - e2) / 2 * (q(lat + half) - q(lat - half))
    return np.abs(zone) * math.radians(dlon)

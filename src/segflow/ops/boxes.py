"""Boxes to masks: each box of a boxes file becomes at most one object inside it.

Items are 2-D (boxes ``x, y``) or 3-D (boxes ``x, y, z`` over axes ``(z, y, x)``); every step
below is the same in both, with voxels for pixels: the margin ring is a shell, the middle
third a box, the Sobel gradient 3-D, the inscribed ellipse an ellipsoid.

Every box is worked on alone, in its *window*: the box grown by ``margin`` pixels and
clipped to the item (the margin is the background the box's border shows). The object is a
pure function of the window's pixels, and each of its pixels gets a *claim*; where objects
of overlapping boxes meet, each pixel goes to the box whose object claims it most strongly
(ties: the earlier box). A block computes every box whose window lies inside its own window,
so the step's halo is the largest box's extent plus the margin: every box that holds a pixel
of the block's core is computed whole, as it is on the whole item, and boxes spanning
blocks come out the same in each.

Methods (``method``):

``threshold`` (the default, no parameters to set)
    The window's pixels are projected onto the colour direction from the background (the
    median of the margin ring outside the box) to the box's centre (the mean of its middle
    third per axis): bright nuclei on dark, dark nuclei on bright and coloured objects all become
    "higher inside". The threshold lies ``level`` of the way from the window's 5th
    percentile to its Otsu threshold (measured on DSB2018 fluorescence nuclei: Otsu itself,
    ``level = 1``, cuts nuclei narrower than people draw them); the object is the largest
    component above it in the box, holes filled. Its claim is the closeness to the box's
    centre (1 at the centre, 0 on the ellipse, or ellipsoid, inscribed in the box).
``watershed``
    A seeded watershed of the projection's Sobel gradient in the window: the margin ring is
    the background seed, the box's middle third above the ``threshold`` method's level the
    object seed (the centre pixel if none is). Claim as ``threshold``.
``probability``
    A box-prompted crop of a probability map made by an earlier step (a model's
    ``output: probabilities`` or ``foreground``): the object is the largest component of the
    box where the object's probability exceeds ``threshold``; the probability is its claim.

Object ids follow the boxes' order: id ``k`` is the item's ``k``-th box in file order; a
box that yields nothing leaves its id unused. When the step ends the pipeline, the region
table carries each object's box: ``box_row`` (its row in the file: the CSV's data row, the
GeoJSON feature's or COCO annotation's index) and ``box_label``. With ``output:
classes`` the step writes each object's class instead (``1 +`` the place of the box's label
among the file's sorted labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from scipy import ndimage as ndi
from skimage.filters import sobel, threshold_otsu
from skimage.segmentation import watershed as _watershed

from segflow.engine.blocks import Box, relative
from segflow.io.boxes import ItemBoxes, item_boxes, read_boxes, unlocated_rows, unmatched_rows
from segflow.ops.registry import Categories, OpContext, Operation, OpParams, register


class InlineBox(OpParams):
    """A box given in the config (pixels): ``x`` columns, ``y`` rows, edges between pixels;
    ``zmin, zmax`` (planes, the first axis) for a 3-D item."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    zmin: float | None = None
    zmax: float | None = None
    label: str = "object"

    @model_serializer(mode="wrap")
    def _without_unset_depth(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A 2-D box dumps (and hashes) as it did before 3-D boxes existed.
        data = handler(self)
        if self.zmin is None:
            data.pop("zmin", None)
            data.pop("zmax", None)
        return data


class FromBoxesParams(OpParams):
    boxes: str | tuple[InlineBox, ...] = Field(
        description="a boxes file (CSV image_path,xmin,ymin,xmax,ymax[,label], with zmin,zmax "
        "for 3-D items; GeoJSON of "
        "rectangles, with an image_path property or matched to items by location; COCO JSON "
        "bbox annotations), or boxes "
        "given inline in pixels (every item gets them)"
    )
    method: Literal["threshold", "watershed", "probability"] = Field(
        "threshold",
        description="threshold: per-box threshold against the margin's background; "
        "watershed: seeded watershed of the gradient; probability: the box's crop of a "
        "probability map from an earlier step",
    )
    margin: int = Field(
        4, ge=1, description="pixels around each box read as its background (part of the halo)"
    )
    level: float = Field(
        0.75,
        gt=0,
        le=1,
        description="threshold and watershed: the threshold's place between the window's 5th "
        "percentile (0) and its Otsu threshold (1)",
    )
    fit: Literal["level", "box"] = Field(
        "level",
        description="threshold: level cuts every box at `level`; box chooses each box's cut "
        "among levels 0.4-1.0 so that its object spans its box (ties: the cut nearest "
        "`level`), for boxes drawn tight around their objects",
        json_schema_extra={"hash_when_set": True},
    )
    threshold: float = Field(
        0.5, ge=0, le=1, description="probability: the object's pixels are above this"
    )
    channel: int | None = Field(
        None,
        ge=0,
        description="probability: the channel holding the object's probability (null: 1 - "
        "channel 0 when there are several, the only channel otherwise)",
    )
    coordinates: Literal["auto", "pixel", "crs"] = Field(
        "auto",
        description="the boxes' coordinates (auto: CRS for a GeoJSON on a georeferenced item, "
        "else pixels)",
    )
    crs: str | None = Field(
        None,
        description="the CRS of boxes in CRS coordinates, e.g. EPSG:4326 (null: the GeoJSON's "
        "`crs` member, else the item's own CRS); boxes in another CRS are reprojected",
        json_schema_extra={"hash_when_set": True},
    )
    output: Literal["instances", "classes"] = Field(
        "instances", description="instances: ids in box order; classes: each object's class"
    )
    _item: ItemBoxes | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _fit_needs_threshold(self) -> FromBoxesParams:
        if self.fit == "box" and self.method != "threshold":
            raise ValueError(
                f"`fit: box` chooses the threshold method's cut; method is {self.method!r}"
            )
        return self

    @field_validator("crs")
    @classmethod
    def _known_crs(cls, value: str | None) -> str | None:
        if value is not None:
            from rasterio.crs import CRS
            from rasterio.errors import CRSError

            try:
                CRS.from_user_input(value)
            except CRSError as error:
                raise ValueError(f"{value!r} is not a CRS rasterio knows ({error})") from None
        return value


def boxes_for_item(params: FromBoxesParams, info: Any) -> FromBoxesParams:
    """The step's parameters with the item's boxes in pixels (``for_item``)."""
    shape = tuple(int(n) for n in info.spatial_shape)
    if len(shape) not in (2, 3):
        raise ValueError(
            f"from_boxes works on 2-D and 3-D items, item {info.id!r} is {len(shape)}-D"
        )
    if isinstance(params.boxes, str):
        table = read_boxes(params.boxes)
        geo = len(shape) == 2 and (
            params.coordinates == "crs"
            or (params.coordinates == "auto" and table.kind == "geojson")
        )
        if params.coordinates == "crs" and (info.transform is None or len(shape) != 2):
            what = "is 3-D" if len(shape) != 2 else "has no CRS transform"
            raise ValueError(f"`coordinates: crs` but item {info.id!r} {what}")
        found = item_boxes(
            table,
            item_id=info.id,
            item_path=info.path,
            shape=shape,
            transform=info.transform if geo else None,
            crs=params.crs or table.crs,
            item_crs=info.crs_wkt,
        )
    else:
        found = _inline(params.boxes, info.id, shape)
    out = params.model_copy()
    out._item = found
    return out


def _inline(boxes: Sequence[InlineBox], item_id: str, shape: tuple[int, ...]) -> ItemBoxes:
    from segflow.io.boxes import BoxTable

    coords = np.array([[b.xmin, b.ymin, b.xmax, b.ymax] for b in boxes], dtype=np.float64)
    for k, b in enumerate(boxes):
        if (b.zmin is None) != (b.zmax is None):
            raise ValueError(
                f"inline boxes: box {k} has zmin {b.zmin} and zmax {b.zmax}; a 3-D box needs "
                "both, a 2-D box neither"
            )
    flat = [b.zmin is None for b in boxes]
    if any(flat) and not all(flat):
        raise ValueError(
            f"inline boxes: box {flat.index(True)} has no zmin, zmax and box "
            f"{flat.index(False)} has them; give every box both or none"
        )
    deep = (boxes and not flat[0]) or (not boxes and len(shape) == 3)
    z = np.array([[b.zmin, b.zmax] for b in boxes], dtype=np.float64).reshape(-1, 2)
    table = BoxTable(
        "inline boxes",
        (item_id,) * len(boxes),
        coords.reshape(-1, 4),
        tuple(b.label for b in boxes),
        tuple(range(len(boxes))),
        z=z if deep else None,
    )
    from segflow.io.boxes import _check_areas

    _check_areas(table)
    return item_boxes(table, item_id=item_id, item_path=item_id, shape=shape)


def _boxes_of(params: FromBoxesParams) -> ItemBoxes:
    if params._item is None:
        raise ValueError("from_boxes: the boxes are not matched to an item yet")
    return params._item


def boxes_halo(params: FromBoxesParams, ndim: int) -> tuple[int, ...]:
    """The largest box's extent plus the margin, per axis (0 for an item without boxes)."""
    found = _boxes_of(params)
    if not len(found):
        return (0,) * ndim
    return tuple(n + params.margin for n in found.extent())


def objects_from_boxes(image: np.ndarray, params: FromBoxesParams, ctx: OpContext) -> np.ndarray:
    """Each pixel's box id (``1 +`` the box's place in the item; 0: no box's object), or
    its class with ``output: classes``; see the module docstring."""
    found = _boxes_of(params)
    window = ctx.box
    ids = np.zeros(image.shape[1:], dtype=np.uint32)
    best = np.full(image.shape[1:], -np.inf)
    for k in _boxes_in(found.boxes, window, params.margin, ctx.shape):
        box = _box(found.boxes[k])
        region = _grow(box, params.margin, ctx.shape)
        data = image[(slice(None), *relative(region, window))]
        mask, claim = box_object(data, relative(box, region), params)
        inside = relative(box, window)
        strength = np.where(mask, claim, -np.inf)
        wins = strength > best[inside]
        best[inside] = np.where(wins, strength, best[inside])
        ids[inside] = np.where(wins, np.uint32(k + 1), ids[inside])
    if params.output == "classes":
        table = np.array((0, *found.classes), dtype=np.uint16)
        return table[ids][np.newaxis]
    return ids[np.newaxis]


def _box(row: np.ndarray) -> Box:
    n = len(row) // 2
    return tuple(slice(int(row[i]), int(row[i + n])) for i in range(n))


def _grow(box: Box, margin: int, shape: tuple[int, ...]) -> Box:
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n))
        for s, n in zip(box, shape, strict=True)
    )


def _boxes_in(boxes: np.ndarray, window: Box, margin: int, shape: tuple[int, ...]) -> np.ndarray:
    """The boxes whose own window (grown by ``margin``, clipped) lies inside ``window``."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    n = boxes.shape[1] // 2
    low = np.maximum(boxes[:, :n] - margin, 0)
    high = np.minimum(boxes[:, n:] + margin, np.asarray(shape))
    starts = np.array([s.start for s in window])
    stops = np.array([s.stop for s in window])
    inside = np.all(low >= starts, axis=1) & np.all(high <= stops, axis=1)
    return np.flatnonzero(inside)


def box_object(
    data: np.ndarray, inner: Box, params: FromBoxesParams
) -> tuple[np.ndarray, np.ndarray]:
    """One box's object (a mask over the box) and each of its pixels' claim, from the
    box's window ``data`` (``(c, (z), y, x)``); ``inner`` is the box within the window."""
    if params.method == "probability":
        probability = _object_probability(data, params.channel)[inner]
        return _one_object(probability > params.threshold), probability
    values = project_to_object(data.astype(np.float64), inner)
    if params.fit == "box":
        mask = _box_filling_object(values, inner, params.level)
    elif params.method == "threshold":
        mask = _one_object(values[inner] > window_level(values, params.level))
    else:
        mask = _seeded_watershed(values, inner, window_level(values, params.level))
    return mask, centre_closeness(mask.shape)


# The cuts ``fit: box`` tries per box (places between the 5th percentile and Otsu).
FIT_LEVELS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _box_filling_object(values: np.ndarray, inner: Box, level: float) -> np.ndarray:
    """The object of the cut among :data:`FIT_LEVELS` whose object's bounding box fills
    most of the box (the box drawn tight around its object); ties: the cut nearest
    ``level``, then the lower."""
    box_size = float(np.prod([s.stop - s.start for s in inner]))
    best_filled, best = -1.0, np.zeros(values[inner].shape, dtype=bool)
    for candidate in sorted(FIT_LEVELS, key=lambda v: (abs(v - level), v)):
        mask = _one_object(values[inner] > window_level(values, candidate))
        spans = ndi.find_objects(mask.astype(np.uint8))
        filled = float(np.prod([s.stop - s.start for s in spans[0]])) / box_size if spans else 0
        if filled > best_filled:
            best_filled, best = filled, mask
    return best


def project_to_object(window: np.ndarray, inner: Box) -> np.ndarray:
    """The window's pixels projected onto the colour direction from the background (the
    median outside the box) to the box's middle third (its mean)."""
    channels = window.shape[0]
    ring = np.ones(window.shape[1:], dtype=bool)
    ring[inner] = False
    pixels = window[:, ring] if ring.any() else window.reshape(channels, -1)
    background = np.median(pixels, axis=1)
    centre = window[(slice(None), *_middle(inner))].reshape(channels, -1).mean(axis=1)
    direction = centre - background
    norm = float(np.sqrt(np.sum(direction * direction)))
    if norm == 0:
        direction, norm = np.ones(channels), float(np.sqrt(channels))
    return np.tensordot(direction / norm, window, axes=1)


def _middle(inner: Box) -> Box:
    """The middle third of a box (at least one pixel per axis)."""
    out = []
    for s in inner:
        n = s.stop - s.start
        out.append(slice(s.start + n // 3, s.start + max(n - n // 3, n // 3 + 1)))
    return tuple(out)


def window_level(values: np.ndarray, level: float) -> float:
    """``level`` of the way from the 5th percentile to the Otsu threshold (``inf`` when
    the window is flat: no object)."""
    if np.ptp(values) == 0:
        return float("inf")
    low = float(np.percentile(values, 5))
    # flattened: the histogram is the same, and a 3-D window ending in 3 or 4 voxels is not
    # taken for an RGB image (scikit-image warns then)
    return low + level * (float(threshold_otsu(values.ravel())) - low)


def _one_object(mask: np.ndarray) -> np.ndarray:
    """The largest component of ``mask`` (ties: the first in scan order), holes filled."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(labels == int(np.argmax(sizes)))


def _seeded_watershed(values: np.ndarray, inner: Box, cut: float) -> np.ndarray:
    markers = np.ones(values.shape, dtype=np.int8)
    markers[inner] = 0
    middle = _middle(inner)
    seed = np.zeros(values.shape, dtype=bool)
    seed[middle] = values[middle] > cut
    if not seed.any():
        seed[tuple((s.start + s.stop - 1) // 2 for s in inner)] = True
    markers[seed] = 2
    flooded = _watershed(sobel(values), markers)
    return _one_object(flooded[inner] == 2)


def centre_closeness(shape: tuple[int, ...]) -> np.ndarray:
    """1 at the box's centre, 0 on the ellipse (3-D: ellipsoid) inscribed in it, negative in
    its corners."""
    axes = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    squares = grids[0] * grids[0]
    for grid in grids[1:]:  # summed in axis order: 2-D claims are yy*yy + xx*xx, as before
        squares = squares + grid * grid
    return 1.0 - np.sqrt(squares)


def _object_probability(data: np.ndarray, channel: int | None) -> np.ndarray:
    if channel is not None:
        return data[channel].astype(np.float64)
    if data.shape[0] == 1:
        return data[0].astype(np.float64)
    return 1.0 - data[0].astype(np.float64)


def _check_probability_channel(params: FromBoxesParams, channels: int) -> str | None:
    if params.method == "probability" and params.channel is not None and params.channel >= channels:
        return f"`channel` ({params.channel}) must be below the input's {channels} channels"
    return None


def _categories(params: FromBoxesParams) -> Categories:
    if params.output != "classes" or params._item is None:
        return ()
    return tuple((i + 1, name, None) for i, name in enumerate(params._item.class_names))


def boxes_not_in_collection(params: FromBoxesParams, infos: Sequence[Any]) -> list[str]:
    """The boxes file's image paths that name no item of the collection (or several), and
    the boxes matched by location that overlap no item."""
    if not isinstance(params.boxes, str):
        return []
    table = read_boxes(params.boxes)
    items = [(str(info.id), str(info.path)) for info in infos]
    lines = unmatched_rows(table, items)
    if len(table.by_location) and params.coordinates != "pixel":
        lines += unlocated_rows(table, infos, params.crs or table.crs)
    return lines


def _box_columns(params: FromBoxesParams) -> dict[str, np.ndarray]:
    """``box_row`` (the box's row in its file) and ``box_label`` by object id."""
    if params.output != "instances" or params._item is None:
        return {}
    found = params._item
    rows = np.array((-1, *found.rows), dtype=np.int64)
    labels = np.array(("", *found.labels), dtype=object).astype(str)
    return {"box_row": rows, "box_label": labels}


def _dtype(params: FromBoxesParams, dtype: np.dtype) -> np.dtype:
    return np.dtype(np.uint32 if params.output == "instances" else np.uint16)


register(
    Operation(
        name="from_boxes",
        kind="local",
        params=FromBoxesParams,
        apply=objects_from_boxes,
        summary="boxes (CSV, GeoJSON, COCO) to masks: at most one object per box, inside it; "
        "ids in box order; overlaps to the strongest claim; exact across blocks",
        halo=boxes_halo,
        halo_rule="the largest box's extent + margin",
        out_channels=lambda p, channels: 1,
        out_dtype=_dtype,
        check_channels=_check_probability_channel,
        ndims=(2, 3),
        makes_labels=lambda p: p.output == "instances",
        for_item=boxes_for_item,
        check_collection=boxes_not_in_collection,
        categories=_categories,
        region_extras=_box_columns,
    )
)

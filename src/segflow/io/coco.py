"""COCO JSON annotations as references: polygons and RLE masks, read window by window.

COCO (and CVAT's and Label Studio's COCO exports) describe each object of an image as an
annotation with a ``segmentation``: a list of polygons (``[x1, y1, x2, y2, ...]`` in
pixel-corner coordinates: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``;
every ring is filled, so a polygon has no hole) or a run-length encoded mask
(``{"size": [height, width], "counts": ...}``: runs of 0s and 1s alternating, starting with
0s, over the image in column-major order; ``counts`` a list, or the compressed string of
pycocotools). Both are decoded here without pycocotools.

A polygon covers the pixels whose centre lies inside it (GDAL's rasteriser, as for GeoJSON
references); pycocotools' own rasteriser can differ along the boundary. Where annotations
overlap, the later one wins. ``iscrowd`` annotations count as objects (CVAT writes masks as
``iscrowd: 1`` RLE).

Images are matched to items by ``segflow_item`` (written by ``segflow export``), else by the
longest trailing part of the item's source path that equals the image's ``file_name``, else
by the file name alone where one image has it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from segflow.errors import EvaluationError
from segflow.io.base import ItemInfo

# Names shown in a line about images not in the collection before the rest are counted.
NAMES_SHOWN = 5


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    height: int
    width: int
    segflow_item: str | None


@dataclass(frozen=True)
class CocoFile:
    """A parsed COCO file: its images, their annotations in file order, its categories."""

    path: str
    images: tuple[CocoImage, ...]
    annotations: Mapping[int, tuple[Mapping[str, Any], ...]]
    categories: Mapping[int, str]


def is_coco(path: str) -> bool:
    """Whether ``path`` is a COCO JSON file (a ``.json`` object with ``images`` and
    ``annotations``), not GeoJSON."""
    if not path.lower().endswith(".json") or not Path(path).is_file():
        return False
    try:
        document = _read_json(path, Path(path).stat().st_mtime_ns)
    except ValueError:
        return False
    return isinstance(document, dict) and {"images", "annotations"} <= document.keys()


@functools.lru_cache(maxsize=8)
def _read_json(path: str, mtime_ns: int) -> Any:
    """The parsed file (cached by path and modification time: every item reads it)."""
    del mtime_ns  # part of the cache key only
    return json.loads(Path(path).read_text())


def load_coco(path: str) -> CocoFile:
    """Parse a COCO file.

    Raises
    ------
    EvaluationError
        When an image lacks ``id``, ``file_name``, ``width`` or ``height``, or an
        annotation names an image the file does not have.
    """
    document = _read_json(path, Path(path).stat().st_mtime_ns)
    try:
        images = tuple(
            CocoImage(
                int(i["id"]),
                str(i["file_name"]),
                int(i["height"]),
                int(i["width"]),
                i.get("segflow_item"),
            )
            for i in document["images"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise EvaluationError(
            f"COCO file '{path}': an image lacks id, file_name, width or height ({error})"
        ) from None
    known = {i.id for i in images}
    grouped: dict[int, list[Mapping[str, Any]]] = {i: [] for i in known}
    for annotation in document["annotations"]:
        image_id = int(annotation.get("image_id", -1))
        if image_id not in known:
            raise EvaluationError(
                f"COCO file '{path}': annotation {annotation.get('id')} names image_id "
                f"{image_id}, which the file's images do not have"
            )
        grouped[image_id].append(annotation)
    categories = {int(c["id"]): str(c.get("name", c["id"])) for c in document.get("categories", [])}
    return CocoFile(path, images, {k: tuple(v) for k, v in grouped.items()}, categories)


def match_image(coco: CocoFile, item_id: str, source: str) -> CocoImage | None:
    """The image of ``coco`` that is item ``item_id`` (its source file ``source``): the one
    tagged with the item id, else the one whose ``file_name`` is the longest trailing part
    of ``source``, else the only one with the same file name in another folder.

    Raises
    ------
    EvaluationError
        When several images match equally well (the same file name twice).

    Examples
    --------
    >>> images = (CocoImage(1, "a/image.png", 4, 4, None), CocoImage(2, "b/image.png", 4, 4, None))
    >>> coco = CocoFile("c.json", images, {}, {})
    >>> match_image(coco, "b", "/data/b/image.png").id
    2
    >>> match_image(coco, "c", "/data/c/other.png") is None
    True
    """
    tagged = [i for i in coco.images if i.segflow_item == item_id]
    if tagged:
        return tagged[0]
    parts = PurePosixPath(source.replace("\\", "/")).parts
    scored = [(_common_tail(parts, i.file_name), i) for i in coco.images]
    best = max((n for n, _ in scored), default=0)
    found = [i for n, i in scored if n == best and n > 0]
    if not found and parts:  # another folder, the same file name (CVAT's task folders)
        found = [i for i in coco.images if _name(i.file_name) == parts[-1]]
    if len(found) > 1:
        names = ", ".join(repr(i.file_name) for i in found[:NAMES_SHOWN])
        raise EvaluationError(
            f"item {item_id!r}: {len(found)} images of COCO file '{coco.path}' match its source "
            f"'{source}' ({names}): give the images distinct file names (with their folders)"
        )
    return found[0] if found else None


def _name(file_name: str) -> str:
    return PurePosixPath(file_name.replace("\\", "/")).name


def _common_tail(parts: Sequence[str], file_name: str) -> int:
    """How many trailing path parts of ``file_name`` equal those of ``parts`` (0 unless
    the whole of ``file_name`` does)."""
    name = PurePosixPath(file_name.replace("\\", "/")).parts
    if len(name) > len(parts) or tuple(parts[len(parts) - len(name) :]) != tuple(name):
        return 0
    return len(name)


def unmatched_images(coco: CocoFile, items: Sequence[tuple[str, str]]) -> list[str]:
    """File names of ``coco``'s images that none of ``items`` ``(id, source)`` is."""
    used = {m.id for item_id, source in items if (m := match_image(coco, item_id, source))}
    return [i.file_name for i in coco.images if i.id not in used]


def unmatched_line(path: str, names: Sequence[str]) -> str:
    """One line naming the images of COCO file ``path`` that are not in the collection.

    Examples
    --------
    >>> unmatched_line("refs.json", ["a.png", "b.png"])
    "COCO file 'refs.json': 2 image(s) not in the collection: a.png, b.png"
    """
    shown = ", ".join(names[:NAMES_SHOWN])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f"COCO file '{path}': {len(names)} image(s) not in the collection: {shown}{more}"


def decode_counts(text: str) -> list[int]:
    """The run lengths of pycocotools' compressed RLE string (``rleFrString``): 5 bits
    per character (offset 48), a continuation bit, a sign bit, and from the third run on
    the difference from the run two before.

    Examples
    --------
    >>> decode_counts("1232O")  # pycocotools' string of 0 1 1 0 0 0 1 1 1 1 0 0
    [1, 2, 3, 4, 2]
    """
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            p += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_rle(mask: np.ndarray, offset: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """Uncompressed COCO RLE counts of a mask placed at ``offset`` (row, col) in an image
    of ``size`` (height, width).

    Examples
    --------
    >>> encode_rle(np.array([[1], [1]], bool), (1, 0), (3, 2))
    [1, 2, 3]
    """
    height, width = size
    rows, cols = np.nonzero(np.asarray(mask, bool).T)[::-1]  # column-major order
    index = (cols + offset[1]).astype(np.int64) * height + rows + offset[0]
    if not len(index):
        return [height * width]
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts = index[np.r_[0, breaks + 1]]
    ends = index[np.r_[breaks, len(index) - 1]] + 1
    zeros = starts - np.r_[0, ends[:-1]]
    counts = np.column_stack([zeros, ends - starts]).ravel().tolist()
    tail = height * width - int(ends[-1])
    return [int(c) for c in counts] + ([tail] if tail else [])


def rle_segments(counts: Sequence[int], height: int) -> np.ndarray:
    """The runs of 1s of RLE ``counts`` (image ``height`` rows) cut at column ends:
    ``(n, 3)`` int64 rows of ``column, first row, end row``.

    Examples
    --------
    >>> rle_segments([1, 4, 1], 3).tolist()
    [[0, 1, 3], [1, 0, 2]]
    """
    bounds = np.cumsum(np.asarray(counts, dtype=np.int64))
    starts, ends = bounds[0::2][: len(bounds) // 2], bounds[1::2]
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    first, last = starts // height, (ends - 1) // height
    n = last - first + 1
    run = np.repeat(np.arange(len(starts)), n)
    column = first[run] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    top = np.where(column == first[run], starts[run] - column * height, 0)
    bottom = np.where(column == last[run], ends[run] - column * height, height)
    return np.column_stack([column, top, bottom]).astype(np.int64)


class CocoReference:
    """The annotations of one item's image in a COCO file, read by window like an image:
    ``read(region)`` gives ``(1, rows, cols)`` int64 ids, one per annotation in file order
    (``instances``), or each annotation's ``category_id`` (a semantic reference).

    Raises
    ------
    EvaluationError
        When the file has no image for the item, its size disagrees with the item's, or an
        RLE mask has another size than its image.
    """

    def __init__(self, path: str, info: ItemInfo, *, instances: bool = True) -> None:
        coco = load_coco(path)
        image = match_image(coco, info.id, info.path)
        if image is None:
            raise EvaluationError(
                f"item {info.id!r}: COCO file '{path}' has no image for it (source '{info.path}')"
            )
        shape = tuple(info.spatial_shape)
        if (image.height, image.width) != shape:
            raise EvaluationError(
                f"item {info.id!r}: COCO file '{path}' gives image '{image.file_name}' height x "
                f"width {image.height} x {image.width}, the image is {shape[0]} x {shape[-1]}"
            )
        self.path = path
        annotations = coco.annotations[image.id]
        ids = [i + 1 if instances else int(a["category_id"]) for i, a in enumerate(annotations)]
        self.values = np.array([0, *ids], dtype=np.int64)
        self.polygons: list[tuple[dict[str, Any], tuple[float, ...], int]] = []
        segments = [np.zeros((0, 4), np.int64)]
        for order, annotation in enumerate(annotations, start=1):
            segmentation = annotation.get("segmentation") or []
            if isinstance(segmentation, dict):
                segments.append(self._rle(segmentation, image, order))
            else:
                self._add_polygon(segmentation, order)
        self.segments = np.concatenate(segments)

    def _add_polygon(self, rings: Sequence[Sequence[float]], order: int) -> None:
        points = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings if len(r) >= 6]
        if not points:
            return
        rings = [np.vstack([p, p[:1]]).tolist() for p in points]  # COCO leaves rings open
        geometry = {"type": "MultiPolygon", "coordinates": [[r] for r in rings]}
        every = np.concatenate(points)
        bounds = (*every.min(axis=0).tolist(), *every.max(axis=0).tolist())
        self.polygons.append((geometry, tuple(bounds), order))

    def _rle(self, segmentation: Mapping[str, Any], image: CocoImage, order: int) -> np.ndarray:
        size = [int(n) for n in segmentation.get("size", ())]
        if size != [image.height, image.width]:
            raise EvaluationError(
                f"COCO file '{self.path}': an RLE mask of image '{image.file_name}' has size "
                f"{size}, the image is [{image.height}, {image.width}] (height, width)"
            )
        counts = segmentation["counts"]
        runs = decode_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
        found = rle_segments(runs, image.height)
        return np.column_stack([found, np.full(len(found), order, np.int64)])

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        rows, cols = region
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        order = self._burn_polygons(rows, cols, shape)
        column, top, bottom, which = self.segments.T
        hit = (column >= cols.start) & (column < cols.stop)
        hit &= (top < rows.stop) & (bottom > rows.start)
        first = np.maximum(top[hit], rows.start) - rows.start
        length = np.minimum(bottom[hit], rows.stop) - rows.start - first
        if len(length):
            at = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
            pixels = (np.repeat(first, length) + at, np.repeat(column[hit] - cols.start, length))
            np.maximum.at(order, pixels, np.repeat(which[hit], length))  # later ones win
        return self.values[order][np.newaxis]

    def _burn_polygons(self, rows: slice, cols: slice, shape: tuple[int, int]) -> np.ndarray:
        """Annotation order (1-based) of the last polygon covering each pixel centre."""
        from affine import Affine
        from rasterio.features import rasterize

        shapes = [
            (geometry, order)
            for geometry, (x0, y0, x1, y1), order in self.polygons
            if x0 < cols.stop and x1 > cols.start and y0 < rows.stop and y1 > rows.start
        ]
        if not shapes:
            return np.zeros(shape, dtype=np.int64)
        window = Affine.translation(cols.start, rows.start)
        # Burned in file order, each over the ones before: the later annotation wins.
        return rasterize(shapes, out_shape=shape, transform=window, dtype="int32").astype(np.int64)

"""The references' own test cases, run through ``segflow.segment`` on several block layouts.

Each case is copied as data from the test suite of scikit-image 0.26 or scipy (both BSD
licensed; the source file is named next to it) and checked twice: against the expected
array the peer's test writes down, and against the peer function called here on the
whole array. Parameters renamed since (scikit-image 0.26's ``max_size`` includes the
size, the old ``min_size`` / ``area_threshold`` excluded it) are translated in place.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _compare import segment_with_timeout
from scipy import ndimage as ndi
from skimage import data, feature, morphology
from skimage.filters import threshold_li
from skimage.segmentation import clear_border, flood, relabel_sequential
from skimage.util import img_as_float

from segflow import segment
from segflow.errors import PlanError

Case = tuple[np.ndarray, list[dict[str, Any]], Callable[[np.ndarray], np.ndarray], Any]


def _layouts(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The whole item, single pixels, and uneven blocks that put seams through objects."""
    return [
        shape,
        (1,) * len(shape),
        tuple(max(1, (n + 1) // 2) for n in shape),
        tuple(min(n, 3) for n in shape),
        (*(min(n, 2) for n in shape[:-1]), shape[-1]),
    ]


# scipy/ndimage/tests/test_measurements.py: test_label08 (face connectivity) and
# test_label09, test_label10 (full connectivity)
LABEL_DATA = np.array(
    [
        [1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
    ]
)
LABEL08 = [
    [1, 0, 0, 0, 0, 0],
    [0, 0, 2, 2, 0, 0],
    [0, 0, 2, 2, 2, 0],
    [3, 3, 0, 0, 0, 0],
    [3, 3, 0, 0, 0, 0],
    [0, 0, 0, 4, 4, 0],
]
LABEL09 = [
    [1, 0, 0, 0, 0, 0],
    [0, 0, 2, 2, 0, 0],
    [0, 0, 2, 2, 2, 0],
    [2, 2, 0, 0, 0, 0],
    [2, 2, 0, 0, 0, 0],
    [0, 0, 0, 3, 3, 0],
]
LABEL10_DATA = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 0], [0] * 6])

# scipy/ndimage/tests/test_morphology.py: test_binary_fill_holes01..03
FILL_DATA = [
    np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 0, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    ),
    np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 1, 0, 0],
            [0, 0, 1, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    ),
    np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 1, 1, 1],
            [0, 1, 0, 1, 0, 1, 0, 1],
            [0, 1, 0, 1, 0, 1, 0, 1],
            [0, 0, 1, 0, 0, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    ),
]
FILL03 = [
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 1, 1, 1],
    [0, 1, 1, 1, 0, 1, 1, 1],
    [0, 1, 1, 1, 0, 1, 1, 1],
    [0, 0, 1, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 0, 0],
]

# skimage/morphology/tests/test_misc.py: test_image, test_labeled_image, test_holes_image
MISC_IMAGE = np.array([[0, 0, 0, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 1]], bool)
MISC_LABELS = np.array([[2, 2, 2, 0, 1], [2, 2, 2, 0, 1], [2, 0, 0, 0, 0], [0, 0, 3, 3, 3]])
MISC_HOLES = np.array(
    [
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    ],
    bool,
)
HOLES_ONE = MISC_HOLES.copy()  # test_one_connectivity_holes: every hole of <= 2 px filled
HOLES_ONE[2, 2:4] = HOLES_ONE[3, 4] = HOLES_ONE[6, 8] = True

# skimage/segmentation/tests/test_clear_border.py: test_clear_border, test_clear_border_3d,
# test_clear_border_non_binary, test_clear_border_non_binary_3d
BORDER_2D = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
)
BORDER_2D_EXPECTED = BORDER_2D.copy()
BORDER_2D_EXPECTED[1:3, 0:2] = 0
BORDER_2D_EXPECTED[0:2, -2] = 0
BORDER_3D = np.array(
    [
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ]
)
BORDER_3D_EXPECTED = BORDER_3D.copy()
BORDER_3D_EXPECTED[0, 3, 0] = 0
BORDER_LABELS = np.array([[1, 2, 3, 1, 2], [3, 3, 5, 4, 2], [3, 4, 5, 4, 2], [3, 3, 2, 1, 2]])
BORDER_LABELS_EXPECTED = [[0, 0, 0, 0, 0], [0, 0, 5, 4, 0], [0, 4, 5, 4, 0], [0, 0, 0, 0, 0]]
_OUTER = [[1, 2, 3, 1, 2], [3, 3, 3, 4, 2], [3, 4, 3, 4, 2], [3, 3, 2, 1, 2]]
BORDER_LABELS_3D = np.array([_OUTER, BORDER_LABELS.tolist(), _OUTER])
BORDER_LABELS_3D_EXPECTED = np.zeros((3, 4, 5), dtype=int)
BORDER_LABELS_3D_EXPECTED[1, 1:3, 2] = 5

# skimage/segmentation/tests/test_join.py: test_relabel_sequential_offset1
RELABEL = np.array([[1, 1, 5, 5, 8, 99, 42]])


def _quiet(function: Callable[[], np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():  # scikit-image's "did you mean a boolean array?" notes
        warnings.simplefilter("ignore", UserWarning)
        return function()


CASES: dict[str, Case] = {
    "scipy label08": (
        LABEL_DATA,
        [{"op": "label"}],
        lambda a: ndi.label(a)[0],
        LABEL08,
    ),
    "scipy label09": (
        LABEL_DATA,
        [{"op": "label", "connectivity": 2}],
        lambda a: ndi.label(a, np.ones((3, 3)))[0],
        LABEL09,
    ),
    "scipy label10": (
        LABEL10_DATA,
        [{"op": "label", "connectivity": 2}],
        lambda a: ndi.label(a, np.ones((3, 3)))[0],
        LABEL10_DATA,
    ),
    **{
        f"scipy binary_fill_holes0{k + 1}": (
            image,
            [{"op": "fill_holes"}],
            ndi.binary_fill_holes,
            FILL03 if k == 2 else None,
        )
        for k, image in enumerate(FILL_DATA)
    },
    "skimage remove_small_objects one connectivity": (
        MISC_IMAGE,  # min_size=6 (exclusive) is max_size=5
        [{"op": "remove_small_objects", "max_size": 5}],
        lambda a: morphology.remove_small_objects(a, max_size=5),
        [[0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]],
    ),
    "skimage remove_small_objects two connectivity": (
        MISC_IMAGE,  # min_size=7 is max_size=6
        [{"op": "remove_small_objects", "max_size": 6, "connectivity": 2}],
        lambda a: morphology.remove_small_objects(a, max_size=6, connectivity=2),
        [[0, 0, 0, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]],
    ),
    "skimage remove_small_objects labeled image": (
        MISC_LABELS,  # min_size=3 is max_size=2
        [{"op": "remove_small_objects", "max_size": 2}],
        lambda a: morphology.remove_small_objects(a, max_size=2),
        [[2, 2, 2, 0, 0], [2, 2, 2, 0, 0], [2, 0, 0, 0, 0], [0, 0, 3, 3, 3]],
    ),
    "skimage remove_small_objects uint image": (
        MISC_LABELS.astype(np.uint8),
        [{"op": "remove_small_objects", "max_size": 2}],
        lambda a: morphology.remove_small_objects(a, max_size=2),
        [[2, 2, 2, 0, 0], [2, 2, 2, 0, 0], [2, 0, 0, 0, 0], [0, 0, 3, 3, 3]],
    ),
    "skimage remove_small_holes one connectivity": (
        MISC_HOLES,  # area_threshold=3 (exclusive) is max_size=2
        [{"op": "remove_small_holes", "max_size": 2}],
        lambda a: morphology.remove_small_holes(a, max_size=2),
        HOLES_ONE,
    ),
    "skimage remove_small_holes two connectivity": (
        MISC_HOLES,
        [{"op": "remove_small_holes", "max_size": 2, "connectivity": 2}],
        lambda a: morphology.remove_small_holes(a, max_size=2, connectivity=2),
        np.where(np.arange(10) >= 6, HOLES_ONE, MISC_HOLES),  # the 4-connected hole stays
    ),
    "skimage remove_small_holes labeled image": (
        np.where(MISC_HOLES & (np.arange(10) >= 7), 2, MISC_HOLES.astype(int)),
        [{"op": "remove_small_holes", "max_size": 2}],
        lambda a: _quiet(lambda: morphology.remove_small_holes(a, max_size=2)),
        HOLES_ONE,
    ),
    "skimage clear_border": (
        BORDER_2D,
        [{"op": "clear_border"}],
        clear_border,
        BORDER_2D_EXPECTED,
    ),
    "skimage clear_border buffer": (
        BORDER_2D,
        [{"op": "clear_border", "buffer_size": 1}],
        lambda a: clear_border(a, 1),
        np.zeros_like(BORDER_2D),
    ),
    "skimage clear_border 3d": (
        BORDER_3D,
        [{"op": "clear_border"}],
        clear_border,
        BORDER_3D_EXPECTED,
    ),
    "skimage clear_border non binary": (
        BORDER_LABELS,
        [{"op": "clear_border"}],
        clear_border,
        BORDER_LABELS_EXPECTED,
    ),
    "skimage clear_border non binary 3d": (
        BORDER_LABELS_3D,
        [{"op": "clear_border"}],
        clear_border,
        BORDER_LABELS_3D_EXPECTED,
    ),
    "skimage relabel_sequential offset1": (
        RELABEL,
        [{"op": "relabel"}],
        lambda a: relabel_sequential(a)[0],
        [[1, 1, 2, 2, 3, 5, 4]],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_peer_case(name: str) -> None:
    image, pipeline, reference, expected = CASES[name]
    whole = reference(image)
    if expected is not None:
        np.testing.assert_array_equal(whole, expected)  # the peer's own expectation holds
    for blocks in _layouts(image.shape):
        result = segment(image, pipeline, block_shape=blocks)
        np.testing.assert_array_equal(result, whole, err_msg=f"blocks {blocks}")


def test_canny_dtype_peer_case() -> None:
    """skimage/feature/tests/test_canny.py (test_dtype): the same edges for an image and its
    float conversion, with the default thresholds and with values scaled by 255."""
    camera = data.camera()[:160, :200]
    as_float = img_as_float(camera)
    edges = [{"op": "hysteresis", "low": 0.5, "high": 1.5, "connectivity": 2}]
    for blocks in [(160, 200), (45, 70)]:
        integer = segment(camera, [{"op": "canny"}, *edges], block_shape=blocks)
        floats = segment(as_float, [{"op": "canny"}, *edges], block_shape=blocks)
        np.testing.assert_array_equal(integer, feature.canny(camera))
        np.testing.assert_array_equal(integer, floats)
        scaled = [{"op": "canny", "low": 255 * 0.1, "high": 255 * 0.2}, *edges]
        np.testing.assert_array_equal(segment(camera, scaled, block_shape=blocks), integer)
    assert integer.any()


# skimage/filters/tests/test_thresholding.py: test_li_pathological (images made of few
# distinct values, where the means' logs used to misbehave), plus the case of issue 15.
LI_PATHOLOGICAL = [
    [0, 0, 1, 0, 0, 1, 0, 1],
    [0, 0, 0.1, 0, 0, 0.1, 0, 0.1],
    [0, 0, 0.1, 0, 0, 0.1, 0.01, 0.1],
    [0, 0, 1, 0, 0, 1, 0.5, 1],
    [1, 1],
    [1, 1, 1, 1, 1],
]


def test_li_pathological_peer_cases_under_a_time_limit() -> None:
    """Run in a child process killed after 60 s: a hang fails instead of blocking CI.
    Float Li needs a tolerance in segflow; scikit-image's default is half the smallest gap
    between distinct values, given here explicitly."""
    cases = []
    for values in LI_PATHOLOGICAL:
        image = np.asarray([values], dtype=np.float64)
        gaps = np.diff(np.unique(image))
        if not len(gaps):
            continue  # a constant image: scikit-image returns its value (no iteration)
        for blocks in [image.shape, (1, 3)]:
            cases.append((image, float(gaps.min() / 2), blocks))
    cases.append((np.array([[0.1, 0.8, 0.9]]), 0.05, (1, 2)))
    results = segment_with_timeout(
        [(image, [{"op": "li", "tolerance": tol}], blocks) for image, tol, blocks in cases],
        seconds=60,
    )
    for (image, tolerance, _), result in zip(cases, results, strict=True):
        np.testing.assert_array_equal(result, image > threshold_li(image, tolerance=tolerance))
        np.testing.assert_array_equal(result, image > threshold_li(image))  # the default


def test_flood_float16_peer_case() -> None:
    """skimage/segmentation/tests/test_flood_fill.py (test_float16): refused, by name."""
    image = np.array([[9.0, 0.1, 42]], dtype=np.float16)
    with pytest.raises(TypeError, match="dtype of `image` is float16"):
        flood(image, (0, 0))
    with pytest.raises(PlanError, match=r"pipeline\[0\] 'region_grow': float16 images"):
        segment(image, [{"op": "region_grow", "tolerance": 1.0, "seeds": [[0, 0]]}])

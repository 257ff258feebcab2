"""Every classical method on real images, blockwise, equals scikit-image on the whole image.

The bundled samples (a Landsat band, a fluorescence nuclei image, a CT slice in Hounsfield
units) and, where ``../shared/data`` is present, an EM section and a SpaceNet panchromatic
tile (uint16). Each method runs over several block layouts, including thin strips and
blocks smaller than its halo.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _compare import assert_threshold_equal
from scipy import ndimage as ndi
from skimage import filters
from skimage.feature import canny, peak_local_max
from skimage.segmentation import flood, relabel_sequential, watershed

from segflow import segment
from segflow.io import discover_items
from segflow.ops.watershed import flooding_order

DATA = Path(__file__).parents[1] / "data"
SHARED = Path(__file__).parents[3] / "shared" / "data"
LAYOUTS = [(64, 97), (29, 300), (300, 13)]


def _read(pattern: str, band: int = 0, z: int | None = None) -> np.ndarray:
    readers, failures = discover_items(pattern)
    assert readers and not failures, f"cannot read {pattern}: {failures}"
    reader = readers[0]
    shape = reader.info.spatial_shape
    if z is None:
        return reader.read(tuple(slice(0, n) for n in shape))[band]
    return reader.read((slice(z, z + 1), *(slice(0, n) for n in shape[1:])))[band, 0]


def _bundled() -> dict[str, Callable[[], np.ndarray]]:
    return {
        "landsat_band": lambda: _read(str(DATA / "aerial" / "RGB.byte.tif"))[200:500, 250:550],
        "nuclei": lambda: _read(str(DATA / "nuclei" / "*" / "image.png")),
        "ct_slice": lambda: _read(str(DATA / "ct" / "STS_002" / "CT_image.nii.gz"), z=24),
    }


def _shared() -> dict[str, Callable[[], np.ndarray]]:
    em = SHARED / "microscopy" / "isbi2012_em" / "image" / "0.png"
    pan = SHARED / "aerial" / "spacenet4_atlanta_buildings" / "sample_geotiff.tif"
    return {
        "em_section": lambda: _read(str(em))[:300, :300],
        "spacenet_pan": lambda: _read(str(pan))[300:600, 300:600],
    }


def _seeds(image: np.ndarray) -> list[list[int]]:
    h, w = image.shape
    return [[h // 4, w // 3], [h // 2, w // 2], [3 * h // 4, 2 * w // 3]]


def _li(x: np.ndarray) -> np.ndarray:
    tolerance = None if x.dtype.kind in "ui" else 0.5
    return x > filters.threshold_li(x, tolerance=tolerance)


def _grow_range(x: np.ndarray) -> np.ndarray:
    low, high = np.percentile(x, [40, 100])
    accepted = (x >= low) & (x <= high)
    grown = np.zeros(x.shape, dtype=bool)
    for seed in _seeds(x):
        if accepted[tuple(seed)]:
            grown |= flood(accepted, tuple(seed), connectivity=1)
    return grown


def _grow_tolerance(x: np.ndarray) -> np.ndarray:
    tolerance = float(np.std(x)) / 2
    grown = np.zeros(x.shape, dtype=bool)
    for seed in _seeds(x):
        grown |= flood(x, tuple(seed), tolerance=tolerance, connectivity=1)
    return grown


def _otsu_watershed(x: np.ndarray) -> np.ndarray:
    mask = x > filters.threshold_otsu(x)
    regions, _ = ndi.label(mask)
    distance = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=4, labels=regions, exclude_border=False)
    markers = np.zeros(x.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(flooding_order(distance), markers, mask=mask)


def _value_scale(x: np.ndarray) -> float:
    return float(np.iinfo(x.dtype).max) if x.dtype.kind in "ui" else 1.0


def _steps(name: str, x: np.ndarray) -> list[dict[str, object]]:
    """The pipeline for ``name`` with parameters fitted to the image's value range."""
    low, high = (float(v) for v in np.percentile(x, [40, 100]))
    scale = _value_scale(x)
    magnitude = np.percentile(filters.sobel(x.astype(np.float64) / scale), [70, 90])
    hysteresis = {"op": "hysteresis", "low": 0.5, "high": 1.5, "connectivity": 2}
    return {
        "otsu": [{"op": "otsu"}],
        "multi_otsu": [{"op": "multi_otsu", "classes": 3}],
        "li": [{"op": "li", "tolerance": None if x.dtype.kind in "ui" else 0.5}],
        "yen": [{"op": "yen"}],
        "triangle": [{"op": "triangle"}],
        "threshold_percentile": [{"op": "threshold_percentile", "q": 80}],
        "threshold_local_gaussian": [{"op": "threshold_local", "block_size": 15}],
        "threshold_local_mean": [{"op": "threshold_local", "block_size": 15, "method": "mean"}],
        "threshold_local_median": [{"op": "threshold_local", "block_size": 7, "method": "median"}],
        "sobel": [{"op": "sobel"}],
        "scharr": [{"op": "scharr"}],
        "canny": [
            {
                "op": "canny",
                "sigma": 1.5,
                "low": float(magnitude[0] * scale),
                "high": float(magnitude[1] * scale),
            },
            hysteresis,
        ],
        "canny_quantiles": [
            {"op": "canny", "sigma": 1.5, "low": 0.7, "high": 0.9, "use_quantiles": True},
            hysteresis,
        ],
        "region_grow": [{"op": "region_grow", "low": low, "high": high, "seeds": _seeds(x)}],
        "region_grow_tolerance": [
            {"op": "region_grow", "tolerance": float(np.std(x)) / 2, "seeds": _seeds(x)}
        ],
        "watershed": [
            {"op": "otsu"},
            {"op": "watershed", "min_distance": 4, "max_object_size": 299},
        ],
    }[name]


def _reference(name: str, x: np.ndarray) -> np.ndarray:
    scale = _value_scale(x)
    magnitude = np.percentile(filters.sobel(x.astype(np.float64) / scale), [70, 90])
    references: dict[str, Callable[[], np.ndarray]] = {
        "otsu": lambda: x > filters.threshold_otsu(x),
        "multi_otsu": lambda: np.digitize(x, filters.threshold_multiotsu(x.ravel(), 3)) + 1,
        "li": lambda: _li(x),
        "yen": lambda: x > filters.threshold_yen(x),
        "triangle": lambda: x > filters.threshold_triangle(x),
        "threshold_percentile": lambda: x > np.percentile(x, 80),
        "threshold_local_gaussian": lambda: x > filters.threshold_local(x, 15),
        "threshold_local_mean": lambda: x > filters.threshold_local(x, 15, "mean"),
        "threshold_local_median": lambda: x > filters.threshold_local(x, 7, "median"),
        "sobel": lambda: filters.sobel(x).astype(np.float32),
        "scharr": lambda: filters.scharr(x).astype(np.float32),
        "canny": lambda: canny(x, 1.5, float(magnitude[0] * scale), float(magnitude[1] * scale)),
        "canny_quantiles": lambda: canny(x, 1.5, 0.7, 0.9, use_quantiles=True),
        "region_grow": lambda: _grow_range(x),
        "region_grow_tolerance": lambda: _grow_tolerance(x),
        "watershed": lambda: _otsu_watershed(x),
    }
    return references[name]()


METHODS = [
    "otsu",
    "multi_otsu",
    "li",
    "yen",
    "triangle",
    "threshold_percentile",
    "threshold_local_gaussian",
    "threshold_local_mean",
    "threshold_local_median",
    "sobel",
    "scharr",
    "canny",
    "canny_quantiles",
    "region_grow",
    "region_grow_tolerance",
    "watershed",
]


def _check(name: str, image: np.ndarray) -> None:
    expected = _reference(name, image)
    assert len(np.unique(expected)) > 1, f"{name}: a constant reference would be vacuous"
    for layout in LAYOUTS:
        result = segment(image, _steps(name, image), block_shape=layout)
        if name == "threshold_local_mean":
            threshold = filters.threshold_local(image, 15, "mean")
            assert_threshold_equal(result, image, threshold)
            ties = np.isclose(image.astype(np.float64), threshold, rtol=1e-5, atol=1e-5)
            if image.dtype.kind in "ui":  # exact: a pixel equal to its mean is not above it
                sums = ndi.correlate(image.astype(np.int64), np.ones((15, 15), np.int64))
                above = image.astype(np.int64) * 15**2 > sums
                np.testing.assert_array_equal(result[ties], above[ties])
        elif name == "watershed":
            np.testing.assert_array_equal(
                relabel_sequential(result)[0] != 0, expected != 0, err_msg=str(layout)
            )
            # Regions named by marker position vs numbered markers: the same partition.
            pairs = np.unique(np.stack([result.ravel(), expected.ravel()]), axis=1)
            assert pairs.shape[1] == len(np.unique(expected)), layout
        else:
            np.testing.assert_array_equal(result, expected, err_msg=str(layout))


@pytest.mark.parametrize("image_name", sorted(_bundled()))
@pytest.mark.parametrize("name", METHODS)
def test_method_on_bundled_real_images(name: str, image_name: str) -> None:
    _check(name, _bundled()[image_name]())


@pytest.mark.shared_data
@pytest.mark.parametrize("image_name", sorted(_shared()))
@pytest.mark.parametrize("name", METHODS)
def test_method_on_shared_real_images(name: str, image_name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    _check(name, _shared()[image_name]())

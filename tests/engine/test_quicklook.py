"""Quick looks: the item's image thinned to a small picture with the output's outline."""

from __future__ import annotations

import pathlib

import imageio.v3 as iio
import numpy as np
import pytest
import zarr

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader
from segflow.store import quicklook
from segflow.store.quicklook import OUTLINE_RGB, quicklook_rgb, render_quicklook


def square_item(tmp_path: pathlib.Path, labels: np.ndarray) -> str:
    store = str(tmp_path / "out.zarr")
    zarr.create_array(f"{store}/tile/labels", data=labels)
    return store


def expected_square_outline(shape: tuple[int, int], rows: range, cols: range) -> np.ndarray:
    """The outline of one square object (on the thinned grid): the row above it and its
    bottom row, the column left of it and its right column."""
    edge = np.zeros(shape, dtype=bool)
    edge[rows.start - 1, cols.start : cols.stop] = True
    edge[rows.stop - 1, cols.start : cols.stop] = True
    edge[rows.start : rows.stop, cols.start - 1] = True
    edge[rows.start : rows.stop, cols.stop - 1] = True
    return edge


def test_a_square_is_outlined_on_the_thinned_grey_image(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((100, 150)).astype(np.float32)
    labels = np.zeros((100, 150), np.uint8)
    labels[30:60, 45:90] = 7
    store = square_item(tmp_path, labels)

    rgb = quicklook_rgb(ArrayReader(image, "tile"), store, "tile", "labels", size=50)

    # step = ceil(150 / 50) = 3: rows 10..19 and columns 15..29 of the thinned grid.
    assert rgb.shape == (34, 50, 3) and rgb.dtype == np.uint8
    edge = expected_square_outline((34, 50), range(10, 20), range(15, 30))
    assert (rgb[edge] == OUTLINE_RGB).all()
    thinned = image[::3, ::3].astype(np.float64)
    low, high = np.percentile(thinned, [2, 98])
    grey = np.round(np.clip((thinned - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    for k in range(3):  # everything else is the stretched image, grey
        np.testing.assert_array_equal(rgb[..., k][~edge], grey[~edge])


def test_rgb_items_keep_their_colours_and_volumes_show_the_middle_slice(
    tmp_path: pathlib.Path,
) -> None:
    colour = np.zeros((3, 20, 20), np.uint8)
    colour[0], colour[1, :, 10:], colour[2, 10:] = 200, 100, 50  # red, plus green, plus blue
    volume = np.zeros((5, 20, 20), np.float32)
    labels = np.zeros((5, 20, 20), np.uint16)
    labels[2, 5:10, 5:10] = 1  # only in the middle slice
    labels[0, 12:18, 12:18] = 2
    zarr.create_array(f"{tmp_path}/rgb/labels", data=np.zeros((20, 20), np.uint8))
    zarr.create_array(f"{tmp_path}/ct/labels", data=labels)

    rgb = quicklook_rgb(ArrayReader(colour, "rgb", channel_axis=0), str(tmp_path), "rgb", "labels")
    ct = quicklook_rgb(ArrayReader(volume, "ct"), str(tmp_path), "ct", "labels")

    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[19, 19].tolist() == [0, 255, 255]
    assert rgb[0, 19].tolist() == [0, 255, 0] and rgb[19, 0].tolist() == [0, 0, 255]
    outlined = np.argwhere((ct == OUTLINE_RGB).all(axis=-1))
    assert outlined.min(axis=0).tolist() == [4, 4] and outlined.max(axis=0).tolist() == [9, 9]


def test_reading_in_bands_gives_the_same_picture(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((90, 70)).astype(np.float32)
    labels = (image > 0.8).astype(np.uint8)
    store = square_item(tmp_path, labels)
    whole = quicklook_rgb(ArrayReader(image, "tile"), store, "tile", "labels", size=30)

    monkeypatch.setattr(quicklook, "BAND_PIXELS", 70 * 7)  # bands of 6 rows (step 3)
    banded = quicklook_rgb(ArrayReader(image, "tile"), store, "tile", "labels", size=30)

    np.testing.assert_array_equal(banded, whole)


def test_a_segmented_item_renders_as_a_png(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(2)
    image = (rng.random((64, 96)) > 0.7).astype(np.float32)
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            ArrayReader(image, "tile"),
            [{"op": "threshold", "value": 0.5}, {"op": "label"}],
            store=store,
            block_shape=32,
            executor=executor,
        )
    assert result.status == "done", result.error

    png = render_quicklook(ArrayReader(image, "tile"), store, "tile", result.output, size=48)

    picture = iio.imread(png, extension=".png")
    assert picture.shape == (32, 48, 3)
    assert (picture == OUTLINE_RGB).all(axis=-1).any()


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`size` \(0\) must be at least 1 pixel"):
        render_quicklook(ArrayReader(np.zeros((4, 4)), "t"), "unused", "t", "labels", size=0)


def test_a_quick_look_is_written_beside_its_item(tmp_path: pathlib.Path) -> None:
    from segflow.store.quicklook import QUICKLOOK_NAME, write_quicklook

    image = np.zeros((64, 96), np.float32)
    image[10:30, 20:60] = 1.0
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(1) as executor:
        result = segment_item(
            ArrayReader(image, "tile"),
            [{"op": "threshold", "value": 0.5}, {"op": "label"}],
            store=store,
            block_shape=32,
            executor=executor,
        )

    location, size = write_quicklook(ArrayReader(image, "tile"), store, "tile", "labels", size=48)

    path = tmp_path / "out.zarr" / "tile" / QUICKLOOK_NAME
    assert location == str(path) and size == path.stat().st_size
    assert iio.imread(path, extension=".png").shape == (32, 48, 3)
    assert [p.name for p in path.parent.iterdir() if "segflow-tmp" in p.name] == []
    assert result.status == "done"


class _NoWholeRows(ArrayReader):
    """Reads blocks, but not the whole-width bands a quick look reads."""

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if region[-1] == slice(0, self.info.spatial_shape[-1]):
            raise OSError("bands of whole rows are not served")
        return super().read(region)


def test_the_quick_look_writer_draws_before_the_commit_and_a_failure_only_warns(
    tmp_path: pathlib.Path,
) -> None:
    import os

    from segflow.store.quicklook import QUICKLOOK_NAME
    from segflow.store.writers import get_writer

    image = np.zeros((64, 96), np.float32)
    image[10:30, 20:60] = 1.0
    pipeline = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
    assert get_writer("quicklook").finish is not None  # a registered writer like the others
    readers = {"drawn": ArrayReader(image, "tile"), "failed": _NoWholeRows(image, "tile")}
    results, pictures = {}, {}
    for name, reader in readers.items():
        store = str(tmp_path / f"{name}.zarr")
        with LocalExecutor(1) as executor:
            results[name] = segment_item(
                reader, pipeline, store=store, block_shape=32, executor=executor, quicklook=48
            )
        version = os.path.realpath(os.path.join(store, "tile"))  # the committed version
        pictures[name] = os.path.exists(os.path.join(version, QUICKLOOK_NAME))

    assert results["drawn"].status == "done" and results["drawn"].warning is None
    assert pictures == {"drawn": True, "failed": False}
    assert results["failed"].status == "done"
    assert results["failed"].warning == (
        "no quick look (OSError: bands of whole rows are not served)"
    )

"""A folder of 2-D slices read as one volume (`input.options.stack`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.ndimage
import tifffile

from segflow import segment
from segflow.errors import ItemReadError
from segflow.io import discover_items, open_item

EM = Path(__file__).resolve().parents[3] / "shared" / "data" / "microscopy" / "isbi2012_em"


def _write_slices(folder: Path, volume: np.ndarray, suffix: str = ".png") -> None:
    folder.mkdir(parents=True)
    for k, plane in enumerate(volume):
        iio.imwrite(folder / f"section_{k}{suffix}", plane)


def test_slices_stack_in_natural_order_with_the_stated_spacing(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 255, size=(12, 40, 56), dtype=np.uint8)  # 12: 10 and 11 sort last
    _write_slices(tmp_path / "stack", volume)
    (tmp_path / "stack" / "notes.txt").write_text("acquisition log")

    readers, failures = discover_items(
        str(tmp_path / "stack"), stack={"spacing": [50, 4, 4], "units": "nm"}
    )

    assert failures == [] and len(readers) == 1
    reader = readers[0]
    assert reader.info.id == "stack" and reader.info.axes == ("z", "y", "x")
    assert reader.info.shape == (12, 40, 56) and reader.info.spacing == (50.0, 4.0, 4.0)
    assert reader.info.units == "nm" and reader.info.attrs["stack_last"] == "section_11.png"
    np.testing.assert_array_equal(
        reader.read((slice(0, 12), slice(0, 40), slice(0, 56)))[0], volume
    )
    window = (slice(8, 11), slice(5, 9), slice(20, 50))
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(reader)).read(window)[0], volume[8:11, 5:9, 20:50]
    )
    # A 3-D pipeline runs on it as on any volume: labels equal scipy's on the whole.
    labels = segment(reader.read((slice(0, 12), slice(0, 40), slice(0, 56)))[0] > 200,
                     [{"op": "label"}], block_shape=(5, 16, 16))  # fmt: skip
    reference = scipy.ndimage.label(volume > 200)[0]
    assert labels.max() == reference.max()


def test_glob_of_folders_gives_one_stack_each_and_multichannel_slices_keep_channels(
    tmp_path: Path,
) -> None:
    rgb = np.zeros((3, 20, 24, 3), dtype=np.uint8)
    _write_slices(tmp_path / "a", rgb)
    _write_slices(tmp_path / "b", rgb[:2])

    readers, failures = discover_items(str(tmp_path / "*"), stack=True)

    assert failures == []
    assert [(r.info.id, r.info.shape) for r in readers] == [
        ("a", (3, 3, 20, 24)),
        ("b", (3, 2, 20, 24)),
    ]
    assert readers[0].info.spacing == (1.0, 1.0, 1.0) and readers[0].info.units == "pixel"


def test_a_slice_unlike_the_first_is_named(tmp_path: Path) -> None:
    _write_slices(tmp_path / "stack", np.zeros((3, 16, 16), np.uint8), suffix=".tif")
    tifffile.imwrite(tmp_path / "stack" / "section_3.tif", np.zeros((16, 17), np.uint8))

    readers, failures = discover_items(str(tmp_path / "stack"), stack=True)

    assert readers == [] and len(failures) == 1
    assert (
        "slice section_3.tif is (16, 17) uint8, the first (section_0.tif) (16, 16)"
        in failures[0][1]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stack": {"spacing": [50, 4]}}, r"spacing` must be \[z, y, x\] with `units`"),
        ({"stack": {"z": 50}}, r"takes spacing, units and pattern, not \['z'\]"),
        ({"stack": True, "level": 1}, "alone in `input.options`"),
    ],
)
def test_bad_stack_options_are_named(tmp_path: Path, options: dict, message: str) -> None:
    _write_slices(tmp_path / "stack", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ItemReadError, match=message):
        open_item(str(tmp_path / "stack"), **options)


@pytest.mark.shared_data
def test_the_em_stack_reads_as_its_30_sections() -> None:
    if not (EM / "image").is_dir():
        pytest.skip(f"shared data not found at {EM}")
    reader = open_item(str(EM / "image"), stack={"spacing": [50, 4, 4], "units": "nm"})
    assert reader.info.shape == (30, 512, 512) and reader.info.dtype == "uint8"
    section_10 = iio.imread(EM / "image" / "10.png")
    np.testing.assert_array_equal(
        reader.read((slice(10, 11), slice(0, 512), slice(0, 512)))[0, 0], section_10
    )

"""DICOM series in: geometry from positions, HU, compressed syntaxes, several series, SEG-free."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from _dicom import write_multiframe, write_non_image, write_series
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from segflow.config import load_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import ItemReadError
from segflow.io import discover_items, open_item

ROOT = Path(__file__).resolve().parents[2]
CT = ROOT / "tests" / "data" / "ct" / "STS_002" / "CT_image.nii.gz"


@pytest.fixture(scope="module")
def ct_volume() -> tuple[np.ndarray, object]:
    """The bundled CT (HU, z y x) and its NIfTI reader."""
    reader = open_item(str(CT))
    shape = reader.info.spatial_shape
    return reader.read(tuple(slice(0, n) for n in shape))[0], reader


def _nifti_geometry(reader: object) -> tuple[list[float], list[float]]:
    """(dz, dy, dx) and the LPS position of voxel 0 of the NIfTI CT (its affine is RAS)."""
    affine = np.asarray(reader.info.affine)  # type: ignore[attr-defined]
    spacing = [abs(affine[2, 2]), abs(affine[1, 1]), abs(affine[0, 0])]
    origin = [-affine[0, 3], -affine[1, 3], affine[2, 3]]
    return spacing, origin


def test_a_series_reads_as_its_nifti_volume_with_the_same_coordinates(
    tmp_path: Path, ct_volume: tuple[np.ndarray, object]
) -> None:
    hu, nifti = ct_volume
    spacing, origin = _nifti_geometry(nifti)
    write_series(tmp_path / "export", hu, spacing=spacing, origin=origin, name="{:08d}")

    readers, failures = discover_items(str(tmp_path / "export"))

    assert failures == [] and len(readers) == 1
    reader = readers[0]
    info = reader.info
    assert info.format == "dicom" and info.id == "3_CT_CHEST"
    assert info.axes == ("z", "y", "x") and info.shape == nifti.info.shape  # type: ignore[attr-defined]
    np.testing.assert_allclose(info.spacing, nifti.info.spacing, atol=1e-4)  # type: ignore[attr-defined]
    np.testing.assert_allclose(info.origin, nifti.info.origin, atol=1e-3)  # type: ignore[attr-defined]
    np.testing.assert_allclose(info.affine, nifti.info.affine, atol=1e-3)  # type: ignore[attr-defined]
    assert info.units == "mm" and info.attrs["orientation"] == nifti.info.attrs["orientation"]  # type: ignore[attr-defined]
    assert info.attrs["value_units"] == "HU" and info.dtype == "int16"
    whole = reader.read((slice(0, 48), slice(0, 143), slice(0, 161)))[0]
    np.testing.assert_array_equal(whole, np.clip(np.round(hu), -1024, 3071))
    window = reader.read((slice(5, 9), slice(10, 30), slice(7, 8)))
    np.testing.assert_array_equal(window[0], whole[5:9, 10:30, 7:8])
    again = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(
        again.read((slice(0, 2), slice(0, 3), slice(0, 4)))[0], whole[:2, :3, :4]
    )


def test_the_ct_config_gives_the_same_labels_from_dicom_as_from_nifti(
    tmp_path: Path, ct_volume: tuple[np.ndarray, object]
) -> None:
    hu, nifti = ct_volume
    spacing, origin = _nifti_geometry(nifti)
    write_series(tmp_path / "export", np.round(hu), spacing=spacing, origin=origin)
    config = load_config(ROOT / "configs" / "ct.yaml")
    (dicom,), _ = discover_items(str(tmp_path / "export"))
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        for reader in (nifti, dicom):
            result = segment_item(
                reader,  # type: ignore[arg-type]
                config.pipeline,
                store=store,
                block_shape=config.blocks.shape,
                executor=executor,
                chunks=config.output.chunks,
            )
            assert result.status == "done", result.error

    from_nifti = xr.open_zarr(store, group="CT_image", consolidated=False)
    from_dicom = xr.open_zarr(store, group="3_CT_CHEST", consolidated=False)
    assert int(from_dicom["labels"].max()) > 0
    for name in ("labels", "classes"):
        np.testing.assert_array_equal(from_dicom[name].values, from_nifti[name].values)
    for axis in ("z", "y", "x"):
        np.testing.assert_allclose(from_dicom[axis].values, from_nifti[axis].values, atol=1e-3)
    # z runs along the slices' ImagePositionPatient (S is the same in LPS and RAS).
    np.testing.assert_allclose(
        from_dicom["z"].values, origin[2] + spacing[0] * np.arange(48), atol=1e-3
    )
    assert from_dicom["z"].attrs.get("units") == "mm"


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit]
)
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, syntax: str) -> None:
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 2000, size=(3, 64, 80)).astype(np.float64)
    write_series(tmp_path, hu, spacing=(2.0, 0.7, 0.7), origin=(0, 0, 0), transfer_syntax=syntax)

    reader = open_item(str(sorted(tmp_path.iterdir())[0]))
    values = reader.read((slice(0, 3), slice(0, 64), slice(0, 80)))[0]

    if syntax == JPEGBaseline8Bit:  # 8-bit lossy: values are kept to 16 HU steps, roughly
        assert np.abs(values.astype(float) - hu).mean() < 40
    else:
        np.testing.assert_array_equal(values, hu)


def test_several_series_and_non_image_objects_in_one_folder(tmp_path: Path) -> None:
    hu = np.zeros((4, 16, 16))
    write_series(tmp_path, hu, spacing=(1, 1, 1), origin=(0, 0, 0), number=2,
                 description="scout", name="A{:03d}")  # fmt: skip
    write_series(tmp_path, hu, spacing=(1, 1, 1), origin=(0, 0, 0), number=5,
                 description="lung 1.25mm", name="B{:03d}.dcm")  # fmt: skip
    write_non_image(tmp_path)
    (tmp_path / "DICOMDIR.txt").write_text("not an image")
    notes: list[str] = []

    readers, failures = discover_items(str(tmp_path), notes=notes)

    assert failures == []
    assert sorted(r.info.id for r in readers) == ["2_scout", "5_lung_1.25mm"]
    assert all(r.info.shape == (4, 16, 16) for r in readers)
    assert len(notes) == 1 and "RTSTRUCT" in notes[0] and "RS0001.dcm" in notes[0]


def test_an_enhanced_multiframe_object_is_one_volume(
    tmp_path: Path, ct_volume: tuple[np.ndarray, object]
) -> None:
    hu = np.round(ct_volume[0][:6, :40, :50])
    write_multiframe(tmp_path / "enhanced.dcm", hu, spacing=(2.5, 0.8, 0.8), origin=(-5, 7, 100))

    reader = open_item(str(tmp_path / "enhanced.dcm"))

    assert reader.info.shape == (6, 40, 50)
    np.testing.assert_allclose(reader.info.spacing, (2.5, -0.8, -0.8))
    np.testing.assert_allclose(reader.info.origin, (100, -7, 5))
    values = reader.read((slice(0, 6), slice(0, 40), slice(0, 50)))[0]
    np.testing.assert_array_equal(values, np.clip(hu, -1024, 3071))


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 4)], "uneven slice spacing"),
        ([(0, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, 2)], "share the position"),
        ([(0, 0, 0), (0, 0.3, 1), (0, 0.6, 2), (0, 0.9, 3)], "gantry tilt"),
    ],
)
def test_inconsistent_geometry_is_refused_with_the_figures(
    tmp_path: Path, positions: list[tuple[float, float, float]], message: str
) -> None:
    write_series(tmp_path, np.zeros((4, 8, 8)), spacing=(1, 1, 1), origin=(0, 0, 0),
                 positions=positions)  # fmt: skip

    readers, failures = discover_items(str(tmp_path))

    assert readers == [] and len(failures) == 1
    assert message in failures[0][1] and "series" in failures[0][1]


def test_a_lone_non_image_object_is_no_item(tmp_path: Path) -> None:
    write_non_image(tmp_path)
    with pytest.raises(ItemReadError, match="not a DICOM image"):
        open_item(str(tmp_path / "RS0001.dcm"))
    with pytest.raises(ItemReadError, match="no items found"):
        discover_items(str(tmp_path))

"""The CT example of issue 23 end to end: configs/ct-nnunet.yaml runs the shipped nnU-Net v2
results folder (configs/models/sts-ct-nnunet, 3 x 2 x 2 mm) on the bundled CT
(3.27 x 0.98 x 0.98 mm), from NIfTI and from a DICOM series, resampling to the model's
spacing and back; the classes are named in the store, and the result is nnUNetPredictor's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from _dicom import write_series
from test_nnunet_source import sound_voxels

from segflow import segment
from segflow.config import load_config
from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import discover_items, open_item

pytest.importorskip("dynamic_network_architectures")

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "ct-nnunet.yaml"
CT = ROOT / "tests" / "data" / "ct" / "STS_002" / "CT_image.nii.gz"


def _model(config: object) -> str:
    return str(config.pipeline[-1]["path"])  # type: ignore[attr-defined]


def _whole(reader: object) -> np.ndarray:
    shape = reader.info.spatial_shape  # type: ignore[attr-defined]
    return reader.read(tuple(slice(0, n) for n in shape))[0]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def rounded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The bundled CT in whole HU as a NIfTI (its own affine) and as a DICOM series: the
    same values both ways (DICOM stores integers)."""
    folder = tmp_path_factory.mktemp("ct")
    image = nib.load(CT)
    hu = np.round(np.asarray(image.dataobj, dtype=np.float32))
    nifti = folder / "CT_image.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), image.affine), nifti)
    affine = image.affine
    spacing = [abs(affine[2, 2]), abs(affine[1, 1]), abs(affine[0, 0])]
    origin = [-affine[0, 3], -affine[1, 3], affine[2, 3]]  # LPS of voxel 0 (RAS affine)
    write_series(folder / "export", hu.transpose(2, 1, 0), spacing=spacing, origin=origin)
    return nifti, folder / "export"


def test_the_config_runs_on_nifti_and_dicom_with_the_classes_named(
    rounded: tuple[Path, Path], tmp_path: Path
) -> None:
    config = load_config(CONFIG)
    (dicom,), failures = discover_items(str(rounded[1]))
    assert not failures
    nifti = open_item(str(rounded[0]))
    store = str(tmp_path / "out.zarr")
    with LocalExecutor(2) as executor:
        for reader in (nifti, dicom):
            result = segment_item(
                reader, config.pipeline, store=store, block_shape=config.blocks.shape,
                executor=executor, chunks=config.output.chunks,
            )  # fmt: skip
            assert result.status == "done", result.error
    from_nifti = xr.open_zarr(store, group="CT_image", consolidated=False)
    from_dicom = xr.open_zarr(store, group="3_CT_CHEST", consolidated=False)
    classes = from_nifti["classes"]
    assert classes.shape == (48, 143, 161)  # the CT's grid, not the model's (52, 70, 79)
    assert list(from_nifti["classes_name"].values) == ["background", "sarcoma"]
    assert classes.attrs["flag_meanings"] == "background sarcoma"
    assert 0 < int(classes.sum()) < classes.size // 4  # some tumour, not all of it
    # The same HU values and shapes give the same grids (the scale is the shapes' ratio):
    np.testing.assert_array_equal(from_dicom["classes"].values, classes.values)
    # ... and the resampled run differs from one that ignored the spacing (pixel units)
    unresampled = segment(_whole(nifti), config.pipeline, block_shape=(48, 143, 161))
    assert (unresampled != classes.values).any()


def test_equals_nnunet_predictor_on_the_bundled_ct(rounded: tuple[Path, Path]) -> None:
    pytest.importorskip("nnunetv2")
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    config = load_config(CONFIG)
    reader = open_item(str(rounded[0]))
    image = _whole(reader).astype(np.float32)
    spacing = tuple(abs(s) for s in reader.info.spacing)
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"),
        perform_everything_on_device=False, verbose=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(_model(config), use_folds=(0,))
    classes, probabilities = predictor.predict_single_npy_array(
        image[None], {"spacing": list(spacing)}, None, None, True
    )
    step = {**config.pipeline[-1], "output": "raw", "device": "cpu"}
    ours = segment(image, [step], block_shape=config.blocks.shape, spacing=spacing, units="mm")
    plans = json.loads((Path(_model(config)) / "plans.json").read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    target = plans["configurations"]["3d_fullres"]["spacing"]
    sound = sound_voxels(predictor, image.shape, spacing, target, patch)
    # nnU-Net's float16 blending: 1e-3 where every model voxel read back is sound (see
    # test_nnunet_source); the outer voxels of the model's grid are rounding noise there
    assert sound.mean() > 0.8
    np.testing.assert_allclose(ours[:, sound], probabilities[:, sound], rtol=0, atol=1e-3)
    top2 = np.sort(probabilities, axis=0)[-2:]
    differs = (np.argmax(ours, axis=0) != classes) & sound
    assert np.all(top2[1][differs] - top2[0][differs] < 2e-3)  # only near-ties may differ


@pytest.mark.parametrize("blocks", [(16, 40, 64), (48, 143, 30), (5, 143, 161)])
def test_the_config_blockwise_equals_whole_with_its_spacing(blocks: tuple[int, ...]) -> None:
    config = load_config(CONFIG)
    reader = open_item(str(CT))
    image = _whole(reader)
    spacing = tuple(abs(s) for s in reader.info.spacing)
    step = {**config.pipeline[-1], "output": "raw", "device": "cpu"}
    whole = segment(image, [step], block_shape=image.shape, spacing=spacing, units="mm")
    out = segment(image, [step], block_shape=blocks, spacing=spacing, units="mm")
    # see test_nnunet_source.test_blockwise_resampled_equals_whole_item_on_every_layout
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-5)

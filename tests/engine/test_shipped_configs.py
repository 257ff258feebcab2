"""Every shipped config, run blockwise on the bundled sample data, equals one whole block.

One block covering the item is each operation applied by scipy/scikit-image to the whole
array, i.e. the reference; the blockwise layouts include uneven blocks and blocks smaller than
the pipeline's halo.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import tifffile
from _compare import assert_labels_equal
from _configs import skip_untrained

from segflow import segment
from segflow.config import load_config
from segflow.engine import compile_pipeline
from segflow.engine.executor import LocalExecutor
from segflow.evaluate import evaluate_item
from segflow.io import discover_items, open_item

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def _layouts(shape: tuple[int, ...], configured: list[int] | int) -> list[tuple[int, ...]]:
    configured = [configured] * len(shape) if isinstance(configured, int) else configured
    return [
        tuple(configured),
        tuple(max(n // 3 + 1, 1) for n in shape),  # uneven: three blocks, the last smaller
        tuple(max(n // 5, 1) for n in shape),
        tuple(7 for _ in shape),  # smaller than the halo of every shipped pipeline
        (1, *shape[1:]),  # one pixel along the first axis
    ]


SHARED = Path(__file__).parents[3] / "shared" / "data"


def _reads_shared_data(input_path: str) -> bool:
    """Whether a config's (resolved) input lies under a ``shared/data`` folder next to the
    project: real data sets that a clone (CI) may not have."""
    parts = Path(input_path).parts
    return any(parts[i : i + 2] == ("shared", "data") for i in range(len(parts) - 1))


def _has_items(input_path: str) -> bool:
    """A file, folder or glob that exists (without reading anything)."""
    return Path(input_path).exists() or bool(glob.glob(input_path, recursive=True))


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_blockwise_equals_whole(config_path: Path) -> None:
    skip_untrained(config_path)  # a recipe whose weights are not shipped (licence)
    config = load_config(config_path)
    shared = _reads_shared_data(config.input.path)
    if shared and not _has_items(config.input.path):
        # Configs tuned on ../shared/data (not in the repository): skip where it is absent;
        # the configs on bundled data (tests/data) must still find their input.
        pytest.skip(f"{config_path.name}: shared data not found at {config.input.path}")
    readers, failures = discover_items(config.input.path)
    assert readers and not failures
    for reader in readers:
        info = reader.info
        shape = info.spatial_shape
        image = reader.read(tuple(slice(0, n) for n in shape))
        plan = compile_pipeline(
            config.pipeline,
            spatial_ndim=len(shape),
            channels=info.n_channels,
            dtype=info.dtype,
            nodata=info.nodata,
        )
        nodata = info.nodata
        whole = segment(image, config.pipeline, block_shape=shape, channel_axis=0, nodata=nodata)
        assert whole.any(), f"{info.id}: the reference found nothing; the test would be vacuous"
        for k, layout in enumerate(_layouts(shape, config.blocks.shape)):
            tiny = layout == (7,) * len(shape) or layout[0] == 1
            has_model = any(step.get("op") == "model" for step in config.pipeline)
            if has_model and (k == 2 or (k == 1 and len(shape) == 3)):
                # fifths: 25 blocks, each running the network over its whole halo (the flow
                # check's reaches 221 px: the whole image 25 times, minutes on CPU); the
                # configured and uneven layouts cross the same seams, and
                # tests/engine/test_models_op.py runs the model step on many small layouts
                # (a 3-D model's thirds too: test_ct_nnunet_example.py runs the CT config on
                # three layouts with its spacing)
                continue
            if tiny and has_model:
                # every 7-px block runs the whole 256^2 tile the item fits in: ~1,300 forward
                # passes of the network (minutes on CPU); tests/engine/test_models_op.py runs
                # the model step on tiny blocks with small tiles
                continue
            blocks = np.prod([-(-n // b) for n, b in zip(shape, layout, strict=True)])
            if has_model and len(shape) == 3 and blocks > 64:
                # a 3-D model's blocks each run the 16 x 48 x 48 tiles around them: 216 blocks
                # of a CT are minutes on CPU; tests/engine/test_ct_nnunet_example.py runs
                # configs/ct-nnunet.yaml on thin slabs, with the CT's spacing as well
                continue
            if tiny and (np.prod(shape) > 200_000 or shared):
                # thousands of tiny blocks: covered by the smaller (bundled) items; on the
                # real shared-data items, a block of 7 pixels with the ~130 px halo of a
                # watershed is the whole image thousands of times over (minutes per config)
                continue
            result = segment(
                image, config.pipeline, block_shape=layout, channel_axis=0, nodata=nodata
            )
            if plan.out_kind == "labels":
                assert_labels_equal(result, whole)
            else:
                np.testing.assert_array_equal(result, whole)


@pytest.mark.shared_data
def test_nuclei_config_on_all_dsb2018_images() -> None:
    """The nuclei pipeline on the five DSB2018 images of ../shared/data (CC0)."""
    folder = SHARED / "microscopy" / "dsb2018_nuclei"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    config = load_config(CONFIGS[0].parent / "nuclei.yaml")
    readers, failures = discover_items(str(folder / "*" / "image.png"))
    assert len(readers) == 5 and not failures
    for reader in readers:
        shape = reader.info.spatial_shape
        image = reader.read(tuple(slice(0, n) for n in shape))
        whole = segment(image, config.pipeline, block_shape=shape, channel_axis=0)
        for layout in [(128, 128), (100, 77)]:
            result = segment(image, config.pipeline, block_shape=layout, channel_axis=0)
            assert_labels_equal(result, whole)


class _Array:
    """An in-memory array read by window, as evaluate_item reads a store."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.array[region]


def _whole(reader: object) -> np.ndarray:
    shape = reader.info.spatial_shape  # type: ignore[attr-defined]
    return reader.read(tuple(slice(0, n) for n in shape))  # type: ignore[attr-defined]


NUCLEI_CONFIGS = [
    "nuclei-fluorescence-cells",
    "nuclei-tissue",
    "nuclei-histology",
    "nuclei-brightfield",
]


@pytest.mark.shared_data
def test_nuclei_configs_reach_mean_ap50_07_on_dsb2018() -> None:
    """Issue 4's quality target: each DSB2018 image scored by the config for its modality
    (every image exactly once), mean AP50 >= 0.7; the README reports these scores."""
    folder = SHARED / "microscopy" / "dsb2018_nuclei"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    scores: dict[str, float] = {}
    with LocalExecutor(2) as executor:
        for name in NUCLEI_CONFIGS:
            config = load_config(CONFIGS[0].parent / f"{name}.yaml")
            readers, failures = discover_items(config.input.path)
            assert readers and not failures, name
            for reader in readers:
                image = _whole(reader)
                labels = segment(image, config.pipeline, block_shape=(256, 256), channel_axis=0)
                path = Path(reader.info.path).parent
                reference = _whole(open_item(str(path / "labels.tif"), "reference"))[0]
                result = evaluate_item(
                    _Array(labels), _Array(reference), labels.shape,
                    instances=True, executor=executor,
                )  # fmt: skip
                assert path.name not in scores, f"{path.name} matched by two configs"
                scores[path.name] = float(result["ap50"])
    assert len(scores) == 5
    assert np.mean(list(scores.values())) >= 0.7, scores


@pytest.mark.shared_data
def test_ct_body_holds_every_tumour_voxel() -> None:
    """The body mask of ct-body.yaml contains the physicians' tumour contour of every IBSI
    STS case (issue 4), and is neither empty nor the whole volume."""
    folder = SHARED / "medical" / "ibsi_sts_ct"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    config = load_config(CONFIGS[0].parent / "ct-body.yaml")
    readers, failures = discover_items(config.input.path)
    assert len(readers) == 3 and not failures
    for reader in readers:
        body = segment(_whole(reader), config.pipeline, block_shape=(32, 128, 128), channel_axis=0)
        mask_path = Path(reader.info.path).parent / "CT_mask.nii.gz"
        tumour = _whole(open_item(str(mask_path), "tumour"))[0] != 0
        assert tumour.any()
        assert body[tumour].all(), f"{reader.info.id}: tumour voxels outside the body mask"
        assert 0.3 < body.mean() < 0.95, f"{reader.info.id}: body fraction {body.mean():.3f}"


UNET = CONFIGS[0].parent / "nuclei-unet.yaml"

#: AP50 of configs/nuclei-unet.yaml on the bundled sample, 003cee89... (an image the shipped
#: model never saw in training): measured 0.972 (35 of 36 nuclei matched, none extra) on
#: 2026-12-01, from the PNG and from its 1-band TIFF alike. The floor leaves room for two more
#: nuclei lost or split (0.9 ~ 34 of 36 matched with 2 extra or missed objects) by
#: float-kernel differences between CPUs; the classical nuclei.yaml scores 0.892 there, so
#: the floor still says the model is at least as good as the classical pipeline.
UNET_SAMPLE_AP50_FLOOR = 0.9


def _ap50(labels: np.ndarray, reference: np.ndarray) -> float:
    with LocalExecutor(1) as executor:
        result = evaluate_item(
            _Array(labels), _Array(reference), labels.shape, instances=True, executor=executor
        )
    return float(result["ap50"])


def test_nuclei_unet_on_the_bundled_png_and_a_one_band_tiff(tmp_path: Path) -> None:
    """The shipped model config takes the RGBA PNG and a single-channel fluorescence TIFF of
    the same image (its `luma` step makes both one channel) and finds the nuclei in both."""
    config = load_config(UNET)
    readers, failures = discover_items(config.input.path)
    assert len(readers) == 1 and not failures
    rgba = _whole(readers[0])
    assert rgba.shape[0] == 4 and (rgba[0] == rgba[1]).all() and (rgba[0] == rgba[2]).all()
    tiff = tmp_path / "image.tif"
    tifffile.imwrite(tiff, rgba[0])  # the grey plane, as a microscope writes it: (y, x) uint8
    band = _whole(open_item(str(tiff)))
    assert band.shape == (1, *rgba.shape[1:])
    folder = Path(readers[0].info.path).parent
    reference = _whole(open_item(str(folder / "labels.tif"), "reference"))[0]

    block = tuple(config.blocks.shape)
    from_png = segment(rgba, config.pipeline, block_shape=block, channel_axis=0)
    from_tiff = segment(band, config.pipeline, block_shape=block, channel_axis=0)
    for labels in (from_png, from_tiff):
        assert _ap50(labels, reference) >= UNET_SAMPLE_AP50_FLOOR
    # luma of a grey RGBA pixel is its grey value up to float32 rounding (see test_intensity),
    # so both inputs give the same nuclei (measured: identical labels). A few pixels are
    # allowed to differ where the network's argmax sits on a near-tie that this rounding
    # can tip.
    assert from_png.max() == from_tiff.max()
    assert ((from_png > 0) != (from_tiff > 0)).sum() <= 10


#: configs/nuclei-unet.yaml on the DSB2018 fluorescence images, as the README's table reports
#: them (`segflow run` + `segflow evaluate`, 2026-12-01): 003cee89... was held out of the
#: shipped model's training, the other two were trained on.
UNET_AP50 = {"003cee89": 0.972, "10ba6cbe": 0.884, "538b7673": 0.424}


@pytest.mark.shared_data
def test_nuclei_unet_ap50_table_on_dsb2018() -> None:
    folder = SHARED / "microscopy" / "dsb2018_nuclei"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    config = load_config(UNET)
    scores = {}
    for short in UNET_AP50:
        (path,) = folder.glob(f"{short}*/image.png")
        image = _whole(open_item(str(path)))
        # one block: the scores are layout-free (test_config_blockwise_equals_whole), and the
        # halo of 256^2 blocks runs the network over a third more pixels
        labels = segment(image, config.pipeline, block_shape=image.shape[1:], channel_axis=0)
        reference = _whole(open_item(str(path.parent / "labels.tif"), "reference"))[0]
        scores[short] = _ap50(labels, reference)
    # 0.03: float kernels of another CPU may move a few boundary pixels and flip one or two
    # matches at IoU 0.5 (one nucleus of 67 is 0.015 AP50 on 10ba6cbe...); a retrained or
    # altered checkpoint moves these scores by far more.
    for short, expected in UNET_AP50.items():
        assert scores[short] == pytest.approx(expected, abs=0.03), scores


FLOWS = CONFIGS[0].parent / "nuclei-flows.yaml"

#: AP50 of configs/nuclei-flows.yaml on the bundled sample (the flow model trained on
#: synthetic images only never saw it): measured 0.946 (35 of 36 matched, 1 extra) on
#: 2026-12-07 from the PNG with the config's flow check (flow_threshold 0.5; 0.947 without
#: it); the floor leaves room for one nucleus lost or split by float-kernel differences
#: between CPUs (0.895; a second would give 0.846).
FLOWS_SAMPLE_AP50_FLOOR = 0.88


DSB_MODEL = CONFIGS[0].parent / "nuclei-dsb.yaml"

#: AP50 of configs/nuclei-dsb.yaml on the bundled sample (held out of the model's training):
#: measured 0.972 (35 of 36 matched, none extra; AP50:95 0.806) on 2026-12-07 from the PNG;
#: the floor leaves room for one nucleus lost or split by float-kernel differences between
#: CPUs, and stays above the synthetic-only flow model's 0.946.
DSB_SAMPLE_AP50_FLOOR = 0.92


@pytest.mark.parametrize(
    ("config_path", "floor"),
    [(FLOWS, FLOWS_SAMPLE_AP50_FLOOR), (DSB_MODEL, DSB_SAMPLE_AP50_FLOOR)],
    ids=["nuclei-flows", "nuclei-dsb"],
)
def test_flow_models_on_the_bundled_png_and_a_16_bit_tiff(
    tmp_path: Path, config_path: Path, floor: float
) -> None:
    """The shipped flow models (synthetic-only and DSB2018-trained) find the nuclei in the
    RGBA PNG and in a single-channel 16-bit TIFF of the same image, as microscopes write
    them (whole-item percentile scaling makes the dtype irrelevant)."""
    config = load_config(config_path)
    readers, failures = discover_items(config.input.path)
    assert len(readers) == 1 and not failures
    rgba = _whole(readers[0])
    tiff = tmp_path / "image.tif"
    tifffile.imwrite(tiff, rgba[0].astype(np.uint16) * 257)  # (y, x) uint16, full range
    band = _whole(open_item(str(tiff)))
    assert band.shape == (1, *rgba.shape[1:]) and band.dtype == np.uint16
    folder = Path(readers[0].info.path).parent
    reference = _whole(open_item(str(folder / "labels.tif"), "reference"))[0]
    block = tuple(config.blocks.shape)
    for image in (rgba, band):
        labels = segment(image, config.pipeline, block_shape=block, channel_axis=0)
        assert _ap50(labels, reference) >= floor


#: configs/nuclei-dsb.yaml on the five DSB2018 images of ../shared/data, none of which its
#: training saw, as the README's table reports them (`segflow run` + `segflow evaluate`,
#: 2026-12-07).
DSB_AP50 = {
    "003cee89": 0.972,
    "00ae65c1": 0.605,
    "091944f1": 0.493,
    "10ba6cbe": 0.941,
    "538b7673": 0.290,
}


@pytest.mark.shared_data
def test_nuclei_dsb_ap50_table_on_dsb2018() -> None:
    folder = SHARED / "microscopy" / "dsb2018_nuclei"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    config = load_config(DSB_MODEL)
    scores = {}
    for short in DSB_AP50:
        (path,) = folder.glob(f"{short}*/image.png")
        image = _whole(open_item(str(path)))
        # one block: the scores are layout-free (test_config_blockwise_equals_whole)
        labels = segment(image, config.pipeline, block_shape=image.shape[1:], channel_axis=0)
        reference = _whole(open_item(str(path.parent / "labels.tif"), "reference"))[0]
        scores[short] = _ap50(labels, reference)
    # 0.03 as for the U-Net's table: another CPU's float kernels may flip a match or two; a
    # retrained or altered checkpoint moves these scores by far more.
    for short, expected in DSB_AP50.items():
        assert scores[short] == pytest.approx(expected, abs=0.03), scores

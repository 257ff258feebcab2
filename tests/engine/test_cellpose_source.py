"""Cellpose 4 checkpoints run as a ``model`` step and equal cellpose's own evaluation.

cellpose 4.2.1 is imported through ``_cellpose.import_cellpose`` (a stand-in for the
torchvision modules its network, tiling and dynamics never call: torchvision's PyPI wheels
do not import against this project's CPU torch). The networks are CPSAM as cellpose builds
it (``cellpose.vit.CPSAM``), randomly initialised from a seed and saved with ``torch.save``
as cellpose saves a checkpoint. On CPU its encoder, SAM's ViT-L (304 M parameters, seconds
per tile here), is built smaller: ``cellpose.vit.sam_model_registry["vit_l"]`` is pointed,
for the duration of a test, at segment_anything's own ``_build_sam`` with 2 blocks of width
32. Everything else is cellpose's code as it is (the patch embedding at stride 8, the
position grid cut to 32 x 32 for 256 tiles, global attention, the neck, the readout and W2;
``CellposeModel`` building the net and loading the file): 0.75 M parameters, milliseconds a
tile. The ``gpu``-marked test runs the full-size CPSAM. The readout's weights are scaled by 5
so the random flows and cell probabilities reach what trained networks give (tens of masks
on a 100 x 120 image) rather than almost none.

The reference is ``CellposeModel.eval`` (normalisation, padding, tiling, the network, the
taper blending, ``compute_masks`` and its hole filling) at ``flow_threshold=0`` (segflow's
``flow_dynamics`` has no flow-error check) and ``min_size=-1``.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _cellpose import import_cellpose
from _layouts import layouts, smooth_noise
from hypothesis import HealthCheck, assume, given, settings

from segflow import segment
from segflow.errors import ConfigError, ModelError, PlanError
from segflow.models.sources import card_lines, describe_model, load_source, source_for
from segflow.models.tiling import tile_weights

# cellpose's get_masks_torch builds a torch sparse tensor without opting in or out of its
# invariant checks; torch warns about that inside cellpose, nothing segflow does.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

try:
    import_cellpose()
    from cellpose import models as cp_models
    from cellpose import transforms as cp_transforms
    from cellpose import utils as cp_utils
    from cellpose import vit as cp_vit
except Exception as error:  # absent, or its network's segment_anything missing
    cp_models = cp_transforms = cp_utils = cp_vit = None
    MISSING = f"cellpose (with segment-anything) does not import: {error}"
else:
    MISSING = ""
pytestmark = [
    pytestmark,
    pytest.mark.skipif(cp_models is None, reason=MISSING or "cellpose imports"),
]
NITER, MAX_TRAVEL = 200, 64


def _tiny_encoder(checkpoint: Any = None) -> Any:
    build = sys.modules["segment_anything.build_sam"]
    return build._build_sam(
        encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
        encoder_global_attn_indexes=[1], checkpoint=checkpoint,
    )  # fmt: skip


@pytest.fixture
def tiny_cpsam(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPSAM with a 2-block encoder while the test runs (segflow and cellpose load alike)."""
    monkeypatch.setitem(cp_vit.sam_model_registry, "vit_l", _tiny_encoder)


def _save_random_cpsam(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = cp_vit.CPSAM()
    with torch.no_grad():
        net.out.weight *= 5.0
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cp_vit.sam_model_registry, "vit_l", _tiny_encoder)
        yield _save_random_cpsam(tmp_path_factory.mktemp("cellpose") / "cpsam_random", 0)


def _step(path: Path, **extra: Any) -> dict[str, Any]:
    return {"op": "model", "path": str(path), "device": "cpu", "batch_size": 2,
            "output": "raw", **extra}  # fmt: skip


DYNAMICS = {"op": "flow_dynamics", "niter": NITER, "min_size": 0, "max_travel": MAX_TRAVEL}


def _image(channels: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth blobs of 16-bit-like intensities, ``(c, y, x)``."""
    return np.stack([smooth_noise(shape, seed + c, sigma=3.0) * 4000 for c in range(channels)])


def _cellpose_eval(
    path: Path, image: np.ndarray, diameter: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cellpose's masks and ``(dY, dX, cellprob)`` of ``image`` ``(c, y, x)``."""
    model = cp_models.CellposeModel(
        pretrained_model=str(path), device=torch.device("cpu"), use_bfloat16=False
    )
    x = image[0] if len(image) == 1 else image
    masks, flows, _ = model.eval(x, channel_axis=None if len(image) == 1 else 0, niter=NITER,
                                 flow_threshold=0, min_size=-1, diameter=diameter)  # fmt: skip
    return masks, np.concatenate([flows[1], flows[2][None]])


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """The same background and the same groups of pixels (ids may differ)."""
    assert a.shape == b.shape
    np.testing.assert_array_equal(a == 0, b == 0)
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def _filled(labels: np.ndarray) -> np.ndarray:
    """segflow's masks with their holes filled as cellpose's eval fills them."""
    return cp_utils.fill_holes_and_remove_small_masks(labels.astype(np.uint32), min_size=-1)


# --- the card ------------------------------------------------------------------------------


def test_the_card_comes_from_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    described = describe_model(checkpoint)
    card = described.card
    assert described.source == "cellpose" and described.channel_range == (1, 3)
    assert [c.name for c in card.channels] == ["channel_0", "channel_1", "channel_2"]
    assert {(c.normalization.method, c.normalization.low, c.normalization.high)
            for c in card.channels} == {("percentile", 1.0, 99.0)}  # fmt: skip
    assert (card.tile, card.overlap, card.tile_rule) == ((256, 256), 0.1, "cellpose")
    assert (card.window, card.head) == ("taper", "flows")
    assert card.classes == ("flow_y", "flow_x", "cellprob") and card.activation == "none"
    assert card.diameter == 30.0  # eval(diameter=d) zooms by 30 / d
    lines = card_lines(str(checkpoint), described)
    assert "note: takes 1 to 3 channels (the step's `channels`), as cellpose 4 does" in lines
    assert "object diameter: 30 px in training (the step's `diameter` zooms items to it)" in lines
    renamed = tmp_path / "cpsam.pt"  # a .pt suffix is not taken for TorchScript
    renamed.write_bytes(checkpoint.read_bytes())
    assert source_for(renamed).name == "cellpose"


def test_the_taper_window_is_cellposes() -> None:
    expected = cp_transforms._taper_mask(ly=256, lx=256)
    # float32 weights scaled to a peak of 1 (cellpose's peak is 1 - 1.2e-6)
    np.testing.assert_allclose(tile_weights((256, 256), window="taper"),
                               expected / expected.max(), rtol=1e-6, atol=0)  # fmt: skip


# --- equality with cellpose's own evaluation -----------------------------------------------


@pytest.mark.parametrize(
    ("channels", "shape"),
    [(1, (100, 120)), (3, (100, 120)), (1, (250, 100)), (3, (300, 290)), (2, (420, 200))],
)
def test_flows_and_masks_equal_cellposes_eval(
    checkpoint: Path, tiny_cpsam: None, channels: int, shape: tuple[int, int]
) -> None:
    """One tile (padded around the image's centre), two tiles along an axis shorter than a
    tile (250: cellpose pads it to 266), and grids of 2 x 2 and 3 x 2 tiles."""
    image = _image(channels, shape, seed=channels)
    masks, flows = _cellpose_eval(checkpoint, image)
    step = _step(checkpoint, channels=channels)
    raw = segment(image, [step], channel_axis=0)
    # The same float32 network on the same tiles; the normalised input differs in rounding
    # (cellpose subtracts float64 percentiles in place, segflow a float32 offset and scale),
    # which the network carries to about 1e-5 on flows of magnitude ~7 (measured 9e-6), and
    # the blending sums in float64 here, float32 there. 1e-4 still fails on any other
    # normalisation, padding, tile placement or window (those move flows by 1e-2 and more).
    np.testing.assert_allclose(raw, flows, rtol=0, atol=1e-4)
    labels = _filled(segment(image, [step, DYNAMICS], channel_axis=0))
    assert masks.max() >= 5  # a random network: 7 to a thousand masks on these images
    # On segflow's own flows, cellpose's mask computation gives segflow's masks exactly ...
    assert_same_partition(labels, _filled(_compute_masks(raw)))
    # ... and against eval's masks, from flows 1e-5 away, a pixel whose path ends on the edge
    # of a histogram bin or a seed's region can end in another mask: at most 1 pixel in
    # 10,000 (measured: 0 on the one-tile images, 5 of 87,000 on 300 x 290 with 1,194
    # masks); a wrong flow, threshold or hole filling moves whole masks.
    assert _mismatched_pixels(labels, masks) <= labels.size // 10_000


@pytest.mark.parametrize("diameter", [40.0, 24.0])
def test_a_diameter_zooms_as_cellposes_eval_does(
    checkpoint: Path, tiny_cpsam: None, diameter: float
) -> None:
    """``diameter`` 40 (cellpose zooms 100 x 120 to 75 x 90) and 24 (to 125 x 150): sizes
    where cellpose's ``int`` and segflow's ``round`` of the zoomed shape agree."""
    image = _image(1, (100, 120), seed=4)
    masks, flows = _cellpose_eval(checkpoint, image, diameter=diameter)
    step = _step(checkpoint, channels=1, diameter=diameter)
    raw = segment(image, [step], channel_axis=0, block_shape=(60, 50))
    # as in test_flows_and_masks_equal_cellposes_eval, plus the zoom: OpenCV's bilinear
    # resize in float32 both ways (segflow's in float64), rounding the network carries
    np.testing.assert_allclose(raw, flows, rtol=0, atol=1e-4)
    assert np.abs(raw - segment(image, [_step(checkpoint, channels=1)], channel_axis=0)).max() > 0.1
    labels = _filled(segment(image, [step, DYNAMICS], channel_axis=0, block_shape=(60, 50)))
    assert masks.max() >= 3
    assert_same_partition(labels, _filled(_compute_masks(raw)))  # on segflow's own flows
    # against eval's masks, from flows 1e-5 away: a few pixels on the edge of a histogram
    # bin or a seed's region (measured 3 of 12,000 at 40); a wrong zoom moves whole masks
    assert _mismatched_pixels(labels, masks) <= labels.size // 2_000


def _compute_masks(raw: np.ndarray) -> np.ndarray:
    from cellpose import dynamics

    return dynamics.compute_masks(raw[:2], raw[2], niter=NITER, flow_threshold=0, min_size=-1,
                                  device=torch.device("cpu"))  # fmt: skip


def _mismatched_pixels(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels outside a one-to-one matching of ``a``'s and ``b``'s masks (background with
    background), matched greedily by overlap, largest first."""
    pairs, counts = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1, return_counts=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    matched = 0
    for k in np.argsort(-counts, kind="stable"):
        i, j = int(pairs[0, k]), int(pairs[1, k])
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched += int(counts[k])
    return a.size - matched


@given(layout=layouts(2, max_side=300))
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_block_layout_gives_the_whole_items_result(
    checkpoint: Path, layout: tuple[tuple[int, ...], tuple[int, ...], int]
) -> None:
    shape, blocks, seed = layout
    # at most 16 blocks: every block runs the tiles around it (the halo is a tile);
    # flow_dynamics needs 2 pixels along each axis
    assume(all(b * 4 >= n >= 2 for b, n in zip(blocks, shape, strict=True)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cp_vit.sam_model_registry, "vit_l", _tiny_encoder)
        image = _image(1, (shape[0], shape[1]), seed)
        step = _step(checkpoint, channels=1)
        whole = segment(image, [step], channel_axis=0)
        raw = segment(image, [step], channel_axis=0, block_shape=blocks)
        # the same tiles in batches of the same shape, blended in the same order
        np.testing.assert_array_equal(raw, whole)
        labels = segment(image, [step, DYNAMICS], channel_axis=0)
        blocked = segment(image, [step, DYNAMICS], channel_axis=0, block_shape=blocks)
    assert_same_partition(blocked, labels)


def test_larger_than_a_tile_blocks_equal_the_whole_item(checkpoint: Path, tiny_cpsam: None) -> None:
    """2 x 2 tiles and their overlaps, cut by blocks that do not follow the tiles."""
    image = _image(3, (300, 290), seed=7)
    step = _step(checkpoint)
    whole = segment(image, [step, DYNAMICS], channel_axis=0)
    assert whole.max() >= 20
    for blocks in [(150, 145), (97, 211)]:
        assert_same_partition(segment(image, [step, DYNAMICS], channel_axis=0,
                                      block_shape=blocks), whole)  # fmt: skip


# --- what is refused, in one line ----------------------------------------------------------


def test_files_that_are_not_cellpose_4_checkpoints_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "unet"
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3)}, other)
    with pytest.raises(ModelError, match=r"no model source recognises it \(known: .*Cellpose 4"):
        source_for(other)
    cp3 = tmp_path / "cyto3"
    cp3_layer = "downsample.down.res_down_0.conv.conv_0.2.weight"
    torch.save({"diam_mean": torch.ones(1), "diam_labels": torch.ones(1),
                cp3_layer: torch.zeros(1)}, cp3)  # fmt: skip
    with pytest.raises(ModelError, match=r"'.*cyto3' is not a cellpose 4 network \(no W2 .*"
                       r"cellpose 3 models do not run in cellpose 4"):  # fmt: skip
        describe_model(cp3)
    text = tmp_path / "notes"
    text.write_text("not a model")
    with pytest.raises(ModelError, match=r"no model source recognises it"):
        source_for(text)
    assert not zipfile.is_zipfile(text)


def test_a_checkpoint_missing_layers_is_refused(
    checkpoint: Path, tiny_cpsam: None, tmp_path: Path
) -> None:
    state = torch.load(checkpoint, weights_only=True)
    del state["encoder.blocks.1.mlp.lin1.weight"]
    cut = tmp_path / "cut"
    torch.save(state, cut)
    card = describe_model(cut).card
    with pytest.raises(ModelError, match=r"'.*cut' does not fit cellpose's network: 1 keys "
                       r"missing \['encoder.blocks.1.mlp.lin1.weight'\]"):  # fmt: skip
        load_source(cut, card)


def test_channel_counts_the_network_does_not_take_are_refused(
    checkpoint: Path, tiny_cpsam: None
) -> None:
    image = _image(2, (40, 40), seed=0)
    with pytest.raises(PlanError, match=r"expects 3 channels \(channel_0, channel_1, "
                       r"channel_2\), the image has 2 at this step: set the step's "
                       r"`channels: 2`"):  # fmt: skip
        segment(image, [_step(checkpoint)], channel_axis=0)
    with pytest.raises(ConfigError, match=r"`channels` \(4\) cannot be used, the model's "
                       r"checkpoint .* takes 1 to 3 input channels"):  # fmt: skip
        segment(np.concatenate([image, image]), [_step(checkpoint, channels=4)], channel_axis=0)


def test_cellpose_not_importing_is_one_line(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cellpose

    monkeypatch.delattr(cellpose, "models")
    monkeypatch.setitem(sys.modules, "cellpose.models", None)
    with pytest.raises(ModelError, match=r"^Cellpose checkpoints need the cellpose package, "
                       r"which does not import here \(.*\): pip install 'cellpose>=4,<5' with "
                       r"the torchvision built for torch \S+$"):  # fmt: skip
        load_source(checkpoint, describe_model(checkpoint).card)


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_size_cpsam_on_cuda_equals_cellpose(tmp_path: Path) -> None:
    """The full CPSAM (ViT-L), random, on CUDA: segflow (bf16 autocast) against cellpose's
    eval in float32 on the same GPU, and blocks against the whole item."""
    path = _save_random_cpsam(tmp_path / "cpsam_full", 1)
    image = _image(3, (200, 230), seed=3)
    model = cp_models.CellposeModel(
        pretrained_model=str(path), device=torch.device("cuda"), use_bfloat16=False
    )
    _, flows, _ = model.eval(image, channel_axis=0, niter=NITER, flow_threshold=0, min_size=-1)
    expected = np.concatenate([flows[1], flows[2][None]])
    step = {**_step(path), "device": "cuda"}
    raw = segment(image, [step], channel_axis=0)
    # bf16 autocast (8 bits of mantissa) through 24 blocks against float32: a few percent
    # of the flows' range; a wrong normalisation, padding or channel order is off by ~100 %.
    scale = np.abs(expected).max()
    assert np.abs(raw - expected).max() <= 0.05 * scale
    assert np.corrcoef(raw.ravel(), expected.ravel())[0, 1] > 0.999
    blocked = segment(image, [step], channel_axis=0, block_shape=(100, 77))
    # the same tiles, batched alike: CUDA kernels agree to bf16 rounding at most
    np.testing.assert_allclose(blocked, raw, rtol=0, atol=1e-3 * scale)

"""The instance heads and the flow dynamics on CUDA (run on the lent GPU machine).

On CUDA the model step runs under bf16 autocast, so its raw outputs differ from float32 CPU
by up to a few 1e-2; what must hold is that the instances built from them are the CPU's
instances (matched objects at IoU > 0.5), and that cellpose's own mask computation on CUDA
groups pixels as segflow's CPU dynamics do (its float32 arithmetic on the GPU rounds
differently, so a pixel on a watershed between two sinks may go the other way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _cellpose import import_cellpose

from segflow import segment
from segflow.models.card import ModelCard
from segflow.models.checkpoint import save_checkpoint
from segflow.models.networks import build_network

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
]

ROOT = Path(__file__).parents[2]


def matched_share(a: np.ndarray, b: np.ndarray) -> float:
    """Objects of ``a`` and ``b`` matched one to one at IoU > 0.5, over the larger count."""
    from skimage.metrics import contingency_table

    table = contingency_table(a, b).toarray().astype(np.float64)
    inter = table[1:, 1:]
    union = table.sum(1)[1:, None] + table.sum(0)[None, 1:] - inter
    matched = int((inter / np.maximum(union, 1) > 0.5).sum())
    return matched / max(inter.shape[0], inter.shape[1], 1)


@pytest.mark.parametrize("diameter", [None, 20.0])
def test_the_flow_model_on_cuda_gives_the_cpu_nuclei(diameter: float | None) -> None:
    """The shipped flow model (head ``flows``) on the bundled sample, at its own pixels and
    zoomed by ``diameter``: CUDA and CPU give the same nuclei, whole and in blocks."""
    import imageio.v3 as iio

    (path,) = (ROOT / "tests" / "data" / "nuclei").glob("*/image.png")
    image = np.moveaxis(np.asarray(iio.imread(path))[..., :3], -1, 0)
    model = {"op": "model", "path": str(ROOT / "configs/models/nuclei-flows"), "output": "raw"}
    dynamics = {"op": "flow_dynamics", "min_size": 15, "max_travel": 48}
    runs = {
        device: segment(
            image,
            [{"op": "luma"}, {**model, "device": device, "diameter": diameter}, dynamics],
            block_shape=(128, 96),
            channel_axis=0,
        )
        for device in ("cpu", "cuda")
    }
    assert runs["cpu"].max() >= 30
    assert matched_share(runs["cuda"], runs["cpu"]) >= 0.95


def test_a_distance_head_on_cuda_gives_the_cpu_instances(tmp_path: Path) -> None:
    """A distance head (randomly initialised, its raw output made positive) through
    ``distance_watershed``: CUDA and CPU give the same instances."""
    card = ModelCard.model_validate(
        {
            "name": "dist",
            "architecture": {"name": "basic_unet", "params": {"features": [4, 4, 8, 8, 16, 4]}},
            "spatial_dims": 2,
            "head": "foreground_distance",
            "tile": (64, 64),
            "overlap": 0.25,
            "channels": [{"name": "dapi", "normalization": {"method": "percentile"}}],
        }
    )
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m", build_network(card.network_spec()).eval(), card)
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 50.0, (160, 200)).astype(np.float32)
    pipeline = [
        {"op": "model", "path": str(tmp_path / "m"), "output": "raw"},
        {"op": "distance_watershed", "min_distance": 3, "min_peak": 0.0, "max_object_size": 64},
        {"op": "label", "classes": True},
    ]
    runs = {
        device: segment(
            image, [{**pipeline[0], "device": device}, *pipeline[1:]], block_shape=(80, 100)
        )
        for device in ("cpu", "cuda")
    }
    assert matched_share(runs["cuda"], runs["cpu"]) >= 0.9


def test_cellposes_dynamics_on_cuda_group_pixels_as_segflow_does() -> None:
    """Random flows (as the CPU equality tests draw them): cellpose's compute_masks on CUDA
    against segflow's flow_dynamics; the same background, and at least 99.5 % of the
    foreground pixels in the groups the two agree on."""
    try:
        dynamics = import_cellpose()
    except ImportError as error:
        pytest.skip(f"cellpose does not import: {error}")
    rng = np.random.default_rng(3)
    from scipy import ndimage as ndi

    flows = ndi.gaussian_filter(rng.normal(size=(2, 96, 128)), (0, 1, 1)) * 9
    prob = ndi.gaussian_filter(rng.normal(size=(96, 128)), 1) * 3
    image = np.concatenate([flows, prob[np.newaxis]]).astype(np.float32)
    expected = dynamics.compute_masks(
        image[:2], image[2], flow_threshold=0, min_size=-1, niter=120, device=torch.device("cuda")
    )
    ours = segment(
        image,
        [{"op": "flow_dynamics", "min_size": 0, "niter": 120, "max_travel": 120}],
        block_shape=(48, 64),
        channel_axis=0,
    )
    np.testing.assert_array_equal(ours == 0, expected == 0)
    fg = ours > 0
    pairs, counts = np.unique(np.stack([ours[fg], expected[fg]]), axis=1, return_counts=True)
    best = {}
    for (a, _), n in zip(pairs.T, counts, strict=True):
        best[a] = max(best.get(a, 0), n)
    assert sum(best.values()) >= 0.995 * fg.sum()

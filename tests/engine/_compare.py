"""Comparison helpers shared by the engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import segflow


def assert_labels_equal(result: np.ndarray, reference: np.ndarray) -> None:
    """Labels equal bit for bit: the same ids, numbered in scan order of each object's first
    pixel as ``scipy.ndimage.label`` numbers them, on every block layout; stored in an
    unsigned dtype."""
    assert result.shape == reference.shape
    assert result.dtype.kind == "u", f"labels stored as {result.dtype}"
    np.testing.assert_array_equal(result, reference)


def scan_order(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 1..n in scan order of each id's first pixel (0 stays 0): the
    numbering of ``scipy.ndimage.label``, for references numbered otherwise (watershed
    markers numbered by peak height)."""
    ids, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    objects = np.flatnonzero(ids != 0)
    order = objects[np.argsort(first[objects])]
    new = np.zeros(len(ids), dtype=np.int64)
    new[order] = np.arange(1, len(order) + 1)
    return new[inverse].reshape(labels.shape)


def assert_threshold_equal(
    result: np.ndarray, image: np.ndarray, threshold: np.ndarray, rtol: float = 1e-5
) -> None:
    """``result == image > threshold`` except where the pixel equals the threshold within
    rounding (a reference's own rounding decides those); ties must be few."""
    ties = np.isclose(image.astype(np.float64), threshold, rtol=rtol, atol=rtol)
    assert ties.mean() < 0.2, "mostly ties: the comparison would say little"
    np.testing.assert_array_equal(result[~ties], (image > threshold)[~ties])


def segment_with_timeout(
    cases: list[tuple[np.ndarray, list[dict[str, Any]], int | tuple[int, ...] | None]],
    *,
    seconds: float = 60.0,
) -> list[np.ndarray]:
    """``segflow.segment(image, pipeline, block_shape=blocks)`` for each case, in one child
    process that is killed after ``seconds``: a step that never returns fails the test
    (``subprocess.TimeoutExpired``) instead of hanging CI."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        for k, (image, pipeline, blocks) in enumerate(cases):
            np.save(path / f"image{k}.npy", image)
            (path / f"args{k}.json").write_text(json.dumps([pipeline, blocks]))
        script = (
            "import json, sys, numpy as np\n"
            "from pathlib import Path\n"
            "from segflow import segment\n"
            "path, n = Path(sys.argv[1]), int(sys.argv[2])\n"
            "for k in range(n):\n"
            "    pipeline, blocks = json.loads((path / f'args{k}.json').read_text())\n"
            "    blocks = tuple(blocks) if isinstance(blocks, list) else blocks\n"
            "    image = np.load(path / f'image{k}.npy')\n"
            "    np.save(path / f'result{k}.npy', segment(image, pipeline, block_shape=blocks))\n"
        )
        # The child imports the segflow this process imported, wherever it comes from.
        source = str(Path(segflow.__file__).parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
        }
        subprocess.run(
            [sys.executable, "-c", script, str(path), str(len(cases))],
            check=True,
            timeout=seconds,
            env=env,
        )
        return [np.load(path / f"result{k}.npy") for k in range(len(cases))]

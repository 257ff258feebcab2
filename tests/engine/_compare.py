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


def assert_same_labels(result: np.ndarray, reference: np.ndarray) -> None:
    """Labels equal up to relabelling: same background, and a one-to-one id mapping."""
    assert result.shape == reference.shape
    np.testing.assert_array_equal(result > 0, reference > 0, err_msg="foreground differs")
    pairs = np.unique(np.stack([result.ravel(), reference.ravel()], axis=1), axis=0)
    pairs = pairs[pairs[:, 0] > 0]
    assert len(np.unique(pairs[:, 0])) == len(pairs), "a result label covers several objects"
    assert len(np.unique(pairs[:, 1])) == len(pairs), "an object is split into several labels"
    n = int(reference.max())
    assert int(result.max()) == n, "result ids are not consecutive 1..n"


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

"""Comparison helpers shared by the engine tests."""

from __future__ import annotations

import numpy as np


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

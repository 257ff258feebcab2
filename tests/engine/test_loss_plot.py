"""The training loss plot: both curves, a frame with ticks, a legend; NaN points left out."""

from __future__ import annotations

import numpy as np

from segflow.models.loss_plot import TRAIN_COLOUR, VAL_COLOUR, draw_loss_curve, nice_ticks


def _pixels(plot: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Where ``plot`` has ``colour`` (give or take the smoothing of the scaled-down lines)."""
    return np.all(np.abs(plot.astype(int) - colour) <= 40, axis=-1)


def test_the_plot_draws_both_losses_in_a_frame_with_a_legend() -> None:
    losses = [2.0 * 0.8**k + 0.3 for k in range(12)]
    val_losses = [2.2 * 0.82**k + 0.4 for k in range(12)]

    plot = draw_loss_curve(losses, val_losses, title="nuclei-unet: loss per epoch")

    assert plot.shape == (400, 640, 3) and plot.dtype == np.uint8
    train, val = _pixels(plot, TRAIN_COLOUR), _pixels(plot, VAL_COLOUR)
    assert train.sum() > 500 and val.sum() > 500
    # The validation loss is higher: its curve lies above (smaller rows) at the first epoch.
    cols = np.flatnonzero(train.any(0) & val.any(0))
    first = cols[0]
    assert np.flatnonzero(val[:, first]).min() < np.flatnonzero(train[:, first]).min()
    # A legend sample of each colour in the top-right corner, right of the curves' end.
    corner = (slice(40, 120), slice(440, 640))
    assert train[corner].sum() > 20 and val[corner].sum() > 20
    # The frame: long dark lines (axes), and text (dark pixels) left of and below it.
    dark = plot.max(axis=-1) < 160  # grey where a 1-pixel line falls between two pixels
    assert dark[:, 79:82].any(1).mean() > 0.7 and dark[343:346].any(0).mean() > 0.8
    assert dark[40:344, :72].sum() > 200  # y tick labels and the "loss" label
    assert dark[350:400, 80:620].sum() > 200  # x tick labels and the "epoch" label
    assert dark[:30].sum() > 200  # the title


def test_a_missing_validation_loss_draws_only_the_training_curve() -> None:
    plot = draw_loss_curve([1.0, 0.8, 0.7], [float("nan")] * 3, title="old run")

    assert _pixels(plot, TRAIN_COLOUR).sum() > 200
    assert _pixels(plot, VAL_COLOUR).sum() == 0


def test_ticks_fall_on_round_values_around_the_data() -> None:
    assert nice_ticks(0.34, 2.41) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert nice_ticks(1, 7, most=10) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]

"""The training loss plot (``OUTPUT/loss.png``), drawn with Pillow.

Pillow is what segflow's image libraries (scikit-image, imageio) already install; a
plotting library (matplotlib and its font, layout and backend packages) would be a new
dependency for one figure of two lines. The plot is still a real one: axes with their
labels, ticks at round values, a grid, both curves with a legend, and a title. It is drawn
at twice its size and scaled down, which smooths the lines and the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Tab10's blue and orange, as plotting libraries draw their first two curves.
TRAIN_COLOUR = (31, 119, 180)
VAL_COLOUR = (255, 127, 14)
_SCALE = 2  # drawn at twice the size, then scaled down (smooth lines and text)


def nice_ticks(low: float, high: float, *, most: int = 6) -> list[float]:
    """About ``most`` ticks at round values (1, 2 or 5 times a power of ten) covering
    ``low..high``: the first at or below ``low``, the last at or above ``high``.

    Examples
    --------
    >>> nice_ticks(0.31, 0.87)
    [0.2, 0.4, 0.6, 0.8, 1.0]
    >>> nice_ticks(1, 40, most=5)
    [0.0, 10.0, 20.0, 30.0, 40.0]
    >>> nice_ticks(2.0, 2.0)
    [1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6]
    """
    if not high > low:
        pad = abs(low) * 0.25 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(most - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    # Rounded to the step's decimals: 0.30000000000000004 reads as 0.3.
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return [round(k * step, digits) for k in range(first, last + 1)]


def _label(value: float, step: float) -> str:
    """A tick's text with as many decimals as the step needs."""
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    return f"{value:.{digits}f}"


def draw_loss_curve(
    losses: Sequence[float],
    val_losses: Sequence[float],
    *,
    title: str,
    size: tuple[int, int] = (640, 400),
) -> np.ndarray:
    """An RGB ``(height, width, 3)`` uint8 plot of the training and validation loss per
    epoch (epochs count from 1; a NaN validation loss is left out, as in runs saved before
    segflow measured it).

    Examples
    --------
    >>> plot = draw_loss_curve([0.9, 0.6, 0.5], [1.0, 0.7, 0.65], title="nuclei-unet")
    >>> plot.shape, plot.dtype
    ((400, 640, 3), dtype('uint8'))
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = size[0] * _SCALE, size[1] * _SCALE
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13 * _SCALE)
    title_font = ImageFont.load_default(size=15 * _SCALE)
    left, right, top, bottom = 80 * _SCALE, width - 20 * _SCALE, 40 * _SCALE, height - 56 * _SCALE

    curves = [
        ("training loss", [float(v) for v in losses], TRAIN_COLOUR),
        ("validation loss", [float(v) for v in val_losses], VAL_COLOUR),
    ]
    values = [v for _, vs, _ in curves for v in vs if math.isfinite(v)]
    low, high = min(values, default=0.0), max(values, default=1.0)
    pad = 0.05 * (high - low)  # no point on the frame
    y_ticks = nice_ticks(low - pad, high + pad)
    epochs = max(len(losses), len(val_losses), 2)
    x_ticks = [t for t in nice_ticks(1, epochs, most=10) if t == int(t) and 1 <= t <= epochs]
    x_ticks = x_ticks or [1.0, float(epochs)]

    def x(epoch: float) -> float:
        return left + (epoch - 1) / (epochs - 1) * (right - left)

    def y(value: float) -> float:
        return bottom - (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)

    grey, dark = (225, 225, 225), (40, 40, 40)
    y_step = y_ticks[1] - y_ticks[0]
    for tick in y_ticks:
        draw.line([(left, y(tick)), (right, y(tick))], fill=grey, width=_SCALE)
        draw.line([(left - 5 * _SCALE, y(tick)), (left, y(tick))], fill=dark, width=_SCALE)
        draw.text((left - 8 * _SCALE, y(tick)), _label(tick, y_step), fill=dark, font=font,
                  anchor="rm")  # fmt: skip
    for tick in x_ticks:
        draw.line([(x(tick), top), (x(tick), bottom)], fill=grey, width=_SCALE)
        draw.line([(x(tick), bottom), (x(tick), bottom + 5 * _SCALE)], fill=dark, width=_SCALE)
        draw.text((x(tick), bottom + 8 * _SCALE), f"{tick:.0f}", fill=dark, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=dark, width=_SCALE)

    for _, vs, colour in curves:
        points = [(x(e + 1), y(v)) for e, v in enumerate(vs) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2 * _SCALE, joint="curve")
        for px, py in points:
            r = 3 * _SCALE
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)

    draw.text(((left + right) / 2, 12 * _SCALE), title, fill=dark, font=title_font, anchor="mt")
    draw.text(((left + right) / 2, height - 8 * _SCALE), "epoch", fill=dark, font=font,
              anchor="mb")  # fmt: skip
    label = Image.new("RGB", (int(draw.textlength("loss", font=font)) + 4, 20 * _SCALE), "white")
    ImageDraw.Draw(label).text((2, 0), "loss", fill=dark, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (14 * _SCALE, int((top + bottom - label.height) / 2)))

    # The legend, in the plot's top-right corner.
    shown = [(name, colour) for name, vs, colour in curves if any(map(math.isfinite, vs))]
    row = 20 * _SCALE
    box_width = max(int(draw.textlength(n, font=font)) for n, _, _ in curves) + 44 * _SCALE
    x0, y0 = right - box_width - 10 * _SCALE, top + 10 * _SCALE
    if shown:
        draw.rectangle([x0, y0, x0 + box_width, y0 + row * len(shown) + 8 * _SCALE],
                       fill="white", outline=(180, 180, 180), width=_SCALE)  # fmt: skip
    for k, (name, colour) in enumerate(shown):
        cy = y0 + 4 * _SCALE + row * k + row / 2
        draw.line([(x0 + 8 * _SCALE, cy), (x0 + 30 * _SCALE, cy)], fill=colour, width=2 * _SCALE)
        draw.text((x0 + 36 * _SCALE, cy), name, fill=dark, font=font, anchor="lm")
    return np.asarray(image.resize(size, Image.Resampling.BOX))

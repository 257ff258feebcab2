"""Synthetic nuclei images with exact instance labels, reproducible from a seed.

Real labelled nuclei are few (five DSB2018 images beside the project), so training mixes
them with images drawn here. Each image is built the way a microscope forms one:

1. **Layout**: nuclei scattered at random, in touching clusters, or packed edge to edge in
   a tissue band (the dense embryo case), each an ellipse with a wavy outline (random low
   Fourier harmonics of its radius), a size drawn around the image's typical radius and an
   elongation up to 2. Later nuclei lie on top of earlier ones where they overlap; one left
   with less than half of its area, or under ``min_area`` pixels, is taken out.
2. **Signal**: each nucleus has its own brightness (log-normal over about a decade, with a
   share of dim ones), a chromatin texture (smoothed noise), a rim that fades towards the
   edge; mitotic nuclei are small, condensed and saturating. Background: an offset, a
   gradient over the field, for tissue a diffuse signal under the nuclei, and unlabelled
   clutter: out-of-focus haze, fibres and debris specks.
3. **Optics and camera**: a Gaussian point-spread blur, Poisson photon noise at a random
   photon count per unit brightness (dim and bright exposures), Gaussian read noise, a
   camera offset, saturation at the top of the dtype (uint16 as microscopes write, or
   uint8 as PNG exports are).

``kind="brightfield"`` gives dark nuclei on a bright field (absorption), ``"stained"`` an
RGB image with haematoxylin-purple nuclei on eosin-pink tissue; both use the same layouts.
The labels are exact: the drawn shapes, before blur and noise.

Examples
--------
>>> image, labels = synthetic_nuclei((96, 128), seed=3)
>>> image.shape, image.dtype, labels.shape, labels.dtype
((1, 96, 128), dtype('uint16'), (96, 128), dtype('int32'))
>>> again, _ = synthetic_nuclei((96, 128), seed=3)
>>> bool((image == again).all()), int(labels.max()) > 3
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

Kind = Literal["fluorescence", "brightfield", "stained"]
KINDS: tuple[Kind, ...] = ("fluorescence", "brightfield", "stained")
Layout = Literal["scattered", "clustered", "packed"]


@dataclass(frozen=True)
class Nucleus:
    """One drawn nucleus: centre (y, x), semi-axes, angle, outline harmonics, brightness."""

    centre: tuple[float, float]
    axes: tuple[float, float]
    angle: float
    harmonics: tuple[tuple[float, float], ...]
    brightness: float
    mitotic: bool


def _smooth_noise(shape: Sequence[int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed over ``sigma`` pixels."""
    field = ndi.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def _packed(
    shape: tuple[int, int], axes: tuple[float, float], angle: float, rng: np.random.Generator
) -> np.ndarray:
    """Centres on a jittered grid of nuclei with semi-axes ``axes`` lying side by side at
    ``angle`` (edge to edge, as in an embryo's epithelium), inside a band of tissue."""
    h, w = shape
    along, across = 2 * axes[0] * rng.uniform(0.92, 1.05), 2 * axes[1] * rng.uniform(0.92, 1.05)
    reach = np.hypot(h, w)
    u, v = np.meshgrid(np.arange(-reach, reach, along), np.arange(-reach, reach, across))
    u = u + (np.arange(u.shape[0]) % 2)[:, None] * along / 2  # staggered rows
    cos, sin = np.cos(angle), np.sin(angle)
    centres = np.stack([h / 2 + u * sin + v * cos, w / 2 + u * cos - v * sin], -1).reshape(-1, 2)
    centres = centres + rng.normal(0, 0.08 * axes[1], centres.shape)
    keep = (centres >= -along).all(1) & (centres[:, 0] < h + along) & (centres[:, 1] < w + along)
    centres = centres[keep]
    band = _smooth_noise(shape, max(h, w) / 6, rng) > rng.uniform(-0.6, 0.3)
    inside = band[
        np.clip(centres[:, 0].astype(int), 0, h - 1),
        np.clip(centres[:, 1].astype(int), 0, w - 1),
    ]
    return np.asarray(centres[inside & (rng.random(len(centres)) < 0.95)])


def _centres(
    shape: tuple[int, int], radius: float, layout: Layout, rng: np.random.Generator
) -> np.ndarray:
    """Nucleus centres (n, 2) for the ``scattered`` and ``clustered`` layouts."""
    h, w = shape
    fill = rng.uniform(0.08, 0.35)  # share of the field covered by nuclei
    n = max(1, int(fill * h * w / (np.pi * radius**2)))
    if layout == "scattered":
        return rng.uniform((0, 0), (h, w), (n, 2))
    n_clusters = max(1, n // int(rng.integers(3, 9)))
    seeds = rng.uniform((0, 0), (h, w), (n_clusters, 2))
    members = seeds[rng.integers(n_clusters, size=n)]
    return np.asarray(members + rng.normal(0, 1.6 * radius, (n, 2)))


def _nuclei(
    shape: tuple[int, int], rng: np.random.Generator, layout: Layout, radius: float
) -> list[Nucleus]:
    if layout == "packed":  # one elongation and direction for the whole tissue
        stretch, direction = float(rng.uniform(1.0, 2.2)), float(rng.uniform(0, np.pi))
        axes = (radius * np.sqrt(stretch), radius / np.sqrt(stretch))
        centres = _packed(shape, axes, direction, rng)
    else:
        centres = _centres(shape, radius, layout, rng)
    nuclei = []
    for centre in centres:
        mitotic = bool(rng.random() < 0.03)
        size = radius * float(np.exp(rng.normal(0, 0.18 if layout != "packed" else 0.08)))
        size *= 0.6 if mitotic else 1.0
        if layout == "packed":
            elongation = stretch * float(rng.uniform(0.85, 1.1))
            angle = direction + float(rng.normal(0, 0.12))
        else:
            elongation, angle = float(rng.uniform(1.0, 2.0)), float(rng.uniform(0, np.pi))
        harmonics = tuple(
            (float(rng.normal(0, 0.06 / k)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4)
        )
        brightness = float(np.exp(rng.normal(0, 0.45)))
        if rng.random() < 0.12:
            brightness *= float(rng.uniform(0.12, 0.35))  # dim nuclei
        if mitotic:
            brightness *= 3.0
        nuclei.append(
            Nucleus(
                centre=(float(centre[0]), float(centre[1])),
                axes=(size * np.sqrt(elongation), size / np.sqrt(elongation)),
                angle=angle,
                harmonics=harmonics,
                brightness=brightness,
                mitotic=mitotic,
            )
        )
    return nuclei


def _footprint(
    nucleus: Nucleus, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The nucleus's bounding box in the image and its normalised radius there (< 1
    inside); None when it lies outside the image."""
    reach = max(nucleus.axes) * 1.3 + 2
    cy, cx = nucleus.centre
    box = tuple(
        slice(int(max(0, np.floor(c - reach))), int(min(n, np.ceil(c + reach) + 1)))
        for c, n in zip((cy, cx), shape, strict=True)
    )
    if any(s.stop <= s.start for s in box):
        return None
    yy, xx = np.mgrid[box[0], box[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(nucleus.angle), np.sin(nucleus.angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    theta = np.arctan2(v, u)
    wave = 1.0 + sum(
        a * np.cos(k * theta + p) for k, (a, p) in zip((2, 3, 4), nucleus.harmonics, strict=True)
    )
    rho = np.sqrt((u / nucleus.axes[0]) ** 2 + (v / nucleus.axes[1]) ** 2) / wave
    return (box[0], box[1]), rho


def _draw(
    shape: tuple[int, int], nuclei: Sequence[Nucleus], rng: np.random.Generator, min_area: int
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels (later nuclei on top) and the noiseless nuclear signal."""
    labels = np.zeros(shape, dtype=np.int32)
    signal = np.zeros(shape, dtype=np.float64)
    drawn = np.zeros(len(nuclei) + 1, dtype=np.int64)
    for k, nucleus in enumerate(nuclei, start=1):
        found = _footprint(nucleus, shape)
        if found is None:
            continue
        box, rho = found
        inside = rho < 1.0
        if not inside.any():
            continue
        drawn[k] = int(inside.sum())
        labels[box][inside] = k
        texture = 1.0 + (0.45 if nucleus.mitotic else 0.2) * _smooth_noise(
            rho.shape, 0.8 if nucleus.mitotic else 1.5, rng
        )
        rim = np.clip(1.0 - rho**4, 0.0, 1.0) ** 0.5  # fades over the outer part
        signal[box][inside] = (nucleus.brightness * texture * (0.55 + 0.45 * rim))[inside]
    kept = np.bincount(labels.ravel(), minlength=len(drawn))
    keep = (kept >= min_area) & (kept * 2 >= drawn)
    keep[0] = False
    labels[~keep[labels]] = 0
    signal[labels == 0] = 0.0
    return _renumber(labels), np.clip(signal, 0.0, None)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..n in the order of the drawn ids; pieces split by an overlap keep
    their id only where connected: a nucleus cut in two by a later one keeps its largest
    piece."""
    out = np.zeros_like(labels)
    next_id = 1
    for k, where in enumerate(ndi.find_objects(labels), start=1):
        if where is None:
            continue
        mask = labels[where] == k
        parts, n = ndi.label(mask)
        if n > 1:
            sizes = np.bincount(parts.ravel())[1:]
            mask = parts == 1 + int(np.argmax(sizes))
        out[where][mask] = next_id
        next_id += 1
    return out


def _camera(
    expected: np.ndarray, rng: np.random.Generator, dtype: np.dtype, full_scale: float
) -> np.ndarray:
    """Poisson photons, read noise, offset and saturation, quantised to ``dtype``."""
    photons = float(np.exp(rng.uniform(np.log(15), np.log(1500))))  # photons per unit signal
    counts = rng.poisson(np.clip(expected, 0, None) * photons).astype(np.float64)
    read = rng.normal(0.0, rng.uniform(0.5, 3.0), expected.shape)
    gain = full_scale / (photons * rng.uniform(2.0, 6.0))  # the brightest nuclei saturate
    offset = rng.uniform(0.0, 0.04) * full_scale
    values = offset + gain * (counts + read)
    top = np.iinfo(dtype).max
    return np.asarray(np.clip(np.rint(values), 0, top).astype(dtype))


def synthetic_nuclei(
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int | Sequence[int] = 0,
    kind: Kind = "fluorescence",
    layout: Layout | None = None,
    radius: float | None = None,
    dtype: str = "uint16",
    min_area: int = 15,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image ``(c, y, x)`` and its instance labels ``(y, x)`` (int32, 0 =
    background, 1..n in drawing order).

    Parameters
    ----------
    shape : (int, int)
    seed : int or sequence of int
        Everything random derives from ``numpy.random.default_rng(seed)``.
    kind : {"fluorescence", "brightfield", "stained"}
        Bright nuclei on dark (1 channel), dark nuclei on bright (1 channel), or purple
        nuclei on pink (3 channels, RGB).
    layout : {"scattered", "clustered", "packed"}, optional
        Default: drawn (clustered half of the time, packed one time in five).
    radius : float, optional
        Typical nucleus radius in pixels; default drawn log-uniformly from 4 to 16.
    dtype : {"uint16", "uint8"}
        The image's dtype (``stained`` is always uint8, as RGB images are).
    min_area : int
        Nuclei left with fewer pixels (after overlaps) are taken out.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` ({kind!r}) must be one of {KINDS}")
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"`dtype` ({dtype!r}) must be 'uint8' or 'uint16'")
    rng = np.random.default_rng(seed)
    layouts: tuple[Layout, ...] = ("scattered", "clustered", "clustered", "packed", "scattered")
    if kind == "stained":  # tissue sections: mostly crowded
        layouts = ("clustered", "packed", "clustered", "scattered")
    if layout is None:
        layout = layouts[int(rng.integers(len(layouts)))]
    if radius is None:
        radius = float(np.exp(rng.uniform(np.log(4.0), np.log(16.0))))
    nuclei = _nuclei(shape, rng, layout, radius)
    labels, signal = _draw(shape, nuclei, rng, min_area)
    background = _background(shape, rng, tissue=layout == "packed")
    background = background + _clutter(shape, labels, rng, radius)
    psf = rng.uniform(0.6, 2.2) * max(1.0, radius / 8)
    if kind == "fluorescence":
        expected = ndi.gaussian_filter(signal + background, psf)
        full = float(np.iinfo(np.dtype(dtype)).max)
        return _camera(expected, rng, np.dtype(dtype), full)[np.newaxis], labels
    density = signal * rng.uniform(0.5, 1.3 if kind == "brightfield" else 2.2)
    density = density + _cytoplasm(shape, nuclei, rng) + 0.4 * background
    return _absorption(ndi.gaussian_filter(density, psf), rng, kind, dtype), labels


def _cytoplasm(
    shape: tuple[int, int], nuclei: Sequence[Nucleus], rng: np.random.Generator
) -> np.ndarray:
    """Faint cell bodies around the nuclei (absorbing images show them; unlabelled)."""
    field = np.zeros(shape)
    if rng.random() < 0.3:
        return field  # bare nuclei, or a stain that leaves the cytoplasm clear
    level, scale = rng.uniform(0.05, 0.3), rng.uniform(1.5, 2.8)
    for nucleus in nuclei:
        cell = Nucleus(
            centre=nucleus.centre,
            axes=(nucleus.axes[0] * scale, nucleus.axes[1] * scale * rng.uniform(0.8, 1.2)),
            angle=nucleus.angle + rng.normal(0, 0.3),
            harmonics=tuple((3 * a, p) for a, p in nucleus.harmonics),
            brightness=level * float(rng.uniform(0.6, 1.4)),
            mitotic=False,
        )
        found = _footprint(cell, shape)
        if found is not None:
            box, rho = found
            field[box] = np.maximum(field[box], np.where(rho < 1.0, cell.brightness, 0.0))
    return field


def _clutter(
    shape: tuple[int, int], labels: np.ndarray, rng: np.random.Generator, radius: float
) -> np.ndarray:
    """What is not a nucleus but shows: out-of-focus haze around some nuclei (cells in
    other planes), thin fibres and streaks, and specks of debris (unlabelled, outside the
    nuclei), in nuclear units."""
    h, w = shape
    field = np.zeros(shape)
    if rng.random() < 0.6:  # haze: smooth, mottled glow over a few to many nuclear radii
        spots = np.zeros(shape)
        n = int(rng.integers(1, 12))
        spots[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.5, 1.0, n)
        sigma = radius * float(np.exp(rng.uniform(np.log(1.5), np.log(8.0))))
        haze = ndi.gaussian_filter(spots, sigma)
        haze *= np.clip(1 + 0.3 * _smooth_noise(shape, rng.uniform(1.0, 3.0), rng), 0, None)
        field += rng.uniform(0.1, 0.8) * haze / max(float(haze.max()), 1e-12)
    if rng.random() < 0.5:  # fibres: thin random walks
        for _ in range(int(rng.integers(1, 6))):
            steps = np.cumsum(rng.normal(0, 1, (int(rng.integers(40, 4 * max(h, w))), 2)), 0)
            direction = rng.normal(0, 1, 2)
            path = rng.uniform((0, 0), (h, w)) + steps + np.outer(np.arange(len(steps)), direction)
            at = np.rint(path).astype(int)
            ok = (at[:, 0] >= 0) & (at[:, 0] < h) & (at[:, 1] >= 0) & (at[:, 1] < w)
            field[at[ok, 0], at[ok, 1]] += rng.uniform(0.1, 0.6)
    if rng.random() < 0.5:  # debris: specks smaller than any nucleus
        n = int(rng.integers(1, 30))
        specks = np.zeros(shape)
        specks[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.3, 2.0, n)
        field += ndi.grey_dilation(specks, size=int(rng.integers(1, 3)))
    return np.where(labels > 0, 0.0, field)


def _background(shape: tuple[int, int], rng: np.random.Generator, *, tissue: bool) -> np.ndarray:
    """Offset + a gradient over the field (+ diffuse tissue signal), in nuclear units."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    slope = rng.normal(0, 0.05, 2)
    field = rng.uniform(0.005, 0.08) + slope[0] * yy + slope[1] * xx
    if tissue or rng.random() < 0.25:
        level = rng.uniform(0.1, 0.45) if tissue else rng.uniform(0.02, 0.15)
        field = field + level * np.clip(1 + 0.5 * _smooth_noise(shape, max(h, w) / 10, rng), 0, 2)
    return np.asarray(np.clip(field, 0.0, None))


def _absorption(
    density: np.ndarray, rng: np.random.Generator, kind: Kind, dtype: str
) -> np.ndarray:
    """Transmitted light through the optical ``density``: dark where the stain absorbs
    (Beer-Lambert), grey or RGB."""
    if kind == "brightfield":
        absorb = np.array([1.0])
        white = np.array([rng.uniform(0.75, 0.98)])
    else:  # haematoxylin (purple) on eosin (pink): per-channel absorption of R, G, B
        absorb = np.array([0.65, 0.95, 0.35]) * rng.uniform(0.8, 1.2, 3)
        white = rng.uniform(0.85, 0.98, 3)
    eosin = 0.0 if kind == "brightfield" else rng.uniform(0.05, 0.25)
    tissue_od = eosin * np.array([0.1, 0.7, 0.2])[: len(absorb), None, None]
    od = absorb[:, None, None] * density[None] + tissue_od
    light = white[:, None, None] * np.exp(-od)
    out_dtype = np.dtype("uint8" if kind == "stained" else dtype)
    top = float(np.iinfo(out_dtype).max)
    noisy = light + rng.normal(0, rng.uniform(0.004, 0.02), light.shape)
    return np.asarray(np.clip(np.rint(noisy * top), 0, top).astype(out_dtype))

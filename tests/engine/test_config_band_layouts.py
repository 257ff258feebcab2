"""Every shipped config on a 1-band, a 3-band (RGB) and a 4-band (RGBA) version of its sample.

A config either takes a band layout (then every layout it takes gives the same labels from
the same grey image) or refuses it before any block runs, with a message naming the step,
the band count and what it needs. ``FITS`` is that table; the README's "Which images each
config takes" shows the same one (checked below).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np
import pytest
from _configs import skip_untrained

from segflow import segment
from segflow.config import load_config
from segflow.errors import PlanError
from segflow.io import discover_items

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

#: Band counts each shipped config takes; any other is refused at planning.
FITS: dict[str, set[int]] = {
    "aerial": {1, 3, 4},
    "buildings-pan": {1, 3, 4},
    "ct": {1},
    "ct-air": {1},
    "ct-body": {1},
    "ct-bone": {1},
    "ct-nnunet": {1},
    "nuclei": {1, 3, 4},
    "nuclei-brightfield": {1, 3, 4},
    "nuclei-fluorescence-cells": {1, 3, 4},
    "nuclei-histology": {3, 4},
    "nuclei-tissue": {1, 3, 4},
    "nuclei-unet": {1, 3, 4},
    "nuclei-flows": {1, 3, 4},
    "nuclei-dsb": {1, 3, 4},
    "em-unet": {1, 3, 4},
    "buildings-unet": {1, 3, 4},
}

#: The message each refusal gives (after "pipeline[0] 'OP': "), by what the config needs.
REFUSALS = {
    "rgb": r"pipeline\[0\] 'rgb': the image has {n} band\(s\); this step needs colour: an RGB "
    r"or RGBA image \(3 or 4 bands\)",
    "expect_bands": r"pipeline\[0\] 'expect_bands': the image has {n} band\(s\), the pipeline "
    r"expects 1",
}

CROP = 256  # pixels per spatial axis (y, x); 32 slices for volumes: small, still many objects


def test_every_shipped_config_is_in_the_table() -> None:
    assert sorted(FITS) == sorted(path.stem for path in CONFIGS)


def _sample(config_path: Path) -> tuple[np.ndarray, float | None]:
    """A centred crop of the config's first item, ``(c, (z), y, x)``, and its nodata."""
    skip_untrained(config_path)
    config = load_config(config_path)
    path = config.input.path
    if not (Path(path).exists() or glob.glob(path, recursive=True)):
        pytest.skip(f"{config_path.name}: sample not found at {path} (../shared/data absent)")
    readers, _ = discover_items(path)
    info = readers[0].info
    sizes = [32] * (len(info.spatial_shape) - 2) + [CROP, CROP]
    region = tuple(
        slice(max((n - s) // 2, 0), max((n - s) // 2, 0) + min(n, s))
        for n, s in zip(info.spatial_shape, sizes, strict=True)
    )
    return readers[0].read(region), info.nodata


def _layouts(image: np.ndarray) -> dict[int, np.ndarray]:
    """1, 3 and 4 bands of the same picture: for a colour sample its RGB (the 1-band version
    is then its red band), for a grey one the grey plane repeated; alpha is opaque."""
    rgb = image[:3] if image.shape[0] >= 3 else np.concatenate([image[:1]] * 3)
    dtype = rgb.dtype
    opaque = np.iinfo(dtype).max if dtype.kind in "iu" else 1.0
    return {1: rgb[:1], 3: rgb, 4: np.concatenate([rgb, np.full_like(rgb[:1], opaque)])}


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_takes_or_refuses_each_band_layout(config_path: Path) -> None:
    skip_untrained(config_path)
    config = load_config(config_path)
    sample, nodata = _sample(config_path)
    colour = sample.shape[0] >= 3 and not (sample[0] == sample[1]).all()
    block = tuple(config.blocks.shape) if isinstance(config.blocks.shape, list) else None
    results = {}
    for n, image in _layouts(sample).items():
        run = dict(block_shape=block, channel_axis=0, nodata=nodata)
        if n in FITS[config_path.stem]:
            results[n] = segment(image, config.pipeline, **run)  # type: ignore[arg-type]
            continue
        first = config.pipeline[0]["op"]
        with pytest.raises(PlanError, match=REFUSALS[first].format(n=n)):
            segment(image, config.pipeline, **run)  # type: ignore[arg-type]

    assert results, f"{config_path.stem} takes none of the layouts"
    assert all(result.any() for result in results.values()), "the test would be vacuous"
    if 3 in results and 4 in results:
        np.testing.assert_array_equal(results[4], results[3])  # alpha is dropped, exactly
    if 1 in results and 3 in results and not colour:
        # The luma of (g, g, g) is g up to float32 rounding of 0.299 g + 0.587 g + 0.114 g (a
        # few ulps), which could tip a pixel sitting exactly on a threshold: allow 0.1 % of
        # the pixels. Measured on 2026-12-01: identical labels for every config.
        differ = (results[1] > 0) != (results[3] > 0)
        assert differ.mean() <= 1e-3, f"{differ.sum()} pixels differ between 1 and 3 bands"
        assert abs(int(results[1].max()) - int(results[3].max())) <= 1


README_SECTION = "### Which images each config takes"


def test_readme_table_says_which_band_layouts_each_config_takes() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split(README_SECTION, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        if match := re.match(r"\| `([\w-]+)\.yaml` \|(.*)\|\s*$", line):
            one, rgb, rgba = (cell.strip() for cell in match.group(2).split("|")[:3])
            rows[match.group(1)] = {
                n for n, cell in [(1, one), (3, rgb), (4, rgba)] if cell.startswith("yes")
            }
    assert rows == FITS

"""The model card: validation, item checks, whole-item normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from segflow.errors import ModelError
from segflow.models.card import (
    ChannelCard,
    ModelCard,
    Normalization,
    check_item,
    item_statistics,
    normalize_image,
)

BASE: dict[str, object] = {
    "name": "cells",
    "architecture": {"name": "basic_unet"},
    "spatial_dims": 2,
    "channels": [{"name": "dapi"}, {"name": "actin", "normalization": {"method": "zscore"}}],
    "tile": (64, 64),
}


def _card(**changes: object) -> ModelCard:
    return ModelCard.model_validate({**BASE, **changes})


def test_heads_name_their_output_channels() -> None:
    assert _card(head="foreground_distance").classes == ("foreground", "distance")
    assert _card(head="foreground_distance").activation == "none"
    assert _card(classes=["bg", "a", "b"]).network_spec().out_channels == 3
    assert _card(classes=["bg", "a"]).network_spec().in_channels == 2


def test_invalid_cards_say_why() -> None:
    with pytest.raises(ValidationError, match=r"head 'foreground_boundary' has the classes"):
        _card(head="foreground_boundary", classes=["bg", "fg"])
    with pytest.raises(ValidationError, match=r"a semantic head needs at least 2 classes"):
        _card(classes=["fg"])
    with pytest.raises(ValidationError, match=r"`tile` \(64,\) must have 2 sides"):
        _card(classes=["bg", "fg"], tile=(64,))
    with pytest.raises(ValidationError, match=r"`spacing` \(1.0,\) must have 2 values"):
        _card(classes=["bg", "fg"], spacing=(1.0,))
    with pytest.raises(ValidationError, match=r"must be a multiple of 16 on every axis"):
        _card(classes=["bg", "fg"], tile=(64, 40))
    with pytest.raises(ValidationError, match=r"`low` \(5.0\) must be below `high` \(5.0\)"):
        Normalization(method="fixed", low=5, high=5)
    with pytest.raises(ValidationError, match=r"percentiles \(1.0, 101.0\) must lie in"):
        Normalization(low=1, high=101)


def test_items_the_model_cannot_take_are_refused() -> None:
    card = _card(classes=["bg", "fg"])
    check_item(card, channels=2, spatial_ndim=2, item="a.tif")
    with pytest.raises(ModelError, match=r"item 'a.tif' has 3 channels, model 'cells' expects "):
        check_item(card, channels=3, spatial_ndim=2, item="a.tif")
    with pytest.raises(ModelError, match=r"expects 2 \(dapi, actin\)"):
        check_item(card, channels=1, spatial_ndim=2, item="a.tif")
    with pytest.raises(ModelError, match=r"item 'v.nii' is 3-D, model 'cells' is 2-D"):
        check_item(card, channels=2, spatial_ndim=3, item="v.nii")


def test_normalisation_uses_whole_item_statistics() -> None:
    rng = np.random.default_rng(0)
    image = np.stack([rng.gamma(2.0, 50.0, (60, 70)), rng.normal(10, 3, (60, 70))])
    channels = [
        ChannelCard(name="dapi"),
        ChannelCard(name="actin", normalization=Normalization(method="zscore")),
    ]
    stats = item_statistics(image, channels)
    assert stats[0] == pytest.approx(tuple(np.percentile(image[0], [1, 99])))
    assert stats[1] == pytest.approx((image[1].mean(), image[1].std()))
    whole = normalize_image(image, channels, stats)
    # A block normalised with the item's numbers is the same slice of the normalised item:
    # no seams, whatever the block.
    block = normalize_image(image[:, 10:30, 5:40], channels, stats)
    np.testing.assert_array_equal(block, whole[:, 10:30, 5:40])
    assert np.percentile(whole[0], 1) == pytest.approx(0, abs=1e-6)
    assert np.percentile(whole[0], 99) == pytest.approx(1, abs=1e-6)
    assert whole[1].std() == pytest.approx(1, rel=1e-5)
    clipped = [ChannelCard(name="x", normalization=Normalization(method="fixed", clip=True))]
    fixed = normalize_image(image[:1], clipped, item_statistics(image[:1], clipped))
    assert fixed.min() == 0 and fixed.max() == 1  # window 1..99 (values), clipped
    with pytest.raises(ModelError, match=r"image has 2 channels, the card 1, the statistics 1"):
        normalize_image(image, clipped, stats[:1])

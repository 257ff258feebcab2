"""The quick look writer: ``ITEM/quicklook.png``, the item's image thinned to ``size``
pixels with the output's outline (:mod:`segflow.store.quicklook`).

A picture, not a result: no ``output`` field turns it on and it has no share of the config
hash. A run turns it on for the first items it submits (``run.quicklooks``, each
``run.quicklook_size`` pixels) by passing ``quicklook=SIZE`` to
:func:`~segflow.engine.item.segment_item`, which adds it to the writers' ``output``
fields. Its finish step draws the picture into the staged item, so it is part of the
committed version (a committed version is never written again); failing to draw it only
adds a line to ``target.warnings`` (the item's result warns, the item still commits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from segflow.store.quicklook import QUICKLOOK_NAME
from segflow.store.writers import Writer, WriteTarget


class QuicklookSettings(BaseModel):
    """``size``: pixels of the picture's longer side (``run.quicklook_size``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(256, ge=1, description="pixels of the quick look's longer side")


def finish(target: WriteTarget, settings: QuicklookSettings, parts: Sequence[Any]) -> list[str]:
    """Draw the quick look into the staged item; a failure is a warning, not the item's."""
    from segflow.store.quicklook import write_quicklook

    try:
        write_quicklook(
            target.reader, target.root, target.info.id, target.output, size=settings.size
        )
    except Exception as error:  # a picture never fails the item
        target.warnings.append(f"no quick look ({type(error).__name__}: {error})")
        return []
    return [QUICKLOOK_NAME]


QUICKLOOK = Writer(
    name="quicklook",
    settings=QuicklookSettings,
    finish=finish,
    switch="quicklook",
    output_fields={"quicklook": "size"},
    summary="ITEM/quicklook.png: the image thinned, with the output's outline (first items)",
)

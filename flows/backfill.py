"""The ``backfill`` flow: redo chosen items of a collection with an explicit overwrite policy."""

from __future__ import annotations

from typing import Any, Literal, cast

from prefect import flow

from flows.naming import RunNamer, add_flow_run_tags, run_tags
from flows.segment import config_name, resolve_config, segment_collection


@flow(name="backfill", flow_run_name=RunNamer(config_name, kind="backfill"))
def backfill(
    config: str,
    items: list[str] | None = None,
    policy: Literal["overwrite", "missing"] = "overwrite",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Segment the items of ``config`` whose ids match ``items`` (glob patterns).

    Parameters
    ----------
    config
        Path of a YAML config.
    items
        Glob patterns on item ids, e.g. ``["tile_2024_*"]``; default: every item.
    policy
        ``"overwrite"`` redoes every matching item; ``"missing"`` only those not done with
        the same input, config and code (what a scheduled run would do).
    overrides
        ``dotted.key=value`` config overrides.

    Returns
    -------
    dict
        The summary of the ``segment-collection`` subflow run.
    """
    cfg = resolve_config(config, overrides or ())
    add_flow_run_tags([*run_tags(cfg.name, cfg.output.store), "backfill"])
    # Called as a subflow, segment_collection gives its final state's result: the summary.
    summary = segment_collection(
        config, overrides, overwrite=policy == "overwrite", item_filter=items
    )
    return cast(dict[str, Any], summary)

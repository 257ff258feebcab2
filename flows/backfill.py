"""The ``backfill`` flow: redo chosen items of a collection with an explicit overwrite policy."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from prefect import flow
from prefect.states import Cancelled, Failed

from segflow.flows._outcomes import RunOutcome, expected
from segflow.flows.naming import RunNamer, add_flow_run_tags, run_tags
from segflow.flows.segment import config_name, resolve_config, segment_collection
from segflow.tasks.artifacts import publish_summary


@flow(
    name="backfill",
    flow_run_name=RunNamer(config_name, kind="backfill"),
    persist_result=True,  # the child's summary, as JSON in Prefect's result storage
    result_serializer="json",
)
def backfill(
    config: str,
    items: list[str] | None = None,
    policy: Literal["overwrite", "missing"] = "overwrite",
    overrides: list[str] | None = None,
) -> Any:
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
        The summary of the ``segment-collection`` subflow run, also shown on this run's
        page as a markdown artifact. When the subflow run fails or is cancelled, this run
        ends in the same state (after publishing the summary).
    """
    cfg = resolve_config(config, overrides or ())
    add_flow_run_tags([*run_tags(cfg.name, cfg.output.store), "backfill"])
    state = segment_collection(
        config, overrides, overwrite=policy == "overwrite", item_filter=items, return_state=True
    )
    result = state.result(raise_on_failure=False)
    summary = result.summary if isinstance(result, RunOutcome) else result
    if isinstance(summary, dict):
        child = state.state_details.flow_run_id
        publish_summary(cfg.name, cfg.output.store, summary, run=_run_name(child))
    if state.is_failed():  # this run ends as its child did, with the same message
        return expected(Failed(message=state.message, data=result))
    if state.is_cancelled():
        return expected(Cancelled(message=state.message, data=result))
    return summary


def _run_name(flow_run_id: UUID | None) -> str:
    """The name of a flow run (its id when the API does not answer)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return str(client.read_flow_run(flow_run_id).name)  # type: ignore[arg-type]
    except Exception:
        return str(flow_run_id)

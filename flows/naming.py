"""What a flow run is called and tagged in the Prefect UI: the config's name, the time, the store.

Prefect names a flow run at random (``brave-okapi``) unless the flow says otherwise, so a
runs list of nightly aerial and CT runs could only be told apart by opening each run's
parameters. Here a run is named ``CONFIG-YYYY-MM-DDTHH:MMZ`` from its scheduled start time
(UTC, the time the deployments' cron schedules use; ``CONFIG-backfill-…`` and
``CONFIG-rebuild-…`` for runs that redo chosen items or the whole collection), and tagged
with the config's name and its output (``config:aerial``,
``store:/data/outputs/aerial.zarr``), so the UI's tag filter finds every run of a config or
of a store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

SEGFLOW_TAG = "segflow"


def format_run_name(config_name: str, when: datetime, *, kind: str | None = None) -> str:
    """``NAME[-KIND]-YYYY-MM-DDTHH:MMZ``, the time in UTC to the minute.

    Examples
    --------
    >>> from datetime import datetime, timezone, timedelta
    >>> paris = timezone(timedelta(hours=1))
    >>> format_run_name("aerial", datetime(2026, 11, 30, 3, 0, 41, tzinfo=paris))
    'aerial-2026-11-30T02:00Z'
    >>> nightly = datetime(2026, 11, 30, 2, 0, tzinfo=timezone.utc)
    >>> format_run_name("aerial", nightly, kind="backfill")
    'aerial-backfill-2026-11-30T02:00Z'
    """
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
    return f"{config_name}-{kind}-{stamp}" if kind else f"{config_name}-{stamp}"


def run_tags(
    config_name: str, output: str, *, output_kind: Literal["store", "output"] = "store"
) -> list[str]:
    """The tags a run adds to its flow run: segflow, the config's name, where it writes
    (``store:`` for a segmentation's Zarr store, ``output:`` for a training's folder).

    Examples
    --------
    >>> run_tags("aerial", "/data/outputs/aerial.zarr")
    ['segflow', 'config:aerial', 'store:/data/outputs/aerial.zarr']
    """
    return [SEGFLOW_TAG, f"config:{config_name}", f"{output_kind}:{output}"]


@dataclass(frozen=True)
class RunNamer:
    """A ``flow_run_name`` for ``@flow``: the config's name and the scheduled start time.

    ``load_name(parameters)`` gives the config's name from the flow run's parameters. When
    it cannot (the config is invalid: the run then fails with that error), the config
    file's stem stands in, so naming never stops a run. Deployment runs are named the same
    way when they start (the scheduler creates them with a random name).
    """

    load_name: Callable[[Mapping[str, Any]], str]
    kind: str | Callable[[Mapping[str, Any]], str | None] | None = None

    def __call__(self) -> str:
        from prefect.runtime import flow_run

        return self.name_for(flow_run.parameters, flow_run.scheduled_start_time)

    def name_for(self, parameters: Mapping[str, Any], when: datetime) -> str:
        """The name of a run given ``parameters`` that is scheduled to start ``when``."""
        try:
            config_name = self.load_name(parameters)
        except Exception:
            config_name = _stem(parameters.get("config"))
        kind = self.kind(parameters) if callable(self.kind) else self.kind
        return format_run_name(config_name, when, kind=kind)


def segment_run_kind(parameters: Mapping[str, Any]) -> str | None:
    """What a ``segment-collection`` run is, from its parameters: ``backfill`` with an item
    filter (a backfill's child run), ``rebuild`` when it redoes the whole collection
    (``overwrite`` true, no filter), None for an incremental run (a nightly, ``segflow run``).

    Examples
    --------
    >>> segment_run_kind({"config": "a.yaml"}), segment_run_kind({"overwrite": True})
    (None, 'rebuild')
    >>> segment_run_kind({"overwrite": False, "item_filter": ["RGB*"]})
    'backfill'
    """
    if parameters.get("item_filter") is not None:
        return "backfill"
    return "rebuild" if parameters.get("overwrite") is True else None


def _stem(config: Any) -> str:
    if isinstance(config, str | Path):
        return Path(config).name.removesuffix(".yml").removesuffix(".yaml") or "segflow"
    if isinstance(config, dict) and isinstance(config.get("name"), str):
        return str(config["name"])
    return "segflow"


def add_flow_run_tags(tags: Iterable[str]) -> None:
    """Add ``tags`` to the current flow run's tags (keeping those it has, such as its
    deployment's). Outside a flow run, or when the API refuses, the run goes on untagged:
    a label must never fail a segmentation."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    flow_run = context.flow_run
    merged = list(dict.fromkeys([*flow_run.tags, *tags]))
    if merged == list(flow_run.tags):
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=merged)
    except Exception as error:
        get_run_logger().warning("could not tag flow run %s: %s", flow_run.name, error)
        return
    flow_run.tags = merged

"""The task that scores one item of a store against its reference (a thin engine call)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segflow.errors import EvaluationError

# The ``segflow evaluate`` command prints each failed item itself (flows/_logs.py).
PRINTED_BY_COMMAND = {"segflow_console": False}


@task(name="evaluate-item", retries=0, cache_policy=NO_CACHE, task_run_name="evaluate-{item_id}")
def evaluate_item_task(
    store: str, item_id: str, source: str, output: str, reference: str
) -> dict[str, Any]:
    """Scores of the item's ``OUTPUT`` (its latest version) against ``reference``; never
    raises for a bad item."""
    from segflow.engine.executor import LocalExecutor
    from segflow.evaluate import evaluate_item, open_reference
    from segflow.io import open_item
    from segflow.store.layout import ZarrRegionWriter
    from segflow.store.versions import resolve_item

    row: dict[str, Any] = {"id": item_id, "reference": reference}
    try:
        info = open_item(source, item_id).info
        instances = output == "labels"
        parent, group = resolve_item(store, item_id).rsplit("/", 1)  # one version throughout
        with LocalExecutor() as executor:
            scores = evaluate_item(
                ZarrRegionWriter(parent, group, output),
                open_reference(reference, info, instances=instances),
                info.spatial_shape,
                instances=instances,
                executor=executor,
            )
    except EvaluationError as error:  # its message names the item and the reference
        row["eval_error"] = str(error)
        get_run_logger().error(row["eval_error"], extra=PRINTED_BY_COMMAND)
        return row
    except Exception as error:  # one bad reference must not stop the others
        row["eval_error"] = f"item {item_id!r} ({reference}): {type(error).__name__}: {error}"
        get_run_logger().error(row["eval_error"], extra=PRINTED_BY_COMMAND)
        return row
    row.update(scores)
    return row

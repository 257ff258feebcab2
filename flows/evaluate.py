"""The ``evaluate`` flow: score a store's items against reference masks.

Scores go into the collection index (``ap50``, ``ap50_95``, ``dice_1``, ...) and into
``STORE/evaluation.parquet`` (one row per item, every score); see ``segflow.evaluate`` for
the definitions.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from segflow.evaluate import find_references, made_by, match_references, split_coco_matches
from segflow.flows.naming import RunNamer, add_flow_run_tags, run_tags
from segflow.flows.segment import config_name, resolve_config
from segflow.store.names import EVALUATION_NAME
from segflow.tasks.evaluate import PRINTED_BY_COMMAND, evaluate_item_task
from segflow.tasks.store import current_run_id, read_index_task, write_index_task, writing_store


@flow(
    name="evaluate-collection",
    flow_run_name=RunNamer(config_name, kind="evaluate"),
    validate_parameters=True,
)
def evaluate_collection(
    config: dict[str, Any] | str, reference: str, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Score every done item of ``config``'s store against the matching reference.

    ``reference`` is a file, folder or glob; a reference matches an item with the same file
    stem, the item's id, or as the only reference in the item's source folder.
    """
    import pandas as pd

    logger = get_run_logger()
    cfg = resolve_config(config, overrides or ())
    store = cfg.output.store
    add_flow_run_tags([*run_tags(cfg.name, store), "evaluate"])
    index = read_index_task(store)
    rows = {r["id"]: r for r in made_by(index, cfg.name)}
    if others := sum(r.get("status") == "done" for r in index) - len(rows):
        logger.warning("%d done items of %s were made by another config: not scored", others, store)
    references = find_references(reference)
    sources = {i: str(r["source"]) for i, r in rows.items()}
    matched = match_references(list(sources.items()), references)
    matched, not_in_collection = split_coco_matches(matched, sources)
    for line in not_in_collection:
        logger.warning(line, extra=PRINTED_BY_COMMAND)
    logger.info("%d of %d items have a reference", len(matched), len(rows))
    futures = [
        evaluate_item_task.submit(
            store, item_id, str(rows[item_id]["source"]), str(rows[item_id]["output"]), path
        )
        for item_id, path in sorted(matched.items())
    ]
    scores = [f.result() for f in futures]
    if scores:
        with writing_store(store, current_run_id()):  # one writer per store, as a run
            write_index_task(store, [{**rows[s["id"]], **s} for s in scores])
            made = ("config_name", "config_hash", "model_hash", "code_version")
            scored = [{**s, **{k: rows[s["id"]].get(k) for k in made}} for s in scores]
            pd.DataFrame(scored).to_parquet(
                f"{store.rstrip('/')}/{EVALUATION_NAME}", index=False
            )  # pandas writes local paths and fsspec URLs (s3://) alike
    return {
        "name": cfg.name,
        "store": store,
        "items": len(rows),
        "scored": [s for s in scores if "eval_error" not in s],
        "failed": [s for s in scores if "eval_error" in s],
        "unmatched": sorted(set(rows) - set(matched)),
        "not_in_collection": not_in_collection,
    }

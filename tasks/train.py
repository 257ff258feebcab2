"""The task of the ``train`` flow: one epoch of a resumable training run (a thin engine call)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="train-epoch", retries=0, cache_policy=NO_CACHE, task_run_name="epoch-{epoch}")
def train_epoch_task(config: str, epoch: int, *, resume: bool = True) -> dict[str, Any]:
    """Run the next epoch of ``config``'s training (resuming its saved state)."""
    from segflow.train_config import load_train_config, train_from_config

    result = train_from_config(load_train_config(config), stop_after=1, resume=resume)
    last = result.history[-1] if result.history else None
    if last is not None:
        get_run_logger().info(
            "epoch %d: loss %.4f, validation foreground IoU %.4f (best %.4f)",
            last.epoch, last.loss, last.val_score, last.best_score,
        )  # fmt: skip
    return {
        "epochs": result.epochs,
        "finished": result.finished,
        "best_score": result.best_score,
        "best_epoch": result.best_epoch,
        "best": str(result.best),
        "history": [asdict(h) for h in result.history],
    }

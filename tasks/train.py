"""The task of the ``train`` flow: one epoch of a resumable training run (a thin engine call)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segflow.tasks.progress import report_progress


@task(name="train-epoch", retries=0, cache_policy=NO_CACHE, task_run_name="epoch-{epoch}")
def train_epoch_task(config: str, epoch: int, *, resume: bool = True) -> dict[str, Any]:
    """Run the next epoch of ``config``'s training (resuming its saved state).

    Progress goes to :mod:`segflow.tasks.progress` listeners as ``(name, phase, step,
    steps)``: phase ``"epoch E: loss L"`` per optimiser step, ``"validating epoch E"`` once
    the steps are done, and ``"epoch E done: loss L, val V, best B"`` at the end (step = steps).
    """
    from segflow.train_config import load_train_config, train_from_config

    cfg = load_train_config(config)

    def on_step(epoch_: int, step: int, steps: int, loss: float) -> None:
        phase = f"epoch {epoch_}: loss {loss:.4f}"
        report_progress(cfg.name, phase, step, steps)
        if step == steps:
            report_progress(cfg.name, f"validating epoch {epoch_}", step, steps)

    result = train_from_config(cfg, stop_after=1, resume=resume, on_step=on_step)
    last = result.history[-1] if result.history else None
    if last is not None:
        get_run_logger().info(
            "epoch %d: loss %.4f, validation %s %.4f (best %.4f)",
            last.epoch, last.loss, cfg.training.score_name, last.val_score, last.best_score,
        )  # fmt: skip
        steps = cfg.training.steps_per_epoch
        report_progress(
            cfg.name,
            f"epoch {last.epoch} done: loss {last.loss:.4f}, val {last.val_score:.4f}, "
            f"best {last.best_score:.4f}",
            steps,
            steps,
        )
    return {
        "epochs": result.epochs,
        "finished": result.finished,
        "best_score": result.best_score,
        "best_epoch": result.best_epoch,
        "best": str(result.best),
        "history": [asdict(h) for h in result.history],
    }

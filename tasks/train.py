"""The task of the ``train`` flow: one epoch of a resumable training run (a thin engine call)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segflow.engine.interrupt import Interrupted, stop_requested
from segflow.tasks.progress import report_progress


class EpochInterrupted(Interrupted):
    """A stop was asked for (Ctrl-C, SIGTERM) while epoch ``epoch`` trained: the saved run
    holds the epochs before it, and a rerun trains it again."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        super().__init__(f"stopped in epoch {epoch}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.epoch,))


@task(name="train-epoch", retries=0, cache_policy=NO_CACHE, task_run_name="epoch-{epoch}")
def train_epoch_task(config: str, epoch: int, *, resume: bool = True) -> dict[str, Any]:
    """Run the next epoch of ``config``'s training (resuming its saved state).

    Progress goes to :mod:`segflow.tasks.progress` listeners as ``(name, phase, step,
    steps)``: phase ``"epoch E: loss L"`` per optimiser step, ``"validating epoch E"`` once
    the steps are done, and ``"epoch E done: loss L, val V, best B"`` at the end (step = steps).
    A stop request (:func:`segflow.engine.interrupt.request_stop`) ends the epoch after its
    running step: the task returns a *Cancelled* state whose data is
    :class:`EpochInterrupted`, and the saved run is left as the last finished epoch left it.
    """
    from prefect.states import Cancelled

    from segflow.flows._outcomes import expected
    from segflow.train_config import load_train_config, train_from_config

    cfg = load_train_config(config)

    def on_step(epoch_: int, step: int, steps: int, loss: float) -> None:
        phase = f"epoch {epoch_}: loss {loss:.4f}"
        report_progress(cfg.name, phase, step, steps)
        if stop_requested() is not None:
            raise EpochInterrupted(epoch_)
        if step == steps:
            report_progress(cfg.name, f"validating epoch {epoch_}", step, steps)

    try:
        result = train_from_config(cfg, stop_after=1, resume=resume, on_step=on_step)
    except EpochInterrupted as stop:
        return expected(Cancelled(message=str(stop), data=stop))  # type: ignore[return-value]
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

"""The ``train`` flow: one task per epoch of a resumable run, then the loss curve and metrics.

Each task continues the run saved in ``OUTPUT/last`` (segflow.models.train), so a flow run
killed at any point and started again picks up after the last finished epoch; the best
checkpoint (weights + card) is in ``OUTPUT/best``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed

from segflow.engine.interrupt import stop_requested
from segflow.flows._outcomes import RunOutcome, expected
from segflow.flows.naming import RunNamer, add_flow_run_tags, run_tags
from segflow.flows.segment import SUMMARY_LINE
from segflow.store.lock import StoreLockedError, hold_store_lock
from segflow.tasks.artifacts import artifact_key
from segflow.tasks.train import EpochInterrupted, train_epoch_task


class TrainingInterrupted(RunOutcome):
    """A training stopped by Ctrl-C, SIGTERM or a cancel (the data of its *Cancelled*
    state): the message says where the saved run stands and how to resume."""


def train_config_name(parameters: Mapping[str, Any]) -> str:
    """The name of the train config a ``train-model`` run was given (for its run name)."""
    from segflow.train_config import load_train_config

    return load_train_config(parameters["config"]).name


@flow(
    name="train-model",
    flow_run_name=RunNamer(train_config_name),
    validate_parameters=True,
    persist_result=True,  # the summary, as JSON in Prefect's result storage
    result_serializer="json",
)
def train_flow(config: str, restart: bool = False) -> dict[str, Any]:
    """Train the model ``config`` (a train YAML) describes; ``restart`` drops a saved run."""
    import imageio.v3 as iio
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from segflow.models.loss_plot import draw_loss_curve
    from segflow.train_config import load_train_config

    logger = get_run_logger()
    cfg = load_train_config(config)
    add_flow_run_tags([*run_tags(cfg.name, cfg.output, output_kind="output"), "train"])
    try:
        with hold_store_lock(cfg.output, run_id=str(flow_run.id), what="training output"):
            row = _train_epochs(config, cfg.training.max_epochs, restart)
    except StoreLockedError as error:  # another training took the output first
        logger.warning("%s", error, extra=SUMMARY_LINE)
        return expected(Failed(message=str(error), data=error))  # type: ignore[return-value]
    if isinstance(row, int):  # stopped before epoch ``row`` finished
        message = interrupted_line(cfg.name, cfg.output, row, stop_requested() or "cancel")
        logger.warning("%s", message, extra=SUMMARY_LINE)
        data = TrainingInterrupted(message)
        return expected(Cancelled(message=message, data=data))  # type: ignore[return-value]
    history = row["history"]
    out = Path(cfg.output)
    curve = out / "loss.png"
    losses = [h["loss"] for h in history]
    val_losses = [h.get("val_loss", float("nan")) for h in history]
    iio.imwrite(curve, draw_loss_curve(losses, val_losses, title=f"{cfg.name}: loss per epoch"))
    create_table_artifact(
        key=artifact_key(cfg.name, cfg.output, "metrics"),
        table=[
            {k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in history
        ],
        description=f"{cfg.name}: loss and validation {cfg.training.score_name} per epoch",
    )
    create_markdown_artifact(
        key=artifact_key(cfg.name, cfg.output, "summary"),
        markdown=f"**{cfg.name}**: best validation {cfg.training.score_name} "
        f"{row.get('best_score', 0):.4f} at epoch {row.get('best_epoch', 0)}; checkpoint "
        f"`{row.get('best', '')}`; loss curve `{curve}` (training and validation loss per epoch).",
    )
    logger.info("best checkpoint: %s", row.get("best"))
    return {**row, "loss_curve": str(curve), "name": cfg.name}


def _train_epochs(config: str, max_epochs: int, restart: bool) -> dict[str, Any] | int:
    """Train epoch after epoch (one task each) until the run is finished; the last task's
    row, or the epoch a stop request interrupted (0 when none had started)."""
    row: dict[str, Any] = {"epochs": 0, "history": [], "finished": False}
    for k in range(max_epochs + 1):
        if stop_requested() is not None:
            return row["epochs"] + 1 if k else 0
        state = train_epoch_task(config, k + 1, resume=not (restart and k == 0), return_state=True)
        if state.is_cancelled():
            stop = state.result(raise_on_failure=False)
            return stop.epoch if isinstance(stop, EpochInterrupted) else row["epochs"] + 1
        row = state.result()
        if row["finished"]:
            break
    return row


def interrupted_line(name: str, output: str, epoch: int, reason: str) -> str:
    """The line a stopped training ends with: where its saved run stands, how to resume.

    Examples
    --------
    >>> print(interrupted_line("nuclei", "models/n", 5, "SIGINT"))
    nuclei: stopped (SIGINT) in epoch 5: models/n/last holds the run as epoch 4 left it; \
run the same command again to resume with epoch 5
    >>> interrupted_line("nuclei", "models/n", 0, "SIGINT")
    'nuclei: stopped (SIGINT) before its first epoch: nothing was trained or saved'
    """
    if epoch == 0:
        return f"{name}: stopped ({reason}) before its first epoch: nothing was trained or saved"
    saved = f"as epoch {epoch - 1} left it" if epoch > 1 else "as it was before (no epoch saved)"
    return (
        f"{name}: stopped ({reason}) in epoch {epoch}: {output}/last holds the run {saved}; "
        f"run the same command again to resume with epoch {epoch}"
    )

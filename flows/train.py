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

from segflow.flows.naming import RunNamer, add_flow_run_tags, run_tags
from segflow.tasks.artifacts import artifact_key
from segflow.tasks.train import train_epoch_task


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
    row: dict[str, Any] = {"epochs": 0, "history": [], "finished": False}
    for k in range(cfg.training.max_epochs + 1):
        row = train_epoch_task(config, k + 1, resume=not (restart and k == 0))
        if row["finished"]:
            break
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

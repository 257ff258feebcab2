"""The block engine: planning, phases, execution."""

from segflow.engine.api import segment
from segflow.engine.blocks import Block, BlockGrid, plan_blocks
from segflow.engine.executor import DaskExecutor, Executor, LocalExecutor
from segflow.engine.pipeline import Phase, Plan, Step, compile_pipeline, parse_steps
from segflow.engine.run import ItemRun, run_plan

__all__ = [
    "Block",
    "BlockGrid",
    "DaskExecutor",
    "Executor",
    "ItemRun",
    "LocalExecutor",
    "Phase",
    "Plan",
    "Step",
    "compile_pipeline",
    "parse_steps",
    "plan_blocks",
    "run_plan",
    "segment",
]

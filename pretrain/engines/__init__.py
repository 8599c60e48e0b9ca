"""Training engines behind one interface (base.Engine), named by what they run, and the process-group helpers.

`deepspeed` (ZeRO 0-3, offload), `ddp` (PyTorch DDP through Accelerate) and `fsdp` (PyTorch FSDP2). Backends
are imported on demand: importing DeepSpeed costs seconds and prints, and a run needs only one.
"""

from __future__ import annotations

from torch import nn

from pretrain.config import EngineSpec
from pretrain.engines.base import Engine, StepOutput
from pretrain.engines.build import ModelRecipe, build_model, sharded
from pretrain.engines.dist import (
    DistInfo,
    any_rank,
    barrier,
    broadcast_int,
    end_process,
    init_distributed,
    shutdown,
)

__all__ = [
    "DistInfo",
    "Engine",
    "EngineSpec",
    "ModelRecipe",
    "StepOutput",
    "any_rank",
    "barrier",
    "broadcast_int",
    "build_engine",
    "build_model",
    "end_process",
    "init_distributed",
    "sharded",
    "shutdown",
]


def build_engine(spec: EngineSpec, model: ModelRecipe | nn.Module, dist: DistInfo) -> Engine:
    """The engine `spec` says, holding the model a recipe describes, built as the engine keeps it (ZeRO-3 and
    FSDP: never whole on a rank), or wrapping `model` when one is handed in whole (initialised, on CPU)."""
    if isinstance(model, ModelRecipe):
        model = build_model(spec, model, dist)
    if spec.backend == "deepspeed":
        from pretrain.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(spec, model, dist)
    if spec.backend == "ddp":
        from pretrain.engines.ddp import DDPEngine

        return DDPEngine(spec, model, dist)
    from pretrain.engines.fsdp import FSDPEngine

    return FSDPEngine(spec, model, dist)

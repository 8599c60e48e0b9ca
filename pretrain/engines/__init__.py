"""Training engines behind one interface (base.Engine), and the process-group helpers the loop uses.

Backends are imported on demand: importing DeepSpeed costs seconds and prints, and a run needs only one.
"""

from __future__ import annotations

from torch import nn

from pretrain.engines.base import DistInfo, Engine, EngineSpec, OptimizerSpec, StepOutput
from pretrain.engines.dist import any_rank, barrier, broadcast_int, init_distributed, shutdown

__all__ = [
    "DistInfo",
    "Engine",
    "EngineSpec",
    "OptimizerSpec",
    "StepOutput",
    "any_rank",
    "barrier",
    "broadcast_int",
    "build_engine",
    "init_distributed",
    "shutdown",
]


def build_engine(spec: EngineSpec, model: nn.Module, optim: OptimizerSpec, dist: DistInfo) -> Engine:
    """Wrap `model` (already initialised, on CPU) for training as `spec` says."""
    if spec.backend == "deepspeed":
        from pretrain.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(spec, model, optim, dist)
    if spec.backend == "accelerate":
        from pretrain.engines.accelerate import AccelerateEngine

        return AccelerateEngine(spec, model, optim, dist)
    raise ValueError(f"engine.backend={spec.backend!r}: expected deepspeed or accelerate")

"""Training engines behind one interface (base.Engine), named by what they run, and the process-group helpers.

`deepspeed` (ZeRO 0-3, offload), `ddp` (PyTorch DDP through Accelerate) and `fsdp` (PyTorch FSDP2). Backends
are imported on demand: importing DeepSpeed costs seconds and prints, and a run needs only one.
"""

from __future__ import annotations

from torch import nn

from pretrain.config import EngineSpec
from pretrain.engines.base import Engine, StepOutput
from pretrain.engines.dist import DistInfo, any_rank, barrier, broadcast_int, init_distributed, shutdown

__all__ = [
    "DistInfo",
    "Engine",
    "EngineSpec",
    "StepOutput",
    "any_rank",
    "barrier",
    "broadcast_int",
    "build_engine",
    "init_distributed",
    "shutdown",
]


def build_engine(spec: EngineSpec, model: nn.Module, dist: DistInfo) -> Engine:
    """Wrap `model` (already initialised, on CPU) for training as `spec` says."""
    if spec.backend == "deepspeed":
        from pretrain.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(spec, model, dist)
    if spec.backend == "ddp":
        from pretrain.engines.ddp import DDPEngine

        return DDPEngine(spec, model, dist)
    from pretrain.engines.fsdp import FSDPEngine

    return FSDPEngine(spec, model, dist)

"""The one small interface every training engine implements.

The loop (pretrain/loop.py) only talks to an `Engine`; DeepSpeed and Accelerate live behind it, so the loop,
checkpoints and metrics are written once. Engines own distributed wrapping, mixed precision, the optimizer and
the LR schedule; the model they hold keeps its own parameter names (no `module.` prefixes leak out).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """AdamW + warmup/decay schedule + clipping, as the run config asks."""

    lr: float
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    max_steps: int
    min_lr_ratio: float = 0.1
    clip_grad: float | None = 1.0


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """What the run config says about the engine; each engine reads the fields it understands."""

    backend: Literal["deepspeed", "accelerate"] = "deepspeed"
    zero_stage: int = 0
    offload: Literal["none", "optimizer", "params"] = "none"
    deepspeed_config: Path | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Precision = "fp32"
    micro_batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class StepOutput:
    """One optimizer step, already agreed across ranks."""

    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # global norm before clipping (inf/nan when the step was skipped for that reason)
    lr: float  # the LR this step used
    skipped: bool = False  # True when a non-finite loss/gradient on any rank made every rank skip the update


class Engine(ABC):
    """A model wrapped for (distributed) training, with its optimizer and schedule."""

    dist: DistInfo

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The unwrapped model (our parameter names)."""

    @abstractmethod
    def train_step(self, micro_batches: Sequence[dict[str, Tensor]]) -> StepOutput:
        """Forward/backward over `grad_accum` micro-batches, clip, step optimizer and schedule."""

    @abstractmethod
    def eval_loss(self, batch: dict[str, Tensor]) -> float:
        """Loss on one batch without gradients, averaged across ranks."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Collective: write the engine state (model, optimizer, scheduler) under `path`, which exists."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Collective: restore what `save` wrote. Pickled files under `path` were checked before this call."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Collective: the whole model's weights (our names, on CPU) on rank 0, None on other ranks."""

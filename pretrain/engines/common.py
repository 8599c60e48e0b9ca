"""Small pieces every engine shares: moving batches, agreeing on a step's loss, the LR schedule as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from pretrain.engines.dist import all_reduce_sum

SCHEDULER_FILE = "scheduler.json"


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def check_micro_batches(micro_batches: Sequence[object], grad_accum: int) -> None:
    if len(micro_batches) != grad_accum:
        raise ValueError(f"train_step got {len(micro_batches)} micro-batches, grad_accum is {grad_accum}")


def agreed_loss(losses: Sequence[Tensor], world_size: int) -> tuple[float, bool]:
    """(mean loss over micro-batches and ranks, whether any rank's loss is non-finite): every rank gets the same."""
    local = torch.stack(list(losses)).mean().item()
    loss_sum, bad = all_reduce_sum([local, float(not math.isfinite(local))])
    return loss_sum / world_size, bad > 0


def save_scheduler(scheduler: LRScheduler, path: Path, *, is_main: bool) -> None:
    if is_main:
        (Path(path) / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))


def load_scheduler(scheduler: LRScheduler, path: Path) -> None:
    file = Path(path) / SCHEDULER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"engine checkpoint {path} has no {SCHEDULER_FILE}")
    scheduler.load_state_dict(json.loads(file.read_text()))

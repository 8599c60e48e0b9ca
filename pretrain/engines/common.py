"""Small pieces every engine shares: moving batches, and the LR schedule's state as JSON (never pickled)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

SCHEDULER_FILE = "scheduler.json"


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def save_scheduler(scheduler: LRScheduler, path: Path, *, is_main: bool) -> None:
    if is_main:
        (Path(path) / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))


def load_scheduler(scheduler: LRScheduler, path: Path) -> None:
    file = Path(path) / SCHEDULER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"engine checkpoint {path} has no {SCHEDULER_FILE}")
    scheduler.load_state_dict(json.loads(file.read_text()))

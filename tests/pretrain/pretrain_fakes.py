"""Stand-ins for checkpoint tests: an Engine over one Linear layer and a stateful data position.

They exercise the checkpoint manager's ordering, atomicity and verification without DeepSpeed start-up time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pretrain.checkpoint import CheckpointManager, TrainerState
from pretrain.engines import DistInfo, StepOutput


class FakeEngine:
    """An engine's checkpoint surface over one Linear layer: saves its weights as safetensors; `die_during_save` kills the process halfway through a save."""

    def __init__(self, *, die_during_save: bool = False) -> None:
        self.dist = DistInfo()
        self._model = nn.Linear(3, 3)
        self.die_during_save = die_during_save
        self.loaded_world_size: int | None = None  # what `load` was told the checkpoint's world size was

    @property
    def model(self) -> nn.Module:
        return self._model

    def train_step(self, micro_batches: Sequence[dict[str, Tensor]]) -> StepOutput:
        with torch.no_grad():
            for p in self._model.parameters():
                p.add_(1.0)
        return StepOutput(loss=0.0, grad_norm=0.0, lr=0.0)

    def eval_loss(self, batch: dict[str, Tensor]) -> float:
        return 0.0

    def save(self, path: Path) -> None:
        save_file(self.full_state_dict(), str(path / "weights.safetensors"))
        if self.die_during_save:
            os._exit(17)  # a kill -9 / node failure in the middle of a checkpoint

    def load(self, path: Path, *, saved_world_size: int | None = None) -> None:
        self._model.load_state_dict(load_file(str(path / "weights.safetensors")))
        self.loaded_world_size = saved_world_size

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self._model.state_dict().items()}


class FakeData:
    """A data position that checkpoints as JSON."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def save_steps(
    root: Path,
    steps: Sequence[int],
    *,
    keep: int = 10,
    engine: FakeEngine | None = None,
    world_size: int = 1,
) -> FakeEngine:
    """Train the fake engine and save after each of `steps` (step number = weights offset), recording
    `world_size` as the number of processes that wrote them."""
    engine = engine or FakeEngine()
    data = FakeData()
    manager = CheckpointManager(root, keep=keep, dist=DistInfo())
    for step in steps:
        engine.train_step([])
        data.position = step * 10
        manager.save(
            engine=engine, state=TrainerState(step=step, tokens=step * 100, world_size=world_size), data=data
        )
    return engine


if __name__ == "__main__":  # python pretrain_fakes.py ROOT: save step 1, then die while saving step 2
    import sys

    root = Path(sys.argv[1])
    engine = save_steps(root, [1])
    engine.die_during_save = True
    save_steps(root, [2], engine=engine)
    print(json.dumps("unreachable"))

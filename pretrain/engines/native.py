"""What the DDP and FSDP engines share: PyTorch's own optimizer step, clipping and checkpoints.

Both clip the global gradient norm and step our AdamW themselves, and checkpoint with
torch.distributed.checkpoint (each rank writes its shard under the model's own names) plus the LR schedule as
JSON, so a DDP checkpoint and an FSDP checkpoint have the same layout. DCP saves each tensor with its global
shape and reshards at load, so a checkpoint resumes at any world size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from pretrain.config import EngineSpec
from pretrain.engines.base import Engine
from pretrain.engines.dist import DistInfo
from pretrain.engines.optim import build_optimizer, build_scheduler
from pretrain.errors import ConfigError

DCP_DIR = "dcp"
PRECISIONS = ("fp32", "bf16")


class NativeEngine(Engine):
    """An engine whose optimizer step and checkpoints are PyTorch's own; subclasses wrap the model."""

    def __init__(self, spec: EngineSpec, model: nn.Module, dist: DistInfo) -> None:
        if spec.precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision={spec.precision}: engine.backend={spec.backend} takes fp32 or bf16 "
                "(fp16 with loss scaling: use engine.backend=deepspeed)"
            )
        self.dist = dist
        self.spec = spec
        self._clip = spec.optimizer.clip_grad or math.inf
        self._model = model

    def _build_optimizer(self) -> None:
        """After wrapping: FSDP's optimizer must hold the sharded (DTensor) parameters."""
        self._optimizer = build_optimizer(self._model, self.spec.optimizer)
        self.scheduler = build_scheduler(self._optimizer, self.spec.optimizer)

    @property
    def model(self) -> nn.Module:
        return self._model

    def _update(self, *, skip: bool) -> tuple[float, bool]:
        norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._clip)
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()  # the same on every rank
        skipped = skip or not math.isfinite(norm)
        if not skipped:
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def save(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=Path(path) / DCP_DIR)
        self.save_scheduler(path)

    def load(self, path: Path, *, saved_world_size: int | None = None) -> None:
        """DCP reshards on load: the same call serves any `saved_world_size` (weights and AdamW moments)."""
        model_state, optim_state = get_state_dict(self._model, self._optimizer)  # the layout to fill
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=Path(path) / DCP_DIR)
        set_state_dict(
            self._model, self._optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.load_scheduler(path)

    def _on_main(self, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
        if not self.dist.is_main:
            return None
        return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}

"""The one small interface every training engine implements, and the step they all share.

The loop (pretrain/loop.py) only talks to an `Engine`; DeepSpeed, DDP and FSDP live behind it, so the loop,
checkpoints and metrics are written once. An engine owns distributed wrapping, mixed precision, the optimizer
and the LR schedule; the model it holds keeps its own parameter names (no `module.` prefixes leak out).
`Engine.train_step` is the shared scaffolding (micro-batch count, the cross-rank loss agreement, skipping a
non-finite step on every rank); an engine supplies the forward/backward of one micro-batch and the update.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from pretrain.config import EngineSpec
from pretrain.engines.dist import DistInfo, all_reduce_sum, broadcast_tensors

SCHEDULER_FILE = "scheduler.json"
SIGNAL_INPUTS = ("pixel_values", "input_values")  # image and speech models' float inputs


@dataclass(frozen=True, kw_only=True)
class StepOutput:
    """One optimizer step, already agreed across ranks."""

    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # global norm before clipping (nan when the step was skipped for a non-finite loss)
    lr: float  # the LR this step used
    skipped: bool = False  # True when a non-finite loss/gradient on any rank made every rank skip the update


class Engine(ABC):
    """A model wrapped for (distributed) training, with its optimizer and schedule."""

    dist: DistInfo
    spec: EngineSpec
    scheduler: LRScheduler
    input_dtype: torch.dtype | None = None  # set where the engine casts the weights themselves (DeepSpeed)

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The unwrapped model (our parameter names)."""

    @property
    @abstractmethod
    def forward_module(self) -> nn.Module:
        """What a batch goes through (the wrapper, where the engine has one)."""

    @abstractmethod
    def _forward_backward(self, batch: dict[str, Tensor], *, last: bool, n_micro: int) -> Tensor:
        """Forward and backward of one micro-batch (`last` of the step: gradients are reduced); its loss."""

    @abstractmethod
    def _update(self, *, skip: bool) -> tuple[float, bool]:
        """Clip and step (a no-op update when `skip`); (grad norm, whether the update was skipped)."""

    def train_step(
        self, micro_batches: Sequence[dict[str, Tensor]], *, seeds: Sequence[int] | None = None
    ) -> StepOutput:
        """Forward/backward over `grad_accum` micro-batches, clip, step optimizer and schedule.

        `seeds`: one per micro-batch, set as the RNG seed before its forward, so its dropout masks depend on
        which micro-batch it is, not on which rank computes it (the loop passes them; see `dropout_seed`)."""
        if len(micro_batches) != self.spec.grad_accum:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches, grad_accum is {self.spec.grad_accum}"
            )
        if seeds is not None and len(seeds) != len(micro_batches):
            raise ValueError(f"train_step got {len(seeds)} seeds for {len(micro_batches)} micro-batches")
        self.forward_module.train()
        lr = self.scheduler.get_last_lr()[0]
        losses = []
        for i, batch in enumerate(micro_batches):
            if seeds is not None:
                torch.manual_seed(seeds[i])  # also every CUDA device's generator
            loss = self._forward_backward(
                to_device(batch, self.dist.device, self.input_dtype),
                last=i == len(micro_batches) - 1,
                n_micro=len(micro_batches),
            )
            losses.append(loss.detach().float())
        mean_loss, bad = agreed_loss(losses, self.dist.world_size)
        norm, skipped = self._update(skip=bad)
        self._sync_running_stats()
        if not skipped:
            self.scheduler.step()
        return StepOutput(loss=mean_loss, grad_norm=math.nan if bad else norm, lr=lr, skipped=skipped)

    def _sync_running_stats(self) -> None:
        """Rank 0's BatchNorm running statistics (models/conformer.py) on every rank after each step.

        They are buffers each rank updates from its own micro-batches. DDP broadcasts rank 0's at every forward;
        this does the same for every engine, so all ranks evaluate alike and a checkpoint (which keeps one copy
        of a replicated buffer) restores each rank's exactly. A no-op for models without BatchNorm."""
        batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        buffers = [b for m in self.model.modules() if isinstance(m, batch_norms) for b in m.buffers()]
        broadcast_tensors(buffers)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, Tensor]) -> float:
        """Loss on one batch without gradients, averaged across ranks."""
        module = self.forward_module
        module.eval()
        loss = module(**to_device(batch, self.dist.device, self.input_dtype)).loss.float().item()
        module.train()
        return all_reduce_sum([loss])[0] / self.dist.world_size

    def model_state_bytes(self) -> dict[str, int]:
        """What this rank holds between steps, in bytes: its parameters (its shard, under ZeRO-3 / FSDP) and
        the optimizer's tensors (moments, and DeepSpeed's fp32 partition of the parameters when it is not the
        model's own tensor). Gradients are not counted: every engine frees them after the step. What
        `pretrain plan` predicts (pretrain/plan.py) is checked against this."""
        seen: set[int] = set()
        params = storage_bytes((getattr(p, "ds_tensor", p) for p in self.model.parameters()), seen)
        optimizer = self._optimizer  # type: ignore[attr-defined]  # every engine builds one
        held = [p for group in optimizer.param_groups for p in group["params"]]
        held += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
        return {"params": params, "optimizer": storage_bytes(held, seen)}

    def gradient_bytes(self) -> int:
        """Bytes of the gradients this rank holds now: the model's `.grad` and the optimizer's (DeepSpeed steps a
        flat fp32 copy of the rank's gradient partition). Meaningful inside the step, from an optimizer step
        pre-hook: every engine frees them after it. `pretrain plan`'s arithmetic is checked against this."""
        optimizer = self._optimizer  # type: ignore[attr-defined]  # every engine builds one
        grads = [p.grad for p in self.model.parameters()]
        grads += [p.grad for group in optimizer.param_groups for p in group["params"]]
        return storage_bytes((g for g in grads if g is not None), set())

    @abstractmethod
    def save(self, path: Path) -> None:
        """Collective: write the engine state (model, optimizer, scheduler) under `path`, which exists."""

    @abstractmethod
    def load(self, path: Path, *, saved_world_size: int | None = None) -> None:
        """Collective: restore what `save` wrote. Pickled files under `path` were checked before this call.

        `saved_world_size`: the number of processes that wrote it, when not this job's: the state is then
        resharded onto this job's processes (weights and optimizer state exactly, by parameter name)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Collective: the whole model's weights (our names, on CPU) on rank 0, None on other ranks."""

    def save_scheduler(self, path: Path) -> None:
        if self.dist.is_main:
            (Path(path) / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()))

    def load_scheduler(self, path: Path) -> None:
        file = Path(path) / SCHEDULER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"engine checkpoint {path} has no {SCHEDULER_FILE}")
        self.scheduler.load_state_dict(json.loads(file.read_text()))
        # The optimizer's own LR is what the next step uses; a resharded load may not have restored it.
        for group, lr in zip(
            self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr


def dropout_seed(seed: int, micro_batch: int) -> int:
    """The RNG seed of global micro-batch `micro_batch` (data/layout.py numbers them): a hash of both, so
    neighbouring runs' and micro-batches' dropout streams do not overlap."""
    digest = hashlib.blake2b(f"dropout:{seed}:{micro_batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def storage_bytes(tensors: Iterable[Tensor], seen: set[int]) -> int:
    """Bytes of the tensors' storages not in `seen` (views of one flat buffer count once); a DTensor counts
    its local shard, a scalar (AdamW's step count) nothing."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.numel() <= 1:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def to_device(
    batch: dict[str, Tensor], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The batch on `device`; pixels and waveforms (`SIGNAL_INPUTS`) also in `dtype` when given, the weights'
    dtype of an engine that casts them (token ids, masks and MAE's noise stay as they are)."""
    return {
        key: value.to(device, dtype=dtype if key in SIGNAL_INPUTS else None, non_blocking=True)
        for key, value in batch.items()
    }


def agreed_loss(losses: Sequence[Tensor], world_size: int) -> tuple[float, bool]:
    """(mean loss over micro-batches and ranks, whether any rank's loss is non-finite): every rank gets the same."""
    local = torch.stack(list(losses)).mean().item()
    loss_sum, bad = all_reduce_sum([local, float(not math.isfinite(local))])
    return loss_sum / world_size, bad > 0

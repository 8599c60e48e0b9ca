"""DeepSpeed engine: ZeRO 0-3, optimizer/parameter offload, fp32/bf16/fp16.

DeepSpeed gets our AdamW; the LR schedule stays outside it and is stepped here, so a step skipped for a
non-finite loss leaves optimizer, schedule and weights exactly as they were, on every ZeRO stage and dtype
alike (DeepSpeed's own overflow handling differs between them). Checkpoints are DeepSpeed's own
(`save_checkpoint`, each rank its shard) plus the schedule as JSON.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import Tensor, nn

from pretrain.engines.base import DistInfo, Engine, EngineSpec, OptimizerSpec, StepOutput
from pretrain.engines.common import (
    agreed_loss,
    check_micro_batches,
    load_scheduler,
    save_scheduler,
    to_device,
)
from pretrain.engines.dist import all_reduce_sum, ensure_process_group
from pretrain.engines.ds_config import resolve_config
from pretrain.optim import build_optimizer, build_scheduler

_TAG = "deepspeed"


@contextmanager
def _optimizer_step_disabled(optimizer: torch.optim.Optimizer, disabled: bool) -> Iterator[None]:
    """Let DeepSpeed run its step (counters, buffers, clearing grads) while the AdamW update is a no-op."""
    if not disabled:
        yield
        return
    optimizer.step = lambda *args, **kwargs: None  # shadows the class method on this instance only
    try:
        yield
    finally:
        del optimizer.step


class DeepSpeedEngine(Engine):
    def __init__(self, spec: EngineSpec, model: nn.Module, optim: OptimizerSpec, dist: DistInfo) -> None:
        if spec.precision == "fp16" and dist.device.type == "cpu":
            raise ValueError(
                "train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32"
            )
        ensure_process_group(dist)
        # DeepSpeed reads LOCAL_RANK (also while training, ZeRO-3) even when the group exists, and a lone
        # process or srun sets none. Only LOCAL_RANK: RANK/WORLD_SIZE left behind would make a later
        # init_distributed() in this process believe it runs under a launcher.
        os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
        deepspeed.init_distributed(dist_backend="nccl" if dist.device.type == "cuda" else "gloo")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.dist = dist
        self.spec = spec
        config = resolve_config(spec, optim, dist)
        self._optimizer = build_optimizer(model, optim)
        self._scheduler = build_scheduler(self._optimizer, optim)
        self._ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self._optimizer, config=config)
        self._fp32_step = spec.zero_stage == 0 and spec.precision == "fp32"

    @property
    def model(self) -> nn.Module:
        return self._ds.module

    def train_step(self, micro_batches: Sequence[dict[str, Tensor]]) -> StepOutput:
        check_micro_batches(micro_batches, self.spec.grad_accum)
        self._ds.train()
        lr = self._scheduler.get_last_lr()[0]
        losses = []
        for i, batch in enumerate(micro_batches):
            loss = self._ds(**to_device(batch, self.dist.device)).loss
            self._ds.backward(loss)  # scales by 1/grad_accum
            losses.append(loss.detach().float())
            if i < len(micro_batches) - 1:
                self._ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        mean_loss, bad = agreed_loss(losses, self.dist.world_size)
        # ZeRO-0 fp32 is the one path where DeepSpeed does not record the norm; its grads are replicated.
        norm = self._replicated_grad_norm() if self._fp32_step else None
        skipped_before = self._ds.skipped_steps  # DeepSpeed's own skips (fp16 overflow, invalid norm)
        with _optimizer_step_disabled(self._optimizer, bad):
            self._ds.step()
        skipped = bad or self._ds.skipped_steps > skipped_before
        if not skipped:
            self._scheduler.step()
        if bad:
            norm = math.nan
        elif norm is None:
            norm = self._ds.get_global_grad_norm()
            norm = math.nan if norm is None else float(norm)
        return StepOutput(loss=mean_loss, grad_norm=norm, lr=lr, skipped=skipped)

    def _replicated_grad_norm(self) -> float:
        grads = [p.grad for p in self._ds.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, Tensor]) -> float:
        self._ds.eval()
        loss = self._ds(**to_device(batch, self.dist.device)).loss.float().item()
        self._ds.train()
        return all_reduce_sum([loss])[0] / self.dist.world_size

    def save(self, path: Path) -> None:
        self._ds.save_checkpoint(str(path), tag=_TAG, save_latest=False)
        save_scheduler(self._scheduler, path, is_main=self.dist.is_main)

    def load(self, path: Path) -> None:
        loaded, _ = self._ds.load_checkpoint(
            str(path), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{_TAG}")
        load_scheduler(self._scheduler, path)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """fp32 master weights (gathered from ZeRO partitions), under the model's own names, on rank 0."""
        module = self._ds.module
        full: dict[int, Tensor] = {}
        for param in module.parameters():  # same order on every rank: the gathers are collective
            value = safe_get_full_fp32_param(param)
            if self.dist.is_main:
                full[id(param)] = (param.data if value is None else value).detach().float().cpu().clone()
        if not self.dist.is_main:
            return None
        return {
            name: full[id(t)] if isinstance(t, nn.Parameter) else t.detach().cpu().clone()
            for name, t in module.state_dict(keep_vars=True).items()
        }

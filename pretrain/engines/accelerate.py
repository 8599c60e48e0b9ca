"""Accelerate backend: DDP through an Accelerator, or FSDP2 (`fully_shard` per transformer block + root).

Accelerate's own FSDP plugin is silently dropped on CPU (notes/cpu-distributed.md), so FSDP uses PyTorch's
FSDP2 directly, on CPU and CUDA alike. Both strategies checkpoint with torch.distributed.checkpoint (each rank
writes its shard; the names are the model's own) plus the LR schedule as JSON, and share one train step in
which a non-finite loss or gradient norm on any rank skips the update on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pretrain.engines.base import DistInfo, Engine, EngineSpec, OptimizerSpec, StepOutput
from pretrain.engines.common import (
    agreed_loss,
    check_micro_batches,
    load_scheduler,
    save_scheduler,
    to_device,
)
from pretrain.engines.dist import all_reduce_sum, ensure_process_group
from pretrain.optim import build_optimizer, build_scheduler

_DCP_DIR = "dcp"
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}


class AccelerateEngine(Engine):
    def __init__(self, spec: EngineSpec, model: nn.Module, optim: OptimizerSpec, dist: DistInfo) -> None:
        if spec.precision not in _MIXED_PRECISION:
            raise ValueError(
                f"train.precision={spec.precision}: the accelerate backend takes fp32 or bf16 "
                "(fp16 with loss scaling: use engine.backend=deepspeed)"
            )
        if spec.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"engine.accelerate.strategy={spec.strategy!r}: expected ddp or fsdp")
        self.dist = dist
        self.spec = spec
        self._clip = optim.clip_grad if optim.clip_grad else math.inf
        self._model = model.to(dist.device)
        self._accelerator: Accelerator | None = None  # DDP only
        # FSDP needs a group even alone; Accelerate adopts an existing one instead of guessing from the env.
        ensure_process_group(dist)
        self._wrapped = self._wrap_ddp(dist) if spec.strategy == "ddp" else self._wrap_fsdp(dist)
        self._optimizer = build_optimizer(self._model, optim)  # after sharding: over the DTensor shards
        self._scheduler = build_scheduler(self._optimizer, optim)

    def _wrap_ddp(self, dist: DistInfo) -> nn.Module:
        on_cpu = dist.device.type == "cpu"
        self._accelerator = Accelerator(
            cpu=on_cpu,
            mixed_precision=_MIXED_PRECISION[self.spec.precision],
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl")],
        )
        if self._accelerator.num_processes != dist.world_size:
            raise RuntimeError(
                f"Accelerate sees {self._accelerator.num_processes} process(es) but the job has "
                f"{dist.world_size}: the processes would train unsynchronised (see launch/ for the right flags)"
            )
        return self._accelerator.prepare_model(self._model)

    def _wrap_fsdp(self, dist: DistInfo) -> nn.Module:
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.spec.precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for block in self._model.transformer_blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self._model, mesh=mesh, mp_policy=policy)
        return self._model

    @property
    def model(self) -> nn.Module:
        return self._model

    @contextmanager
    def _grad_sync(self, enabled: bool) -> Iterator[None]:
        """Reduce gradients only on the last micro-batch of a step."""
        if self._accelerator is None:
            self._model.set_requires_gradient_sync(enabled)
            yield
        elif enabled:
            yield
        else:
            with self._accelerator.no_sync(self._wrapped):
                yield

    def _backward(self, loss: Tensor) -> None:
        if self._accelerator is None:
            loss.backward()
        else:
            self._accelerator.backward(loss)

    def train_step(self, micro_batches: Sequence[dict[str, Tensor]]) -> StepOutput:
        check_micro_batches(micro_batches, self.spec.grad_accum)
        self._wrapped.train()
        lr = self._scheduler.get_last_lr()[0]
        losses = []
        for i, batch in enumerate(micro_batches):
            with self._grad_sync(i == len(micro_batches) - 1):
                loss = self._wrapped(**to_device(batch, self.dist.device)).loss
                self._backward(loss / len(micro_batches))
            losses.append(loss.detach().float())
        mean_loss, bad = agreed_loss(losses, self.dist.world_size)
        norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._clip)
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()  # the same on every rank
        skipped = bad or not math.isfinite(norm)
        if not skipped:
            self._optimizer.step()
            self._scheduler.step()
        self._optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss=mean_loss, grad_norm=math.nan if bad else norm, lr=lr, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, Tensor]) -> float:
        self._wrapped.eval()
        loss = self._wrapped(**to_device(batch, self.dist.device)).loss.float().item()
        self._wrapped.train()
        return all_reduce_sum([loss])[0] / self.dist.world_size

    def save(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=Path(path) / _DCP_DIR)
        save_scheduler(self._scheduler, path, is_main=self.dist.is_main)

    def load(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self._model, self._optimizer)  # the layout to fill
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=Path(path) / _DCP_DIR)
        set_state_dict(
            self._model, self._optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        load_scheduler(self._scheduler, path)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        if self._accelerator is None:  # FSDP: gather the shards to rank 0 (CPU), collective
            state = get_model_state_dict(
                self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            state = self._model.state_dict()
        if not self.dist.is_main:
            return None
        return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}

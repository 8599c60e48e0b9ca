"""DDP engine: PyTorch DistributedDataParallel through Accelerate (mixed precision, gradient sync, devices).

Accelerate starts one process alone in several silent ways (see docs/CLUSTER.md), so the engine checks that
it sees as many processes as the job has.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import Tensor, nn

from pretrain.config import EngineSpec
from pretrain.engines.dist import DistInfo, ensure_process_group
from pretrain.engines.native import NativeEngine
from pretrain.errors import LaunchEnvironmentError

_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}


class DDPEngine(NativeEngine):
    def __init__(self, spec: EngineSpec, model: nn.Module, dist: DistInfo) -> None:
        super().__init__(spec, model.to(dist.device), dist)
        ensure_process_group(dist)  # Accelerate adopts an existing group instead of guessing from the env
        on_cpu = dist.device.type == "cpu"
        self._accelerator = Accelerator(
            cpu=on_cpu,
            mixed_precision=_MIXED_PRECISION[spec.precision],
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl")],
        )
        if self._accelerator.num_processes != dist.world_size:
            raise LaunchEnvironmentError(
                f"Accelerate sees {self._accelerator.num_processes} process(es) but the job has "
                f"{dist.world_size}: the processes would train unsynchronised (see docs/CLUSTER.md)"
            )
        self._wrapped = self._accelerator.prepare_model(self._model)
        self._build_optimizer()

    @property
    def forward_module(self) -> nn.Module:
        return self._wrapped

    def _forward_backward(self, batch: dict[str, Tensor], *, last: bool, n_micro: int) -> Tensor:
        """Gradients are all-reduced on the last micro-batch of a step only."""
        if last:
            loss = self._wrapped(**batch).loss
            self._accelerator.backward(loss / n_micro)
            return loss
        with self._accelerator.no_sync(self._wrapped):
            loss = self._wrapped(**batch).loss
            self._accelerator.backward(loss / n_micro)
        return loss

    def full_state_dict(self) -> dict[str, Tensor] | None:
        return self._on_main(self._model.state_dict())

"""FSDP engine: PyTorch FSDP2 (`fully_shard` on each transformer block, then the root).

PyTorch's own FSDP2 rather than Accelerate's FSDP plugin: on CPU Accelerate silently drops the plugin (the
model stays unwrapped, or plain DDP runs), while `fully_shard` works on gloo and CUDA alike (configs/README.md).
Built from a recipe, the model is sharded before any weight exists (meta device -> `fully_shard` ->
`to_empty` -> each rank fills its own slices), as torchtitan does it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from pretrain.config import EngineSpec
from pretrain.engines.build import ModelRecipe, initial_slices
from pretrain.engines.dist import DistInfo, ensure_process_group
from pretrain.engines.gloo import FSDPAllGather, FSDPReduceScatter
from pretrain.engines.native import NativeEngine

# With a padded vocabulary the model returns its logits as a view of the padded ones (models/blocks.py
# `vocabulary_columns`), and FSDP2 warns that an in-place op on a view would drop its pre-backward hook.
# Backward starts from the loss, which carries the hook, and nothing writes into the logits.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


def shard(model: nn.Module, spec: EngineSpec, dist: DistInfo) -> nn.Module:
    """`fully_shard` each transformer block, then the root (works on meta parameters too)."""
    assert spec.fsdp is not None, "resolved by the config"
    ensure_process_group(dist)  # FSDP needs a group even alone
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if spec.precision == "bf16" else None, reduce_dtype=torch.float32
    )
    reshard = spec.fsdp.reshard_after_forward
    units = [*model.transformer_blocks(), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    if dist.device.type == "cpu":  # gloo's collectives without their full-size copies (engines/gloo.py)
        for unit in units:
            unit.set_custom_all_gather(FSDPAllGather())
            unit.set_custom_reduce_scatter(FSDPReduceScatter())
    return model


def build_sharded(spec: EngineSpec, recipe: ModelRecipe, dist: DistInfo) -> nn.Module:
    """Meta build -> shard -> allocate the local shards -> fill each from its starting value
    (`initial_slices`: the seeded initial value or `model.init_from`'s tensor)."""
    with torch.device("meta"):
        model = recipe.construct()
    shard(model, spec, dist)
    model.to_empty(device=dist.device)
    with torch.no_grad():
        for _, param, full in initial_slices(model, recipe):
            assert isinstance(param, DTensor), "fully_shard made every parameter a DTensor"
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
            index = tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))
            param.to_local().copy_(full[index])
    return model


class FSDPEngine(NativeEngine):
    def __init__(self, spec: EngineSpec, model: nn.Module, dist: DistInfo) -> None:
        assert spec.fsdp is not None, "resolved by the config"
        if not isinstance(model, FSDPModule):  # a whole model handed in: shard it now
            model = shard(model.to(dist.device), spec, dist)
        super().__init__(spec, model, dist)
        self._build_optimizer()

    @property
    def forward_module(self) -> nn.Module:
        return self._model

    def _forward_backward(self, batch: dict[str, Tensor], *, last: bool, n_micro: int) -> Tensor:
        """Gradients are reduce-scattered on the last micro-batch of a step only."""
        self._model.set_requires_gradient_sync(last)
        loss = self._model(**batch).loss
        (loss / n_micro).backward()
        return loss

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The shards gathered to rank 0 (on CPU); collective."""
        state = get_model_state_dict(
            self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return self._on_main(state)

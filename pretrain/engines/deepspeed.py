"""DeepSpeed engine: ZeRO 0-3, optimizer/parameter offload, fp32/bf16/fp16.

DeepSpeed gets our AdamW; the LR schedule stays outside it and is stepped by the shared train step, so a step
skipped for a non-finite loss leaves optimizer, schedule and weights exactly as they were, on every ZeRO stage
and dtype alike (DeepSpeed's own overflow handling differs between them). Checkpoints are DeepSpeed's own
(`save_checkpoint`, each rank its shard) plus the schedule as JSON, plus `full_state.safetensors`: the fp32
master weights and AdamW moments gathered by parameter name. A resume at the same world size loads
DeepSpeed's shards (bitwise); at another world size their partitioning no longer fits, so every rank takes
its new partitions from the full tensors (`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`),
exact for ZeRO 0-3 and any precision. We keep this layout of our own rather than DeepSpeed's universal
checkpoint, which needs an offline conversion step and has had reported conversion failures and loss jumps
(see /work/shared/notes/scale-and-elastic.md). It costs one gather of the optimizer state per save, on rank 0.
Built from a recipe at ZeRO-3, the model is constructed inside `deepspeed.zero.Init`, so no rank ever holds
more than one module's parameters whole.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pretrain.config import EngineSpec
from pretrain.engines.base import Engine
from pretrain.engines.build import ModelRecipe, initial_slices
from pretrain.engines.dist import DistInfo, ensure_process_group
from pretrain.engines.ds_config import fill_device_fields, fill_model_fields
from pretrain.engines.gloo import all_gather_in_place, reduce_scatter_in_place
from pretrain.engines.optim import build_optimizer, build_scheduler
from pretrain.errors import ConfigError

_TAG = "deepspeed"
FULL_STATE = "full_state.safetensors"  # "{key}/{name}": fp32 weights, AdamW moments; metadata: AdamW step
_FULL_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


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


def _join(spec: EngineSpec, dist: DistInfo, *, hidden_size: int) -> dict:
    """Let DeepSpeed adopt the process group (idempotent); the config with its device and model-sized
    fields filled."""
    assert spec.deepspeed is not None and spec.deepspeed_json is not None, "resolved by the config"
    cpu = dist.device.type == "cpu"
    if spec.precision == "fp16" and cpu:
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    ensure_process_group(dist)
    # DeepSpeed reads LOCAL_RANK (also while training, ZeRO-3) even when the group exists, and a lone
    # process or srun sets none. Only LOCAL_RANK: RANK/WORLD_SIZE left behind would make a later
    # init_distributed() in this process believe it runs under a launcher.
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
    if cpu:
        # On CPU DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op into
        # ~/.cache/torch_extensions at every start, behind a file lock with no timeout (a build killed
        # half-way blocks every later start). Without it, collectives go through the gloo group.
        # (import_module: `import deepspeed.comm.torch as m` would bind torch itself, which deepspeed.comm re-exports)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # ZeRO-3's reduce-scatter and all-gather without gloo's full-size copies (engines/gloo.py). Their only
        # callers hand in scratch buffers: the reduce-scatter input is pre-divided in place and read back only
        # at this rank's chunk, the all-gather output is a fresh buffer with this rank's chunk already in it.
        collectives = importlib.import_module("deepspeed.runtime.comm.coalesced_collectives")
        collectives._torch_reduce_scatter_fn = lambda scratch, out, group=None, **_: reduce_scatter_in_place(
            out, scratch, group
        )
        gathers = importlib.import_module("deepspeed.runtime.zero.partition_parameters")
        gathers._dist_allgather_fn = lambda chunk, out, group=None: all_gather_in_place(out, chunk, group)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return fill_model_fields(fill_device_fields(spec.deepspeed_json, cuda=not cpu), hidden_size=hidden_size)


def _share_master_partitions(zero: object) -> None:
    """fp32 ZeRO-3: let AdamW update the parameters' own flat partitions instead of a copy of them.

    DeepSpeed 0.19.8 means to (stage3.py `_create_fp32_partitions`: "we don't need another copy of the
    weights") but compares the partition's `torch.device` with its device *name*, a string, which is never
    equal, so it keeps a second fp32 copy: 4 bytes per parameter / world size (bench/NOTES.md). Its step then
    copies the master into the partition, which is now a copy onto itself. Offloaded and NVMe-swapped
    optimizers keep theirs: their masters live elsewhere by design."""
    low = getattr(zero, "fp16_partitioned_groups_flat", None)
    if not low or getattr(zero, "offload_optimizer", False) or getattr(zero, "offload_param", False):
        return
    for part, master in zip(low, zero.fp32_partitioned_groups_flat, strict=True):
        if part is None or master.numel() == 0:
            continue
        if (part.dtype, part.device, part.shape) == (master.dtype, master.device, master.shape):
            master.data = part.data  # a no-op where DeepSpeed shared them itself


class _GradientPartitions:
    """ZeRO-3's buffer of reduced gradient partitions, resident only from a step's first gradient to the end of
    its optimizer step, as FSDP2 holds its gradient shards.

    DeepSpeed allocates the buffer (4 bytes per parameter / world size in fp32) once and keeps it, so it also
    sits through every forward and the start of every backward, where a step's memory peaks (activations all
    alive; for a tied LM head its gradient and the gathered table too): 118 MiB of gpt2-small's step peak at 4
    ranks (bench/NOTES.md). Its storage is freed after the optimizer step and re-allocated, zeroed, by a hook
    that runs when the step's first parameter gradient is ready, before DeepSpeed's own hook reduces into it
    (ours runs before accumulation, DeepSpeed's after). DeepSpeed keeps views into the buffer; they stay valid,
    only the storage behind them is released. Offloaded optimizers keep theirs (pinned host memory)."""

    def __init__(self, zero: object, params: list[nn.Parameter]) -> None:
        self.buffer: Tensor = zero.grad_partitions_flat_buffer
        self.nbytes = self.buffer.untyped_storage().nbytes()
        self.hooks = [p.register_hook(self._before_first_reduce) for p in params if p.requires_grad]
        self.release()

    def _before_first_reduce(self, grad: Tensor) -> None:
        self.restore()

    def restore(self) -> None:
        storage = self.buffer.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.nbytes)
            self.buffer.zero_()

    def release(self) -> None:
        self.buffer.untyped_storage().resize_(0)


def build_partitioned(spec: EngineSpec, recipe: ModelRecipe, dist: DistInfo) -> nn.Module:
    """ZeRO-3: construct inside `zero.Init` (each module's parameters partitioned as it is built), then fill
    each rank's partition (a flat slice of the parameter) from the parameter's starting value (`initial_slices`)."""
    config = _join(spec, dist, hidden_size=recipe.config.d_model)
    recipe.model_class()  # imports the model code first: torch._dynamo cannot be imported inside zero.Init
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = recipe.construct()
    with torch.no_grad():
        for _, param, full in initial_slices(model, recipe):
            part = param.ds_tensor
            start = part.ds_numel * torch.distributed.get_rank(group=param.ds_process_group)
            mine = full.view(-1)[start : start + part.ds_numel]  # shorter (or empty) at the padded tail
            part.zero_()
            part.narrow(0, 0, mine.numel()).copy_(mine)
    return model


class DeepSpeedEngine(Engine):
    def __init__(self, spec: EngineSpec, model: nn.Module, dist: DistInfo) -> None:
        config = _join(spec, dist, hidden_size=model.config.d_model)
        assert spec.deepspeed is not None, "resolved by the config"
        self.dist = dist
        self.spec = spec
        # DeepSpeed casts the parameters to bf16/fp16, but neither the inputs nor the buffers: pixels and
        # waveforms (engines/base.py SIGNAL_INPUTS) and float buffers (MAE's fixed positions, BatchNorm's
        # statistics) follow the parameters, as `module.to(dtype)` would have them.
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
        if self.input_dtype is not None:
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(self.input_dtype)
        self._optimizer = build_optimizer(model, spec.optimizer)
        self.scheduler = build_scheduler(self._optimizer, spec.optimizer)
        self._ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self._optimizer, config=config)
        _share_master_partitions(self._ds.optimizer)
        zero = self._ds.optimizer
        self._grad_partitions = (
            _GradientPartitions(zero, list(model.parameters()))
            if getattr(zero, "grad_partitions_flat_buffer", None) is not None
            and not getattr(zero, "offload_optimizer", False)
            else None
        )
        # ZeRO-0 fp32 is the one path where DeepSpeed does not record the norm; its grads are replicated.
        self._own_norm = spec.deepspeed.zero_stage == 0 and spec.precision == "fp32"

    @property
    def model(self) -> nn.Module:
        return self._ds.module

    @property
    def forward_module(self) -> nn.Module:
        return self._ds

    def _forward_backward(self, batch: dict[str, Tensor], *, last: bool, n_micro: int) -> Tensor:
        loss = self._ds(**batch).loss
        self._ds.backward(loss)  # scales by 1/grad_accum
        if not last:
            self._ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return loss

    def _update(self, *, skip: bool) -> tuple[float, bool]:
        norm = self._replicated_grad_norm() if self._own_norm else None
        skipped_before = self._ds.skipped_steps  # DeepSpeed's own skips (fp16 overflow, invalid norm)
        if self._grad_partitions is not None:
            self._grad_partitions.restore()  # in case no gradient reached a hook this step
        with _optimizer_step_disabled(self._optimizer, skip):
            self._ds.step()
        if self._grad_partitions is not None:
            self._grad_partitions.release()
        skipped = skip or self._ds.skipped_steps > skipped_before
        if norm is None:
            norm = self._ds.get_global_grad_norm()
            norm = math.nan if norm is None else float(norm)
        return norm, skipped

    def _replicated_grad_norm(self) -> float:
        grads = [p.grad for p in self._ds.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0

    def model_state_bytes(self) -> dict[str, int]:
        """As the base engine's, plus DeepSpeed's fp32 partitions of the parameters, which its ZeRO-3 optimizer
        puts in the param groups only while it steps (ZeRO-1/2 keep them there)."""
        held = super().model_state_bytes()
        zero = self._ds.optimizer
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(
            zero, "single_partition_of_fp32_groups", []
        )
        known = {
            t.untyped_storage().data_ptr() for group in self._optimizer.param_groups for t in group["params"]
        }
        known |= {
            getattr(p, "ds_tensor", p).untyped_storage().data_ptr() for p in self._ds.module.parameters()
        }
        extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in masters}
        held["optimizer"] += sum(size for ptr, size in extra.items() if ptr not in known)
        return held

    def gradient_bytes(self) -> int:
        """As the base engine's, plus ZeRO-3's buffer of reduced gradient partitions (ZeRO 1-2 copy theirs
        into the flat fp32 gradient the base counts, and free the parameters' `.grad` before the update)."""
        held = super().gradient_bytes()
        partitions = getattr(self._ds.optimizer, "grad_partitions_flat_buffer", None)
        return held + (partitions.untyped_storage().nbytes() if partitions is not None else 0)

    def save(self, path: Path) -> None:
        self._ds.save_checkpoint(str(path), tag=_TAG, save_latest=False)
        self._save_full_state(Path(path) / FULL_STATE)
        self.save_scheduler(path)

    def load(self, path: Path, *, saved_world_size: int | None = None) -> None:
        if saved_world_size is None or saved_world_size == self.dist.world_size or not self._partitioned():
            loaded, _ = self._ds.load_checkpoint(
                str(path), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{_TAG}")
        else:
            self._load_full_state(Path(path) / FULL_STATE)
        self.load_scheduler(path)

    def _partitioned(self) -> bool:
        """Whether DeepSpeed splits the optimizer by rank (ZeRO 1-3, bf16): else its checkpoint is whole."""
        return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in self._ds.module.parameters())

    def _master_partitions(self) -> list[Tensor]:
        """The flat fp32 tensors AdamW updates on this rank (its partition of each group), which key its state."""
        zero = self._ds.optimizer
        for attr in (
            "fp32_partitioned_groups_flat",
            "single_partition_of_fp32_groups",
            "fp32_groups_flat_partition",
        ):
            if hasattr(zero, attr):  # ZeRO-3, ZeRO 1-2, bf16 (DeepSpeed's names)
                return list(getattr(zero, attr))
        raise TypeError(f"unknown DeepSpeed optimizer {type(zero).__name__}: cannot reshard its state")

    def _save_full_state(self, file: Path) -> None:
        """Collective: gather the fp32 weights and AdamW moments by parameter name into `file` (rank 0)."""
        if not self._partitioned():
            return  # DeepSpeed's own checkpoint is whole: it loads at any world size
        state = self._optimizer.state
        steps = {int(state[p]["step"]) for p in self._master_partitions() if "step" in state.get(p, {})}
        self._link_optimizer_state()
        keys = _FULL_KEYS if steps else _FULL_KEYS[:1]  # no moments before AdamW's first (unskipped) step
        tensors: dict[str, Tensor] = {}
        for name, param in self._ds.module.named_parameters():  # the same order on every rank: collective
            for key in keys:
                value = (
                    safe_get_full_fp32_param(param)
                    if key == "fp32"
                    else safe_get_full_optimizer_state(param, key)
                )
                if self.dist.is_main and value is not None:
                    tensors[f"{key}/{name}"] = value.detach().float().cpu().contiguous()
        if self.dist.is_main:
            save_file(tensors, str(file), metadata={"step": str(max(steps, default=0))})

    def _load_full_state(self, file: Path) -> None:
        """Collective: every rank takes its partitions of `file`'s full tensors; then DeepSpeed's working
        copies (bf16, ZeRO-3's partitioned parameters) are refreshed from the fp32 master weights."""
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the checkpoint cannot be resumed at another world size"
            )
        with safe_open(str(file), framework="pt") as f:
            self._create_adam_state(int(f.metadata()["step"]))
            names = set(f.keys())
            for name, param in self._ds.module.named_parameters():
                for key in _FULL_KEYS:
                    if f"{key}/{name}" not in names:
                        continue  # a parameter without gradients
                    value = f.get_tensor(f"{key}/{name}").to(self.dist.device)
                    if key == "fp32":
                        safe_set_full_fp32_param(param, value)
                    else:
                        safe_set_full_optimizer_state(param, value, key)
        self._refresh_working_params()

    def _create_adam_state(self, step: int) -> None:
        """AdamW creates its state at the first step; a resumed engine may not have taken one yet."""
        on_device = self._optimizer.defaults.get("fused") or self._optimizer.defaults.get("capturable")
        for p in self._master_partitions():
            state = self._optimizer.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            device = p.device if on_device else torch.device("cpu")  # where AdamW keeps its step count
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """ZeRO 1-2 and bf16 map each parameter to its slice of AdamW's state once, after the first group's
        first step, so with several parameter groups (ours: decay / no decay) the later groups' slices stay
        unmapped: map them again now that every group has its state."""
        zero = self._ds.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _refresh_working_params(self) -> None:
        zero = self._ds.optimizer
        if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for sub_group in range(len(zero.fp32_partitioned_groups_flat)):
                zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        else:  # ZeRO 1-2, bf16
            zero.update_lp_params()

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

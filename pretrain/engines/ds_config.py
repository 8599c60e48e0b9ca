"""DeepSpeed JSON: pick the stage's file, fill its "auto" fields from the run config, refuse conflicts.

The run config is the one source of truth for batch sizes, precision, clipping and AdamW; a JSON value is
accepted only when it is "auto", absent, or equal to ours, so a stale JSON cannot silently change a run.
The "optimizer" section is only checked, then dropped: the engine always passes its own AdamW (param groups
without weight decay on norms/biases/embeddings) so that resume restores exactly what it saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.bundled import bundled_dir
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from pretrain.config import DeepSpeedConfig, TrainConfig

_OPTIMIZER_TYPES = ("adamw", "adam")
# Filled by the engine, which knows the device: pinned host memory needs CUDA.
PIN_MEMORY_KEYS = (
    "zero_optimization.offload_optimizer.pin_memory",
    "zero_optimization.offload_param.pin_memory",
)
# Filled from the model's hidden size h (elements), as transformers' DeepSpeed integration does: DeepSpeed's
# own defaults (5e8-element buckets: 2 GB each in fp32) are sized for big GPUs and dwarf a small model's states.
# The offload JSONs keep DeepSpeed's defaults: with CPU optimizer offload and a reduce bucket smaller than the
# gradients, ZeRO-2 on CPU computed a wrong gradient norm (bench/NOTES.md, "DeepSpeed bucket sizes").
# ZeRO-3 neither prefetches nor keeps a gathered parameter for its reuse: with DeepSpeed 0.19.8 any prefetch
# bucket, or a reuse distance larger than the model (its default 1e9), kept every block gathered from forward
# to backward, a whole unsharded copy of the parameters per rank (bench/NOTES.md, "What ZeRO-3 held").
MODEL_SIZED_KEYS = {
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.allgather_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: 0,
    "zero_optimization.stage3_max_reuse_distance": lambda h: 0,
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
}


def default_config_path(ds: DeepSpeedConfig) -> Path:
    """The bundled zero{stage}.json, or zero{stage}-offload.json when something is offloaded."""
    if ds.offload == "params" and ds.zero_stage != 3:
        raise ConfigError(
            f"engine.deepspeed.offload=params needs engine.deepspeed.zero_stage=3 (got {ds.zero_stage})"
        )
    if ds.offload != "none" and ds.zero_stage < 2:
        raise ConfigError(
            f"engine.deepspeed.offload={ds.offload} needs engine.deepspeed.zero_stage 2 or 3 (got {ds.zero_stage})"
        )
    suffix = "" if ds.offload == "none" else "-offload"
    return bundled_dir("deepspeed_configs") / f"zero{ds.zero_stage}{suffix}.json"


def _our_values(ds: DeepSpeedConfig, train: TrainConfig) -> dict[str, Any]:
    """Dotted JSON key -> the value the run config implies (a different explicit value is an error).
    train_batch_size is left to DeepSpeed (micro-batch x accumulation x world size): the JSON is resolved
    before the world size is known."""
    optim = train.optimizer
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(optim.clip_grad or 0.0),
        "bf16.enabled": train.precision == "bf16",
        "fp16.enabled": train.precision == "fp16",
        "zero_optimization.stage": ds.zero_stage,
        "zero_optimization.offload_optimizer.device": "cpu" if ds.offload != "none" else "none",
        "zero_optimization.offload_param.device": "cpu" if ds.offload == "params" else "none",
        "zero_force_ds_cpu_optimizer": False,
        "optimizer.params.lr": optim.lr,
        "optimizer.params.betas": list(optim.betas),
        "optimizer.params.eps": optim.eps,
        "optimizer.params.weight_decay": optim.weight_decay,
    }


_OUR_NAMES = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.clip_grad",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "engine.deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "engine.deepspeed.offload",
    "zero_optimization.offload_param.device": "engine.deepspeed.offload",
    "zero_force_ds_cpu_optimizer": "the engine's own AdamW",
    "optimizer.params.lr": "train.lr",
    "optimizer.params.betas": "train.betas",
    "optimizer.params.eps": "train.eps",
    "optimizer.params.weight_decay": "train.weight_decay",
}


def _same(theirs: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return theirs is ours
    if isinstance(ours, list):
        return isinstance(theirs, list | tuple) and len(theirs) == len(ours) and all(map(_same, theirs, ours))
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        return float(theirs) == float(ours)
    return theirs == ours


def _load(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"engine.deepspeed.config: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.deepspeed.config: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"engine.deepspeed.config: {path} must hold a JSON object")
    return config


def resolve_config(ds: DeepSpeedConfig, train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict to pass to deepspeed.initialize (without "optimizer"/"scheduler")."""
    path = Path(ds.config) if ds.config else default_config_path(ds)
    config = _load(path)
    if "scheduler" in config:
        raise ConfigError(
            f"engine.deepspeed.config: {path}: remove the 'scheduler' section; the LR schedule comes from "
            "train.schedule / train.warmup_steps / train.min_lr_ratio"
        )
    opt_type = str(config.get("optimizer", {}).get("type", "AdamW"))
    if opt_type.lower() not in _OPTIMIZER_TYPES:
        raise ConfigError(
            f"engine.deepspeed.config: {path}: optimizer.type={opt_type!r}; only AdamW is supported "
            "(or drop the section)"
        )
    batch = config.pop("train_batch_size", "auto")
    if batch != "auto":
        raise ConfigError(
            f'engine.deepspeed.config: {path}: train_batch_size={batch!r}; set it to "auto": it is '
            "train.micro_batch_size x train.grad_accum x the world size"
        )
    for key, ours in _our_values(ds, train).items():
        node, leaf = _parent(config, key, path)
        theirs = node.get(leaf, "auto")
        if theirs != "auto" and not _same(theirs, ours):
            raise ConfigError(
                f"engine.deepspeed.config: {path}: {key}={theirs!r} conflicts with {_OUR_NAMES[key]} "
                f'(= {ours!r}); set it to "auto" or to the same value'
            )
        node[leaf] = ours
    for key in PIN_MEMORY_KEYS:
        node, leaf = _parent(config, key, path)
        node.setdefault(leaf, "auto")
    config.pop("optimizer")
    return config


def fill_device_fields(config: dict[str, Any], *, cuda: bool) -> dict[str, Any]:
    """A copy of a resolved config with the fields that depend on the device filled (pinned memory needs CUDA)."""
    config = json.loads(json.dumps(config))
    for key in PIN_MEMORY_KEYS:
        node, leaf = _parent(config, key, Path("<resolved>"))
        if node.get(leaf) == "auto":
            node[leaf] = cuda
    return config


def fill_model_fields(config: dict[str, Any], *, hidden_size: int) -> dict[str, Any]:
    """A copy of a resolved config with the "auto" bucket and prefetch sizes filled from the model's hidden
    size (`MODEL_SIZED_KEYS`); a number the JSON gives is kept."""
    config = json.loads(json.dumps(config))
    for key, size in MODEL_SIZED_KEYS.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(leaf) == "auto":
            node[leaf] = size(hidden_size)
    return config


def _parent(config: dict[str, Any], key: str, path: Path) -> tuple[dict[str, Any], str]:
    """The dict holding dotted `key` (created when missing) and the key's last part."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"engine.deepspeed.config: {path}: {part!r} must be a JSON object")
    return node, leaf

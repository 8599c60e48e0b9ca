"""DeepSpeed JSON: pick the stage's file, fill its "auto" fields from the run config, refuse conflicts.

The run config is the one source of truth for batch sizes, precision, clipping and AdamW; a JSON value is
accepted only when it is "auto", absent, or equal to ours, so a stale JSON cannot silently change a run.
The "optimizer" section is only checked, then dropped: the engine always passes its own AdamW (param groups
without weight decay on norms/biases/embeddings) so that resume restores exactly what it saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.engines.base import DistInfo, EngineSpec, OptimizerSpec

CONFIG_DIR = Path(__file__).resolve().parents[2] / "deepspeed_configs"

_OPTIMIZER_TYPES = ("adamw", "adam")


def default_config_path(spec: EngineSpec) -> Path:
    """deepspeed_configs/zero{stage}.json, or zero{stage}-offload.json when something is offloaded."""
    if spec.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={spec.zero_stage}: expected 0, 1, 2 or 3")
    if spec.offload == "none":
        return CONFIG_DIR / f"zero{spec.zero_stage}.json"
    if spec.offload == "params" and spec.zero_stage != 3:
        raise ValueError(f"engine.offload=params needs engine.zero_stage=3 (got {spec.zero_stage})")
    if spec.zero_stage < 2:
        raise ValueError(
            f"engine.offload={spec.offload} needs engine.zero_stage 2 or 3 (got {spec.zero_stage})"
        )
    return CONFIG_DIR / f"zero{spec.zero_stage}-offload.json"


def _our_values(spec: EngineSpec, optim: OptimizerSpec, dist: DistInfo) -> dict[str, Any]:
    """Dotted JSON key -> the value the run config implies (a different explicit value is an error)."""
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * dist.world_size,
        "gradient_clipping": float(optim.clip_grad or 0.0),
        "bf16.enabled": spec.precision == "bf16",
        "fp16.enabled": spec.precision == "fp16",
        "zero_optimization.stage": spec.zero_stage,
        "zero_optimization.offload_optimizer.device": "cpu" if spec.offload != "none" else "none",
        "zero_optimization.offload_param.device": "cpu" if spec.offload == "params" else "none",
        "zero_force_ds_cpu_optimizer": False,
        "optimizer.params.lr": optim.lr,
        "optimizer.params.betas": list(optim.betas),
        "optimizer.params.eps": optim.eps,
        "optimizer.params.weight_decay": optim.weight_decay,
    }


def _defaults(dist: DistInfo) -> dict[str, Any]:
    """Dotted JSON key -> what "auto" (or absence) means for settings the run config does not own."""
    pin = dist.device.type == "cuda"  # pinned host memory needs CUDA
    return {
        "zero_optimization.offload_optimizer.pin_memory": pin,
        "zero_optimization.offload_param.pin_memory": pin,
    }


_OUR_NAMES = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x world size",
    "gradient_clipping": "train.clip_grad",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer.device": "engine.offload",
    "zero_optimization.offload_param.device": "engine.offload",
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
        raise ValueError(f"engine.deepspeed_config: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"engine.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return config


def resolve_config(spec: EngineSpec, optim: OptimizerSpec, dist: DistInfo) -> dict[str, Any]:
    """The DeepSpeed config dict to pass to deepspeed.initialize (without "optimizer"/"scheduler")."""
    path = Path(spec.deepspeed_config) if spec.deepspeed_config else default_config_path(spec)
    config = _load(path)
    if "scheduler" in config:
        raise ValueError(
            f"{path}: remove the 'scheduler' section; the LR schedule comes from "
            "train.schedule / train.warmup_steps / train.min_lr_ratio"
        )
    opt_type = str(config.get("optimizer", {}).get("type", "AdamW"))
    if opt_type.lower() not in _OPTIMIZER_TYPES:
        raise ValueError(
            f"{path}: optimizer.type={opt_type!r}; only AdamW is supported (or drop the section)"
        )
    for key, ours in _our_values(spec, optim, dist).items():
        node, leaf = _parent(config, key, path)
        theirs = node.get(leaf, "auto")
        if theirs != "auto" and not _same(theirs, ours):
            raise ValueError(
                f"{path}: {key}={theirs!r} conflicts with {_OUR_NAMES[key]} (= {ours!r}); "
                'set it to "auto" or to the same value'
            )
        node[leaf] = ours
    for key, default in _defaults(dist).items():
        node, leaf = _parent(config, key, path)
        if node.get(leaf, "auto") == "auto":
            node[leaf] = default
    config.pop("optimizer")
    return config


def _parent(config: dict[str, Any], key: str, path: Path) -> tuple[dict[str, Any], str]:
    """The dict holding dotted `key` (created when missing) and the key's last part."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {part!r} must be a JSON object")
    return node, leaf

"""AdamW with the usual weight-decay exemptions, and the warmup + decay LR schedule.

Decaying norm gains, biases or embedding rows pulls them towards zero for no benefit (GPT-2/-3, BERT
practice), so those parameters sit in a group with weight_decay=0. The schedule is a LambdaLR over a
`functools.partial`, so its state_dict holds only numbers (JSON-able, nothing pickled).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pretrain.engines.base import OptimizerSpec


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything else (norms, biases, embeddings).

    A parameter is exempt when it is 0-/1-D (norm gains, biases) or owned by an nn.Embedding (so a tied LM
    head, which shares the embedding's Parameter, is exempt too). Empty groups are left out: ZeRO rejects them.
    """
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for param in model.parameters():  # deduplicated, in registration order: identical on every rank
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused when the parameters' device supports it (else foreach)."""
    groups = param_groups(model, spec.weight_decay)
    kwargs = {"lr": spec.lr, "betas": spec.betas, "eps": spec.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # e.g. a device or dtype the fused kernel lacks
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, *, spec: OptimizerSpec) -> float:
    """Multiplier on spec.lr for the update with 0-based index `step`."""
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps))
    if spec.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif spec.schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"train.schedule={spec.schedule!r}: expected one of cosine, linear, constant")
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerSpec) -> LambdaLR:
    if spec.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"train.schedule={spec.schedule!r}: expected one of cosine, linear, constant")
    return LambdaLR(optimizer, functools.partial(lr_factor, spec=spec))

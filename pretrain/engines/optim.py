"""AdamW with weight-decay exemptions, and the warmup + decay LR schedule.

Which parameters are decayed is a choice, and ours differs from some references on purpose:
- Norm gains and biases (0-/1-D) are exempt, as in GPT-2/-3, BERT's original optimizer and transformers'
  Trainer: decaying them pulls scales and offsets towards zero for no regularising benefit.
- Every embedding table is exempt too (tokens, and with them a tied LM head; learned positions; token types;
  T5's relative-position bias), where BERT's original optimizer and transformers' Trainer decay them. A row of
  a table gets a gradient only when its token (position, bucket) occurs, but decoupled decay shrinks every row
  at every step, so rare tokens' rows shrink towards zero between occurrences: a bias by frequency, not a
  regulariser. Decaying them is one line in `param_groups` for anyone who wants the BERT behaviour.
The schedule is a LambdaLR over a `functools.partial`, so its state_dict holds only numbers (JSON, no pickle).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import OptimizerConfig


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


def build_optimizer(model: nn.Module, spec: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused when the parameters' device supports it (else foreach)."""
    groups = param_groups(model, spec.weight_decay)
    kwargs = {"lr": spec.lr, "betas": spec.betas, "eps": spec.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # e.g. a device or dtype the fused kernel lacks
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, *, spec: OptimizerConfig) -> float:
    """Multiplier on spec.lr for the update with 0-based index `step` (schedule validated by the config)."""
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps))
    if spec.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        decay = 1.0 - progress
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerConfig) -> LambdaLR:
    return LambdaLR(optimizer, functools.partial(lr_factor, spec=spec))

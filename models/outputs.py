"""What every model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    """logits and, when labels were given, the mean fp32 cross-entropy over labels != -100.

    logits: (B, L, vocab) for GPT and BERT, (B, L_target, vocab) for T5 — except for BERT *with labels*:
    the MLM head then runs only where labels != -100 (about 15% of positions; the rest would be thrown
    away), and logits has shape (num_masked, vocab), rows in row-major order of those positions, i.e.
    matching `labels[labels != -100]`. Without labels BERT returns the full (B, L, vocab) logits.
    """

    logits: Tensor
    loss: Tensor | None = None

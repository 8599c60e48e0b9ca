"""Position information: learned and sinusoidal absolute embeddings, and T5's relative position bias."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from models.kernels.bias import RelativeBias


class LearnedPositions(nn.Embedding):
    """One learned vector per position (GPT-2, BERT)."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__(max_len, dim)

    def forward(self, seq_len: int) -> Tensor:  # type: ignore[override]
        """(seq_len, dim); positions past `max_len` are an error naming both lengths."""
        if seq_len > self.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.num_embeddings}")
        return self.weight[:seq_len]


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos positions (Vaswani et al.); no parameters, any length."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dim = dim

    def forward(self, seq_len: int) -> Tensor:
        """(seq_len, dim): sin on even channels, cos on odd ones."""
        angles = (
            torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq
        )
        out = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)
        return out[:, : self.dim]


class RelativePositionBias(nn.Module):
    """T5's learned bias per (bucket of key - query offset, head), shared by every layer of one stack.

    It returns the table plus the bucketing rule (`RelativeBias`), not a dense tensor, so the chunked
    backend can evaluate it block by block.
    """

    def __init__(
        self, n_heads: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
    ) -> None:
        super().__init__()
        self.table = nn.Embedding(num_buckets, n_heads)
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance

    def forward(self) -> RelativeBias:
        return RelativeBias(
            table=self.table.weight,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

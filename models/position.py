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

    def forward(self, seq_len: int, device: torch.device | None = None) -> Tensor:  # type: ignore[override]
        """(seq_len, dim); positions past `max_len` are an error naming both lengths."""
        if seq_len > self.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.num_embeddings}")
        return self.weight[:seq_len]


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos positions (Vaswani et al.): no parameters, no state, so nothing to save or shard."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, seq_len: int, device: torch.device | None = None) -> Tensor:
        """(seq_len, dim): PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(same)."""
        inv_freq = torch.exp(torch.arange(0, self.dim, 2, device=device) * (-math.log(self.base) / self.dim))
        angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, : self.dim]


def make_positions(kind: str, max_len: int, dim: int) -> nn.Module:
    """`learned` (GPT-2, BERT) or `sinusoidal` absolute positions."""
    return LearnedPositions(max_len, dim) if kind == "learned" else SinusoidalPositions(dim)


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

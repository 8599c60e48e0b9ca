"""Attention biases that attention backends can evaluate block by block.

A T5 relative position bias is a small learned table (num_buckets x heads) indexed by a bucket that
depends only on (query position, key position). Passing the table plus the bucketing rule, instead of a
dense (heads x Lq x Lk) tensor, lets the chunked backend build the bias one block at a time and so keep
O(n) memory; the eager and SDPA backends simply ask for the dense tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucketing of `key_pos - query_pos`, identical to transformers' `_relative_position_bucket`."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


@dataclass(frozen=True)
class RelativeBias:
    """A T5 relative position bias: the learned table and the rule that indexes it.

    `table` is the (num_buckets, num_heads) embedding weight; gradients flow into it from every block.
    Query i and key j are at positions `q_offset + i` and `j`.
    """

    table: Tensor
    bidirectional: bool
    num_buckets: int
    max_distance: int
    q_offset: int = 0

    @property
    def num_heads(self) -> int:
        return self.table.shape[1]

    def buckets(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bucket ids, shape (len(q_pos), len(k_pos)), for absolute query and key positions."""
        rel = k_pos[None, :] - (q_pos[:, None] + self.q_offset)
        return relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def offset_buckets(self, q_len: int, k_len: int) -> Tensor:
        """Bucket ids for every `key - query` offset in a q_len x k_len grid, shape (q_len + k_len - 1,).

        Entry `k - q + q_len - 1` is the bucket of query q and key k: the bias is constant along diagonals,
        so a blocked kernel needs only this O(n) vector, never an (Lq, Lk) grid of ids.
        """
        rel = torch.arange(-(q_len - 1), k_len, device=self.table.device) - self.q_offset
        return relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def block(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias for one block of queries x keys, shape (heads, len(q_pos), len(k_pos))."""
        return self.table[self.buckets(q_pos, k_pos)].permute(2, 0, 1)

    def dense(self, q_len: int, k_len: int) -> Tensor:
        """The whole bias, shape (1, heads, q_len, k_len): O(q_len * k_len) memory, for reference backends."""
        device = self.table.device
        q_pos = torch.arange(q_len, device=device)
        k_pos = torch.arange(k_len, device=device)
        return self.block(q_pos, k_pos).unsqueeze(0)


def relative_shift(scores: Tensor) -> Tensor:
    """(..., Lq, Lq + Lk - 1) scores against relative positions Lq - 1 ... -(Lk - 1) -> (..., Lq, Lk) with entry
    (i, j) = scores[i, Lq - 1 - i + j], i.e. the score for relative position i - j. A strided view, no copy."""
    *lead, q_len, width = scores.shape
    scores = scores.contiguous()
    strides = scores.stride()[:-2]
    return scores.as_strided(
        (*lead, q_len, width - q_len + 1), (*strides, width - 1, 1), q_len - 1 + scores.storage_offset()
    )


@dataclass(frozen=True)
class PositionScores:
    """Transformer-XL's position term: bias(i, j) = scale * query_i . positions[Lq - 1 - (i - j)].

    `query` (B, H, Lq, D) is the attention's query plus its learned position bias (v); `positions`
    (H, Lq + Lk - 1, D) are the projected encodings of the relative positions Lq - 1 ... -(Lk - 1), in that
    order (as `relative_shift` reads them). Passed as this object, the chunked backend computes each tile's
    term from a query block and the Lq + Lk - 1 positions it spans (O(n) memory, gradients into both);
    the other backends ask for the dense (B, H, Lq, Lk) tensor.
    """

    query: Tensor
    positions: Tensor
    scale: float

    @property
    def num_heads(self) -> int:
        return self.positions.shape[0]

    def dense(self, q_len: int, k_len: int) -> Tensor:
        """The whole bias, (B, H, q_len, k_len): O(q_len * k_len) memory, for reference backends."""
        return relative_shift(torch.matmul(self.query, self.positions.transpose(-1, -2))) * self.scale

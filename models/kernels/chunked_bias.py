"""Additive attention biases served one (query block x key block) tile at a time, with their gradients.

The chunked kernel never holds an Lq x Lk tensor, so a bias must be sliced (dense) or built (T5 relative)
per tile, and its gradient must be folded back per tile: into the dense bias's own (possibly broadcast)
shape, or into the small (num_buckets, heads) table of a `RelativeBias`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from models.kernels.bias import RelativeBias, relative_shift


class DenseBlocks:
    """A dense bias broadcastable to (B, H, Lq, Lk), sliced per tile; broadcast dims stay size 1."""

    def __init__(self, bias: Tensor, *, dtype: torch.dtype, need_grad: bool) -> None:
        self.bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        self._q_broadcast = self.bias.shape[2] == 1
        self._k_broadcast = self.bias.shape[3] == 1
        self._sum_dims = [d for d in (0, 1) if self.bias.shape[d] == 1]
        self._shape = bias.shape
        self._grad = torch.zeros(self.bias.shape, dtype=dtype, device=bias.device) if need_grad else None

    def _slices(self, qs: int, qe: int, ks: int, ke: int) -> tuple[slice, slice, slice, slice]:
        q = slice(None) if self._q_broadcast else slice(qs, qe)
        k = slice(None) if self._k_broadcast else slice(ks, ke)
        return slice(None), slice(None), q, k

    def block(self, qs: int, qe: int, ks: int, ke: int) -> Tensor:
        return self.bias[self._slices(qs, qe, ks, ke)]

    def add_grad(self, ds: Tensor, qs: int, qe: int, ks: int, ke: int) -> None:
        """Fold d(loss)/d(scores) of one tile, (B, H, bq, bk), into the bias's shape."""
        if self._sum_dims:
            ds = ds.sum(self._sum_dims, keepdim=True)
        if self._q_broadcast:
            ds = ds.sum(2, keepdim=True)
        if self._k_broadcast:
            ds = ds.sum(3, keepdim=True)
        self._grad[self._slices(qs, qe, ks, ke)] += ds

    def grad(self) -> Tensor:
        return self._grad.reshape(self._shape)


class RelativeBlocks:
    """A T5 relative bias evaluated per tile from one O(Lq + Lk) vector of per-offset values.

    The bias depends only on `key - query`, so the table is gathered once per diagonal (offset) and
    each tile indexes that vector. Gradients are summed per offset, then per bucket into the table.
    """

    def __init__(
        self,
        rule: RelativeBias,
        table: Tensor,
        q_len: int,
        k_len: int,
        *,
        dtype: torch.dtype,
        need_grad: bool,
    ) -> None:
        rule = dataclasses.replace(rule, table=table)
        self._table = table
        self._q_len = q_len
        self._buckets = rule.offset_buckets(q_len, k_len)  # (Lq + Lk - 1,)
        self._values = table.to(dtype)[self._buckets].t().contiguous()  # (H, Lq + Lk - 1)
        self._positions = torch.arange(max(q_len, k_len), device=table.device)
        self._grad = torch.zeros_like(self._values) if need_grad else None

    def _offsets(self, qs: int, qe: int, ks: int, ke: int) -> Tensor:
        """Index into the per-offset vector for every (query, key) of the tile, shape (bq, bk)."""
        return self._positions[ks:ke][None, :] - self._positions[qs:qe][:, None] + (self._q_len - 1)

    def block(self, qs: int, qe: int, ks: int, ke: int) -> Tensor:
        """(H, bq, bk), broadcasting over B: a Toeplitz tile, built by unfolding the offset vector.

        Row a of the unfold holds offsets lo + a ... lo + a + bk - 1, which is query row bq - 1 - a;
        one flip puts the rows in query order (a plain copy, much faster than an index gather).
        """
        bq, bk = qe - qs, ke - ks
        lo = ks - (qe - 1) + (self._q_len - 1)  # the smallest offset in the tile: last query, first key
        return self._values[:, lo : lo + bq + bk - 1].unfold(1, bk, 1).flip(1)

    def add_grad(self, ds: Tensor, qs: int, qe: int, ks: int, ke: int) -> None:
        heads = self._values.shape[0]
        self._grad.index_add_(1, self._offsets(qs, qe, ks, ke).flatten(), ds.sum(0).reshape(heads, -1))

    def grad(self) -> Tensor:
        table_grad = torch.zeros(self._table.shape, dtype=self._grad.dtype, device=self._grad.device)
        return table_grad.index_add_(0, self._buckets, self._grad.t())


class PositionBlocks:
    """Transformer-XL's position term (`PositionScores`) computed per tile, with its gradients.

    A (bq, bk) tile spans bq + bk - 1 relative positions: one (B, H, bq, D) x (H, D, bq + bk - 1) product
    gives the query block's score against each, and `relative_shift` reads the tile out of it. Backward
    scatters the tile's gradient back through the same view and folds it into the query block and the
    positions it spans, so nothing of size Lq x Lk is ever held.
    """

    def __init__(
        self, query: Tensor, positions: Tensor, scale: float, *, dtype: torch.dtype, need_grad: bool
    ) -> None:
        self._scale = scale
        self._query = query.to(dtype) * scale  # (B, H, Lq, D)
        self._positions = positions.to(dtype)  # (H, Lq + Lk - 1, D), positions Lq - 1 ... -(Lk - 1)
        self._q_len = query.shape[2]
        self._dquery = torch.zeros_like(self._query) if need_grad else None
        self._dpositions = torch.zeros_like(self._positions) if need_grad else None

    def _span(self, qs: int, qe: int, ks: int, ke: int) -> slice:
        """The positions the tile reads: Lq - 1 - (i - j) from the tile's largest i - j to its smallest."""
        lo = self._q_len - qe + ks
        return slice(lo, lo + (qe - qs) + (ke - ks) - 1)

    def block(self, qs: int, qe: int, ks: int, ke: int) -> Tensor:
        """(B, H, bq, bk)."""
        scores = torch.matmul(self._query[:, :, qs:qe], self._positions[:, self._span(qs, qe, ks, ke)].mT)
        return relative_shift(scores)

    def add_grad(self, ds: Tensor, qs: int, qe: int, ks: int, ke: int) -> None:
        """ds: d(loss)/d(bias tile), (B, H, bq, bk)."""
        B, H, bq, bk = ds.shape
        d_scores = ds.new_zeros(B, H, bq, bq + bk - 1)
        relative_shift(d_scores).copy_(ds)  # a view of d_scores: the scatter is a strided copy
        span = self._span(qs, qe, ks, ke)
        self._dquery[:, :, qs:qe] += torch.matmul(d_scores, self._positions[:, span])
        # sum over B of d_scores^T @ query, as one (H, w, B * bq) x (H, B * bq, D) product
        query = self._query[:, :, qs:qe].transpose(0, 1).reshape(H, B * bq, -1)
        self._dpositions[:, span] += torch.bmm(d_scores.permute(1, 3, 0, 2).reshape(H, -1, B * bq), query)

    def grads(self) -> tuple[Tensor, Tensor]:
        """d(loss)/d(query), d(loss)/d(positions)."""
        return self._dquery * self._scale, self._dpositions

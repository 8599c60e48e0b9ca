"""Memory-efficient exact attention: FlashAttention's algorithm written with PyTorch tensor ops.

Queries are processed in blocks, keys/values in blocks, with an online (log-sum-exp) softmax accumulated
in fp32 (float64 stays float64). Only q, k, v, the output and the per-row log-sum-exp are saved for
backward, which recomputes each score tile. No Lq x Lk tensor exists in either pass, so training memory
grows linearly with sequence length, also with a learned T5 relative bias (built per tile from positions,
its gradient folded back into the small bucket table), with Transformer-XL's position term
(`PositionScores`: each tile's query block against the relative positions it spans) and with a sliding
window, whose out-of-window tiles are skipped rather than masked (O(n * w) work).

Where the time goes, and what keeps it close to a fused kernel (the measurements are in bench/NOTES.md):
- Each tile is one batched matmul over (B, H). Operands are cut once into contiguous blocks, and every
  product accumulates into a contiguous block: BLAS then runs one batched call, where a strided slice of
  a long tensor falls back to a per-matrix loop.
- Scores are kept in base 2 (log2(e) folded into the query scale), so the softmax uses `exp2`, faster
  than `exp` on CPU and exact to fp32 rounding; the log-sum-exp is stored in base 2 as well.
- The backward runs key blocks outside, query blocks inside (FlashAttention-2's order), so dK and dV
  accumulate in a block that stays hot; dQ blocks are accumulated in place.
- One score buffer per pass is reused for every tile (no multi-MB allocation per tile), and the
  causal/window masks, which depend only on a tile's diagonal offset, are built once per offset.

torch.compile: `chunked_attention` is excluded from tracing (`torch.compiler.disable`), so a compiled model
compiles everything around it and calls the kernel eagerly. Traced, Dynamo unrolls the tile loops, so
compile time grows with the number of tiles; compiling just one tile's step gained little against a long
cold compile per tile shape: not worth it on CPU, so the kernel stays plain eager PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.kernels.bias import PositionScores, RelativeBias
from models.kernels.chunked_bias import DenseBlocks, PositionBlocks, RelativeBlocks

DEFAULT_Q_BLOCK = 256
DEFAULT_K_BLOCK = 256
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


@dataclass(frozen=True, kw_only=True)
class _Tiling:
    """Which key tiles each query block visits, and which of those need an explicit mask.

    Keys sit on a fixed grid of `k_block`-sized blocks; a visit (j, ks, ke) is grid block j trimmed to
    the keys [ks, ke) that some query of the block can see.
    """

    q_len: int
    k_len: int
    q_block: int
    k_block: int
    causal: bool
    window: int | None
    _hidden: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_split(self) -> int | list[int]:
        """How queries are cut into blocks: `torch.split`'s argument, matching `query_blocks`."""
        return self.q_block

    def query_blocks(self) -> Iterator[tuple[int, int]]:
        for qs in range(0, self.q_len, self.q_block):
            yield qs, min(qs + self.q_block, self.q_len)

    def key_blocks(self, qs: int, qe: int) -> Iterator[tuple[int, int, int]]:
        """Key tiles holding at least one key visible to some query in [qs, qe); the rest are skipped."""
        lo, hi = 0, self.k_len
        if self.causal:
            hi = min(hi, qe)
        if self.window is not None:
            lo = max(lo, qs - self.window + 1)
            hi = min(hi, qe - 1 + self.window)
        if lo >= hi:
            return
        for j in range(lo // self.k_block, (hi - 1) // self.k_block + 1):
            yield j, max(lo, j * self.k_block), min(hi, (j + 1) * self.k_block)

    def hidden(self, qs: int, qe: int, ks: int, ke: int, device: torch.device) -> Tensor | None:
        """Bool (bq, bk) mask of hidden (query, key) pairs, or None when the whole tile is visible.

        It depends only on the tile's shape and diagonal offset, so each distinct one is built once.
        """
        partial = self.causal and ke - 1 > qs
        if self.window is not None:
            partial = partial or qe - 1 - ks >= self.window or ke - 1 - qs >= self.window
        if not partial:
            return None
        key = (ks - qs, qe - qs, ke - ks, device)
        if key not in self._hidden:
            offset = (
                torch.arange(ks, ke, device=device)[None, :] - torch.arange(qs, qe, device=device)[:, None]
            )
            hide = torch.zeros_like(offset, dtype=torch.bool)
            if self.causal:
                hide |= offset > 0
            if self.window is not None:
                hide |= offset.abs() >= self.window
            self._hidden[key] = hide
        return self._hidden[key]


@dataclass(frozen=True, kw_only=True)
class _Spec:
    """Everything the autograd function needs besides tensors."""

    tiling: _Tiling
    scale: float
    relative: RelativeBias | None
    position_scale: float | None  # a `PositionScores` bias's scale (its tensors are the Function's inputs)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_bias(spec: _Spec, dense, table, pos_query, positions, dtype: torch.dtype, need_grad: bool):
    if pos_query is not None:
        return PositionBlocks(pos_query, positions, spec.position_scale, dtype=dtype, need_grad=need_grad)
    if dense is not None:
        return DenseBlocks(dense, dtype=dtype, need_grad=need_grad)
    if table is not None:
        t = spec.tiling
        return RelativeBlocks(spec.relative, table, t.q_len, t.k_len, dtype=dtype, need_grad=need_grad)
    return None


def _add_masks(spec: _Spec, s: Tensor, heads: int, tile: tuple[int, int, int, int], bias, pad) -> Tensor:
    """Add the bias and the padding / causal / window masks (-inf) to one (B * H, bq, bk) score tile.

    Scores are in base-2 units (natural units times log2(e)), so the bias is added scaled the same way.
    """
    qs, qe, ks, ke = tile
    s4 = s.view(-1, heads, qe - qs, ke - ks)
    if bias is not None:
        s4.add_(bias.block(qs, qe, ks, ke), alpha=LOG2E)
    if pad is not None:
        s4 += pad[:, :, :, ks:ke]
    hide = spec.tiling.hidden(qs, qe, ks, ke, s.device)
    if hide is not None:
        s.masked_fill_(hide, -math.inf)
    return s


def _blocks(t: Tensor, block: int | list[int]) -> list[Tensor]:
    """(N, L, D) -> contiguous (N, <= block, D) pieces, so every tile product reads and writes whole blocks."""
    return [piece.contiguous() for piece in t.split(block, dim=1)]


def _in_block(piece: Tensor, j: int, block: int, ks: int, ke: int) -> Tensor:
    """Rows [ks, ke) of grid block j: the block itself unless a window trims it (a rare, strided view)."""
    lo = j * block
    return piece if ks == lo and ke - ks == piece.shape[1] else piece[:, ks - lo : ke - lo]


class _TileBuffer:
    """One reusable (N, bq, bk) buffer per pass, viewed at each tile's shape: no multi-MB malloc per tile."""

    def __init__(self, rows: int, tiling: _Tiling, like: Tensor) -> None:
        tile = min(tiling.q_block, tiling.q_len) * min(tiling.k_block, tiling.k_len)
        self._flat = like.new_empty(rows * tile)
        self._rows = rows

    def __call__(self, bq: int, bk: int) -> Tensor:
        return self._flat[: self._rows * bq * bk].view(self._rows, bq, bk)


def _operands(spec: _Spec, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype):
    """q * scale * log2(e), k and v as (B * H, L, D) in the compute dtype, cut into contiguous blocks."""
    B, H, Lq, _ = q.shape
    q2 = _blocks((q.to(dtype) * (spec.scale * LOG2E)).reshape(B * H, Lq, -1), spec.tiling.q_split)
    kb, vb = (_blocks(t.to(dtype).reshape(B * H, t.shape[2], -1), spec.tiling.k_block) for t in (k, v))
    return q2, kb, vb


class _ChunkedAttention(torch.autograd.Function):
    """Tensors are handled as (B * H, L, D) so every tile product is one bmm / baddbmm over all heads."""

    @staticmethod
    def forward(ctx, q, k, v, pad, dense, table, pos_query, positions, spec: _Spec):
        B, H, Lq, _ = q.shape
        Dv = v.shape[-1]
        dtype = _compute_dtype(q.dtype)
        tiling = spec.tiling
        q2, kb, vb = _operands(spec, q, k, v, dtype)
        bias = _block_bias(spec, dense, table, pos_query, positions, dtype, need_grad=False)
        scores = _TileBuffer(B * H, tiling, q2[0])
        out = q.new_empty(B * H, Lq, Dv)
        lse = q.new_empty(B * H, Lq, 1, dtype=dtype)  # base 2
        for i, (qs, qe) in enumerate(tiling.query_blocks()):
            q_blk = q2[i]
            row_max = q_blk.new_full((B * H, qe - qs, 1), -math.inf)
            row_sum = q_blk.new_zeros(B * H, qe - qs, 1)
            acc = q_blk.new_zeros(B * H, qe - qs, Dv)
            for j, ks, ke in tiling.key_blocks(qs, qe):
                k_blk = _in_block(kb[j], j, tiling.k_block, ks, ke)
                s = torch.bmm(q_blk, k_blk.transpose(1, 2), out=scores(qe - qs, ke - ks))
                s = _add_masks(spec, s, H, (qs, qe, ks, ke), bias, pad)
                new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
                # A row with nothing visible yet keeps max -inf; shift it by 0 so exp2 gives 0, not NaN.
                shift = new_max.masked_fill(new_max == -math.inf, 0.0)
                p = s.sub_(shift).exp2_()
                rescale = (row_max - shift).exp2_()
                row_sum.mul_(rescale).add_(p.sum(-1, keepdim=True))
                acc.mul_(rescale).baddbmm_(p, _in_block(vb[j], j, tiling.k_block, ks, ke))
                row_max = new_max
            empty = row_sum == 0  # no visible key at all: output 0, log-sum-exp +inf (so backward's p = 0)
            out[:, qs:qe] = acc.div_(row_sum.masked_fill(empty, 1.0))
            lse[:, qs:qe] = (row_max + row_sum.log2()).masked_fill_(empty, math.inf)
        out = out.view(B, H, Lq, Dv)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, pad, dense, table, pos_query, positions)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, pad, dense, table, pos_query, positions = ctx.saved_tensors
        spec: _Spec = ctx.spec
        tiling = spec.tiling
        B, H, Lq, _ = q.shape
        dtype = lse.dtype
        q2, kb, vb = _operands(spec, q, k, v, dtype)
        do, o = (t.to(dtype).reshape(B * H, Lq, -1) for t in (grad_out, out))
        neg_delta = _blocks(-(do * o).sum(-1, keepdim=True), tiling.q_split)  # -rowsum(dO * O)
        do, neg_lse = _blocks(do, tiling.q_split), _blocks(-lse, tiling.q_split)
        need_bias_grad = any(ctx.needs_input_grad[4:8])
        bias = _block_bias(spec, dense, table, pos_query, positions, dtype, need_grad=need_bias_grad)
        scores, dscores = _TileBuffer(B * H, tiling, q2[0]), _TileBuffer(B * H, tiling, q2[0])
        dq = [torch.zeros_like(blk) for blk in q2]
        dk, dv = [torch.zeros_like(blk) for blk in kb], [torch.zeros_like(blk) for blk in vb]
        visits: dict[int, list[tuple[int, int, int, int, int]]] = {}  # key block -> its query tiles
        for i, (qs, qe) in enumerate(tiling.query_blocks()):
            for j, ks, ke in tiling.key_blocks(qs, qe):
                visits.setdefault(j, []).append((i, qs, qe, ks, ke))
        for j, tiles in visits.items():
            for i, qs, qe, ks, ke in tiles:
                k_blk, v_blk, dk_blk, dv_blk = (
                    _in_block(t[j], j, tiling.k_block, ks, ke) for t in (kb, vb, dk, dv)
                )
                # p = exp2(s - lse), recomputed; the -lse rides along in the GEMM's accumulator.
                s = torch.baddbmm(neg_lse[i], q2[i], k_blk.transpose(1, 2), out=scores(qe - qs, ke - ks))
                p = _add_masks(spec, s, H, (qs, qe, ks, ke), bias, pad).exp2_()
                dv_blk.baddbmm_(p.transpose(1, 2), do[i])
                dp = torch.baddbmm(neg_delta[i], do[i], v_blk.transpose(1, 2), out=dscores(qe - qs, ke - ks))
                ds = dp.mul_(p)  # d(loss)/d(natural-unit scores)
                if need_bias_grad:
                    bias.add_grad(ds.view(B, H, qe - qs, ke - ks), qs, qe, ks, ke)
                dq[i].baddbmm_(ds, k_blk)
                dk_blk.baddbmm_(ds.transpose(1, 2), q2[i])
        # dq = ds @ k * scale; dk = ds^T @ (q * scale) and q2 = q * scale * log2(e).
        grads = [
            torch.cat(g, dim=1).mul_(c).view(t.shape).to(t.dtype)
            for g, c, t in ((dq, spec.scale, q), (dk, 1.0 / LOG2E, k), (dv, 1.0, v))
        ] + [None] * 6
        if ctx.needs_input_grad[4]:
            grads[4] = bias.grad().to(dense.dtype)
        if ctx.needs_input_grad[5]:
            grads[5] = bias.grad().to(table.dtype)
        if pos_query is not None and need_bias_grad:
            dquery, dpositions = bias.grads()
            grads[6], grads[7] = dquery.to(pos_query.dtype), dpositions.to(positions.dtype)
        return tuple(grads)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, bias) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"chunked_attention: {name} must be (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point() or t.dtype != q.dtype:
            raise ValueError(f"chunked_attention: {name} must be a float tensor of q's dtype, got {t.dtype}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(
            "chunked_attention: expected q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Lk)
    ):
        raise ValueError(
            f"chunked_attention: key_padding_mask must be a bool ({B}, {Lk}) tensor (True = attend), "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if isinstance(bias, RelativeBias):
        if bias.num_heads != H:
            raise ValueError(f"chunked_attention: RelativeBias has {bias.num_heads} heads, q has {H}")
    elif isinstance(bias, PositionScores):
        want = ((B, H, Lq, q.shape[3]), (H, Lq + Lk - 1, q.shape[3]))
        if (tuple(bias.query.shape), tuple(bias.positions.shape)) != want:
            raise ValueError(
                f"chunked_attention: PositionScores query and positions must be {want[0]} and {want[1]}, "
                f"got {tuple(bias.query.shape)} and {tuple(bias.positions.shape)}"
            )
    elif isinstance(bias, Tensor):
        full = (B, H, Lq, Lk)
        shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        if bias.dim() > 4 or any(s not in (1, f) for s, f in zip(shape, full)):
            raise ValueError(
                f"chunked_attention: bias of shape {tuple(bias.shape)} does not broadcast to (B, H, Lq, Lk) = {full}"
            )
    elif bias is not None:
        raise ValueError(
            "chunked_attention: bias must be None, a Tensor, a RelativeBias or PositionScores, "
            f"got {type(bias).__name__}"
        )


def _positive(name: str, value: int | None, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"chunked_attention: {name} must be a positive int or None, got {value!r}")
    return value


@torch.compiler.disable
def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | RelativeBias | PositionScores | None = None,
    window: int | None = None,
    scale: float | None = None,
    q_block: int | None = None,
    k_block: int | None = None,
) -> Tensor:
    """Exact softmax attention in O(Lq + Lk) memory: q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, Dv).

    Semantics are those of `models.attention.attend` (no dropout): key_padding_mask (B, Lk) bool with
    True = attend; causal means key j is visible to query i iff j <= i; window w keeps |i - j| < w;
    bias is a dense tensor broadcastable to (B, H, Lq, Lk), a `RelativeBias` or `PositionScores`; a query
    with no visible key outputs 0. q_block / k_block set the tile size (defaults DEFAULT_Q_BLOCK /
    DEFAULT_K_BLOCK).
    """
    _check_inputs(q, k, v, key_padding_mask, bias)
    tiling = _Tiling(
        q_len=q.shape[2],
        k_len=k.shape[2],
        q_block=_positive("q_block", q_block, DEFAULT_Q_BLOCK),
        k_block=_positive("k_block", k_block, DEFAULT_K_BLOCK),
        causal=causal,
        window=_positive("window", window, None),
    )
    return tiled_attention(q, k, v, tiling, key_padding_mask=key_padding_mask, bias=bias, scale=scale)


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiling: _Tiling,
    *,
    key_padding_mask: Tensor | None,
    bias: Tensor | RelativeBias | PositionScores | None,
    scale: float | None,
) -> Tensor:
    """The kernel over the tiles `tiling` visits (a subclass may visit fewer: `models.kernels.sparse`)."""
    spec = _Spec(
        tiling=tiling,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        relative=bias if isinstance(bias, RelativeBias) else None,
        position_scale=bias.scale if isinstance(bias, PositionScores) else None,
    )
    pad = None
    if key_padding_mask is not None:
        # Additive 0 / -inf, (B, 1, 1, Lk): one add per tile instead of building a combined bool mask.
        dtype = _compute_dtype(q.dtype)
        pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=q.device)
        pad = pad.masked_fill_(~key_padding_mask, -math.inf)[:, None, None, :]
    dense = bias if isinstance(bias, Tensor) else None
    table = bias.table if isinstance(bias, RelativeBias) else None
    pos_query, positions = (bias.query, bias.positions) if isinstance(bias, PositionScores) else (None, None)
    return _ChunkedAttention.apply(q, k, v, pad, dense, table, pos_query, positions, spec)

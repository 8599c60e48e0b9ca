"""Sparse attention: a sliding window plus global tokens, optionally plus random key blocks (BigBird).

Query i sees key j when |i - j| < window, or i or j is one of the first `global_tokens` positions (they
attend to, and are attended by, every position: Longformer's [CLS]), or j's key block is one of the
`random_blocks` blocks drawn for i's query block; causal and padding masks apply on top.

It is the chunked kernel (`models.kernels.chunked`) with another `_Tiling`: each query block visits only
the key tiles its pattern touches, so forward and backward cost O(n * (w + g + r * block)) time and
O(n) memory, and keep the kernel's exact online softmax and recomputing backward. The global queries
form their own query block(s), so they do not drag a whole block of local queries through every key
tile. The random blocks are a fixed function of (seed, query block): the same at every step and in a
recomputed forward, so checkpointing and resuming need no state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.kernels.bias import RelativeBias
from models.kernels.chunked import (
    DEFAULT_K_BLOCK,
    DEFAULT_Q_BLOCK,
    _check_inputs,
    _positive,
    _Tiling,
    tiled_attention,
)

Piece = tuple[int, int, int]  # (key grid block j, first key, end key), trimmed to one grid block


@dataclass(frozen=True, kw_only=True)
class SparsePattern:
    """What the sparse backend adds to a window: the settings a sparse attention module carries."""

    global_tokens: int = 0
    random_blocks: int = 0
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class _SparseTiling(_Tiling):
    """Window + global + random tiles. Every visited piece is of one kind, which fixes its mask:
    "full" pieces (global query rows, global keys, random blocks) hide only what causality hides, the
    others are window pieces with the window's mask. Window ranges are cut around the full ones, so no key
    is visited twice by one query block."""

    global_tokens: int
    random_blocks: int
    seed: int
    _random: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_split(self) -> list[int]:
        return [qe - qs for qs, qe in self.query_blocks()]

    def query_blocks(self) -> Iterator[tuple[int, int]]:
        g = min(self.global_tokens, self.q_len)
        for start, end in ((0, g), (g, self.q_len)):
            for qs in range(start, end, self.q_block):
                yield qs, min(qs + self.q_block, end)

    def _causal_end(self, qe: int) -> int:
        return min(self.k_len, qe) if self.causal else self.k_len

    def _window_range(self, qs: int, qe: int) -> tuple[int, int]:
        return max(0, qs - self.window + 1), min(self._causal_end(qe), qe - 1 + self.window)

    def random_keys(self, qs: int, qe: int) -> list[int]:
        """The random key blocks of query block [qs, qe): drawn once from (seed, qs), among the blocks
        the window and global keys leave out (and, causal, that hold a visible key)."""
        if (qs, qe) not in self._random:
            g, kb = self.global_tokens, self.k_block
            lo, hi = self._window_range(qs, qe)
            end = self._causal_end(qe)
            candidates = [
                j
                for j in range((end + kb - 1) // kb)
                if (j + 1) * kb > g and (j * kb >= hi or min((j + 1) * kb, end) <= lo)
            ]
            chosen: list[int] = []
            if candidates and self.random_blocks:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + qs)
                order = torch.randperm(len(candidates), generator=gen)[: self.random_blocks]
                chosen = sorted(candidates[i] for i in order.tolist())
            self._random[(qs, qe)] = chosen
        return self._random[(qs, qe)]

    def _cut(self, start: int, end: int) -> Iterator[Piece]:
        """[start, end) cut on the key grid."""
        kb = self.k_block
        for j in range(start // kb, (end - 1) // kb + 1) if start < end else ():
            yield j, max(start, j * kb), min(end, (j + 1) * kb)

    def key_blocks(self, qs: int, qe: int) -> Iterator[Piece]:
        end = self._causal_end(qe)
        if qe <= self.global_tokens:  # global queries see every (visible) key
            yield from self._cut(0, end)
            return
        full = [(0, min(self.global_tokens, end))]
        g, kb = self.global_tokens, self.k_block
        full += [(max(j * kb, g), min((j + 1) * kb, end)) for j in self.random_keys(qs, qe)]
        pieces = [p for s, e in full for p in self._cut(s, e)]
        lo, hi = self._window_range(qs, qe)
        lo = max(lo, g)  # global keys are a full piece already
        for s, e in sorted(full) + [(hi, hi)]:  # the window range minus the full ones
            pieces += self._cut(lo, min(s, hi))
            lo = max(lo, e)
        yield from sorted(pieces, key=lambda p: p[1])

    def _is_full(self, qs: int, qe: int, ks: int, ke: int) -> bool:
        if qe <= self.global_tokens or ke <= self.global_tokens:
            return True
        return ks // self.k_block in self.random_keys(qs, qe)

    def hidden(self, qs: int, qe: int, ks: int, ke: int, device: torch.device) -> Tensor | None:
        if not self._is_full(qs, qe, ks, ke):
            return super().hidden(qs, qe, ks, ke, device)
        if not (self.causal and ke - 1 > qs):
            return None
        key = ("full", ks - qs, qe - qs, ke - ks, device)
        if key not in self._hidden:
            offset = (
                torch.arange(ks, ke, device=device)[None, :] - torch.arange(qs, qe, device=device)[:, None]
            )
            self._hidden[key] = offset > 0
        return self._hidden[key]


@torch.compiler.disable
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | RelativeBias | None = None,
    window: int | None = None,
    scale: float | None = None,
    pattern: SparsePattern | None = None,
    q_block: int | None = None,
    k_block: int | None = None,
) -> Tensor:
    """Window + global + random attention, q/k/v (B, H, L, D) -> (B, H, L, Dv), self attention only.

    Semantics of `models.attention.attend` restricted to the pattern in the module docstring; with a
    window covering the sequence it is exact attention. The random blocks are `k_block` keys wide.
    """
    if window is None:
        raise ValueError("attention backend 'sparse' needs a window (model.attention_window)")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"attention backend 'sparse' is for self attention; got {q.shape[2]} queries and {k.shape[2]} keys"
        )
    _check_inputs(q, k, v, key_padding_mask, bias)
    pattern = pattern or SparsePattern()
    for name in ("global_tokens", "random_blocks"):
        if getattr(pattern, name) < 0:
            raise ValueError(f"sparse_attention: {name} must be >= 0, got {getattr(pattern, name)}")
    tiling = _SparseTiling(
        q_len=q.shape[2],
        k_len=k.shape[2],
        q_block=_positive("q_block", q_block, DEFAULT_Q_BLOCK),
        k_block=_positive("k_block", k_block, DEFAULT_K_BLOCK),
        causal=causal,
        window=_positive("window", window, None),
        global_tokens=pattern.global_tokens,
        random_blocks=pattern.random_blocks,
        seed=pattern.seed,
    )
    return tiled_attention(q, k, v, tiling, key_padding_mask=key_padding_mask, bias=bias, scale=scale)

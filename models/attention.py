"""Multi-head attention (self, causal self, cross) and the one `attend` call every family goes through.

Backends live in `models/kernels/`: `eager` (reference), `sdpa` (PyTorch's fused kernels) and `chunked`
(our O(n)-memory kernel). `auto` takes SDPA when its fused kernels apply and the
chunked kernel when a learned bias or a sliding window would force SDPA to materialise L x L tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from models.config import ATTENTION_BACKENDS
from models.kernels.bias import RelativeBias
from models.kernels.chunked import chunked_attention
from models.kernels.eager import eager_attention
from models.kernels.sdpa import sdpa_attention


def _chunked(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, **kwargs) -> Tensor:
    if dropout_p > 0.0:
        raise ValueError("attention backend 'chunked' has no attention dropout; set attention_dropout=0")
    # The kernel picks its own accumulation precision (fp32); autocast must not recast its tile matmuls.
    with torch.autocast(q.device.type, enabled=False):
        return chunked_attention(q, k, v, **kwargs)


_KERNELS: dict[str, Callable[..., Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "chunked": _chunked,
}


def resolve_backend(
    backend: str, *, bias: Tensor | RelativeBias | None, window: int | None, dropout_p: float
) -> str:
    """The concrete backend `auto` stands for in this call."""
    if backend != "auto":
        if backend not in _KERNELS:
            raise ValueError(
                f"unknown attention backend {backend!r}; accepted: {', '.join(ATTENTION_BACKENDS)}"
            )
        return backend
    fused_ok = window is None and (bias is None or (isinstance(bias, Tensor) and not bias.requires_grad))
    if fused_ok or dropout_p > 0.0:
        return "sdpa"
    return "chunked"


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | RelativeBias | None = None,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    block_size: int | None = None,
) -> Tensor:
    """Scaled dot-product attention, q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D).

    key_padding_mask: (B, Lk) bool, True = attend; a query whose keys are all masked outputs 0.
    causal: key j is visible to query i iff j <= i (top-left aligned). window: also |i - j| < window.
    bias: additive, a dense tensor broadcastable to (B, H, Lq, Lk) or a `RelativeBias` (T5).
    scale: None -> 1/sqrt(D). `auto` without an eligible fused kernel uses `chunked`, or `sdpa` when
    dropout is on (the chunked kernel has none). block_size: the chunked kernel's query and key tile
    (None: its default); the other backends have no tiles.
    """
    name = resolve_backend(backend, bias=bias, window=window, dropout_p=dropout_p)
    tiles = {"q_block": block_size, "k_block": block_size} if name == "chunked" else {}
    return _KERNELS[name](
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        bias=bias,
        window=window,
        scale=scale,
        dropout_p=dropout_p,
        **tiles,
    )


class MultiHeadAttention(nn.Module):
    """What self and cross attention share: head layout, the `attend` call and the output projection."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        scale: float | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.scale, self.dropout, self.backend, self.block_size = scale, dropout, backend, block_size
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def _split(self, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        """(B, L, parts * H * D) -> `parts` views of shape (B, H, L, D), no copies."""
        b, length, _ = x.shape
        return x.view(b, length, parts, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        y = attend(
            q,
            k,
            v,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
            block_size=self.block_size,
            **kwargs,
        )  # (B, H, Lq, D)
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))


class SelfAttention(MultiHeadAttention):
    """Self attention with one fused QKV projection (one matmul instead of three).

    `window` makes it local: query i sees keys with |i - j| < window (sliding-window attention).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        causal: bool = False,
        window: int | None = None,
        bias: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, bias=bias, **kwargs)
        self.causal, self.window = causal, window
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=bias)

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        bias: Tensor | RelativeBias | None = None,
    ) -> Tensor:
        q, k, v = self._split(self.qkv(x), 3)
        return self._attend(
            q, k, v, causal=self.causal, window=self.window, key_padding_mask=key_padding_mask, bias=bias
        )


class CrossAttention(MultiHeadAttention):
    """Queries from the decoder, keys and values (one fused projection) from the encoder output."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, bias: bool = True, **kwargs) -> None:
        super().__init__(d_model, n_heads, head_dim, bias=bias, **kwargs)
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_heads * head_dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        (q,) = self._split(self.q(x), 1)
        k, v = self._split(self.kv(context), 2)
        return self._attend(q, k, v, key_padding_mask=key_padding_mask)

"""Multi-head attention (self, causal self, cross) and the one `attend` call every family goes through.

Backends live in `models/kernels/`: `eager` (reference), `sdpa` (PyTorch's fused kernels) and `chunked`
(our O(n)-memory kernel). `auto` takes SDPA when its fused kernels apply and the
chunked kernel when a learned bias or a sliding window would force SDPA to materialise L x L tensors.

The approximate backends trade exactness for near-linear time at long sequences; they are self-attention
backends (cross attention stays exact) and each takes its settings through `options`: `sparse` (window +
global tokens + random blocks, on the chunked kernel's tiles; `models/kernels/sparse.py`), `linformer`
(keys and values projected along the sequence; bidirectional only; `models/kernels/linformer.py`) and
`lsh` (Reformer's shared-QK hashing attention; `models/kernels/lsh.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from models.config import ATTENTION_BACKENDS, ModelConfig
from models.kernels.bias import PositionScores, RelativeBias
from models.kernels.chunked import chunked_attention
from models.kernels.eager import eager_attention
from models.kernels.linformer import LinformerProjections, linformer_attention
from models.kernels.lsh import LSHSettings, lsh_attention
from models.kernels.sdpa import sdpa_attention
from models.kernels.sparse import SparsePattern, sparse_attention

Options = SparsePattern | LinformerProjections | LSHSettings


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


def _sparse(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float, options, block_size, **kwargs) -> Tensor:
    if dropout_p > 0.0:
        raise ValueError("attention backend 'sparse' has no attention dropout; set attention_dropout=0")
    with torch.autocast(q.device.type, enabled=False):  # the chunked kernel's own precision, as `_chunked`
        return sparse_attention(q, k, v, pattern=options, q_block=block_size, k_block=block_size, **kwargs)


def _linformer(q: Tensor, k: Tensor, v: Tensor, *, options, block_size, **kwargs) -> Tensor:
    return linformer_attention(q, k, v, projections=options, **kwargs)


def _lsh(q: Tensor, k: Tensor, v: Tensor, *, options, block_size, **kwargs) -> Tensor:
    with torch.autocast(q.device.type, enabled=False):  # fp32 accumulation, as the chunked kernel
        return lsh_attention(q, k, v, settings=options, **kwargs)


# The approximate backends: self attention only, each with its own `options` (see the module docstring).
_APPROXIMATE: dict[str, Callable[..., Tensor]] = {"sparse": _sparse, "linformer": _linformer, "lsh": _lsh}


def is_approximate(backend: str) -> bool:
    return backend in _APPROXIMATE


def resolve_backend(
    backend: str, *, bias: Tensor | RelativeBias | PositionScores | None, window: int | None, dropout_p: float
) -> str:
    """The concrete backend `auto` stands for in this call."""
    if backend != "auto":
        if backend not in _KERNELS and backend not in _APPROXIMATE:
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
    bias: Tensor | RelativeBias | PositionScores | None = None,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    block_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """Scaled dot-product attention, q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D).

    key_padding_mask: (B, Lk) bool, True = attend; a query whose keys are all masked outputs 0.
    causal: key j is visible to query i iff j <= i (top-left aligned). window: also |i - j| < window.
    bias: additive, a dense tensor broadcastable to (B, H, Lq, Lk), a `RelativeBias` (T5) or `PositionScores`
    (Transformer-XL's position term); the chunked kernel builds the last two per tile, in O(n) memory.
    scale: None -> 1/sqrt(D). `auto` without an eligible fused kernel uses `chunked`, or `sdpa` when
    dropout is on (the chunked kernel has none). block_size: the chunked kernel's query and key tile
    (None: its default; also sparse's); the other backends have no tiles. options: an approximate
    backend's settings (`SparsePattern`, `LinformerProjections`, `LSHSettings`); exact ones ignore it.
    """
    name = resolve_backend(backend, bias=bias, window=window, dropout_p=dropout_p)
    if name in _APPROXIMATE:
        return _APPROXIMATE[name](
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, bias=bias, window=window,
            scale=scale, dropout_p=dropout_p, options=options, block_size=block_size,
        )  # fmt: skip
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
    `options`: the sparse backend's `SparsePattern` (global tokens, random blocks).
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
        options: SparsePattern | None = None,
        **kwargs,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, bias=bias, **kwargs)
        self.causal, self.window, self.options = causal, window, options
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
            q, k, v, causal=self.causal, window=self.window, key_padding_mask=key_padding_mask, bias=bias,
            options=self.options,
        )  # fmt: skip


class CrossAttention(MultiHeadAttention):
    """Queries from the decoder, keys and values (one fused projection) from the encoder output.

    The approximate backends are for self attention: with one of them selected, cross attention (short
    targets reading the encoder output) stays exact, on `auto`.
    """

    def __init__(
        self, d_model: int, n_heads: int, head_dim: int, *, bias: bool = True, backend: str = "auto", **kwargs
    ) -> None:
        backend = "auto" if is_approximate(backend) else backend
        super().__init__(d_model, n_heads, head_dim, bias=bias, backend=backend, **kwargs)
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_heads * head_dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        (q,) = self._split(self.q(x), 1)
        k, v = self._split(self.kv(context), 2)
        return self._attend(q, k, v, key_padding_mask=key_padding_mask)


class LinformerSelfAttention(SelfAttention):
    """Bidirectional self attention over keys and values projected along the sequence (Linformer).

    The projections (k, max_len) are this layer's own, shared by its heads; with `share_kv` one matrix
    projects both keys and values. The rest (qkv, out) is `SelfAttention`'s, under the same names.
    """

    def __init__(
        self, d_model: int, n_heads: int, head_dim: int, *, max_len: int, k: int, share_kv: bool, **kwargs
    ) -> None:
        if kwargs.get("causal"):
            raise ValueError(
                "attention backend 'linformer' is not causal; use sparse or lsh for causal attention"
            )
        super().__init__(d_model, n_heads, head_dim, **kwargs)
        self.proj_k = nn.Linear(max_len, k, bias=False)
        self.proj_v = None if share_kv else nn.Linear(max_len, k, bias=False)

    def forward(
        self, x: Tensor, *, key_padding_mask: Tensor | None = None, bias: Tensor | RelativeBias | None = None
    ) -> Tensor:
        q, k, v = self._split(self.qkv(x), 3)
        values = self.proj_k if self.proj_v is None else self.proj_v
        projections = LinformerProjections(keys=self.proj_k.weight, values=values.weight)
        return self._attend(
            q, k, v, window=self.window, key_padding_mask=key_padding_mask, bias=bias, options=projections
        )


class LSHSelfAttention(MultiHeadAttention):
    """Reformer's self attention: one projection gives the shared query-key vectors, one the values.

    `qk_v` is that pair fused into one matmul (shared query-key rows first), so there is no key projection
    to name `qkv`; `out` is as in every attention.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        settings: LSHSettings,
        causal: bool = False,
        bias: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, bias=bias, **kwargs)
        self.causal, self.settings = causal, settings
        self.qk_v = nn.Linear(d_model, 2 * n_heads * head_dim, bias=bias)

    def forward(
        self, x: Tensor, *, key_padding_mask: Tensor | None = None, bias: Tensor | RelativeBias | None = None
    ) -> Tensor:
        qk, v = self._split(self.qk_v(x), 2)
        return self._attend(
            qk, qk, v, causal=self.causal, key_padding_mask=key_padding_mask, bias=bias, options=self.settings
        )


@dataclass(frozen=True, kw_only=True)
class ApproximateAttention:
    """The approximate backends' model-config fields, as `self_attention` needs them."""

    global_tokens: int = 0
    random_blocks: int = 0
    seed: int = 0
    linformer_k: int = 256
    linformer_share_kv: bool = False
    max_len: int | None = None
    lsh_n_hashes: int = 4
    lsh_bucket_size: int = 64

    @classmethod
    def from_model(cls, config: ModelConfig) -> ApproximateAttention:
        return cls(
            global_tokens=config.attention_global,
            random_blocks=config.attention_random,
            seed=config.attention_seed,
            linformer_k=config.linformer_k,
            linformer_share_kv=config.linformer_share_kv,
            max_len=config.max_seq_len,
            lsh_n_hashes=config.lsh_n_hashes,
            lsh_bucket_size=config.lsh_bucket_size,
        )


def self_attention(
    d_model: int,
    n_heads: int,
    head_dim: int,
    *,
    causal: bool = False,
    window: int | None = None,
    backend: str = "auto",
    approx: ApproximateAttention | None = None,
    **kwargs,
) -> MultiHeadAttention:
    """The self-attention module for `backend`: `SelfAttention`, or the class an approximate one needs."""
    a = approx or ApproximateAttention()
    common = dict(causal=causal, backend=backend, **kwargs)
    if backend == "linformer":
        if a.max_len is None:
            raise ValueError("attention backend 'linformer' needs a maximum sequence length (max_seq_len)")
        return LinformerSelfAttention(
            d_model, n_heads, head_dim, max_len=a.max_len, k=a.linformer_k, share_kv=a.linformer_share_kv,
            window=window, **common,
        )  # fmt: skip
    if backend == "lsh":
        settings = LSHSettings(n_hashes=a.lsh_n_hashes, bucket_size=a.lsh_bucket_size, seed=a.seed)
        return LSHSelfAttention(d_model, n_heads, head_dim, settings=settings, **common)
    options = None
    if backend == "sparse":
        options = SparsePattern(global_tokens=a.global_tokens, random_blocks=a.random_blocks, seed=a.seed)
    return SelfAttention(d_model, n_heads, head_dim, window=window, options=options, **common)

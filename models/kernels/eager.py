"""The reference backend: materialise scores, mask, softmax in fp32, weight the values.

Slow and O(L^2) in memory; it exists so that every other backend has something simple to be tested
against, and it matches transformers' eager attention term by term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.kernels.bias import RelativeBias
from models.kernels.mask import dense_bias, visibility


def eager_attention(
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
) -> Tensor:
    """(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D); see `models.attention.attend` for the semantics."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1))
    if scale != 1.0:
        scores = scores * scale
    dense = dense_bias(bias, q_len, k_len)
    if dense is not None:
        scores = scores + dense.to(scores.dtype)
    visible = visibility(
        q_len, k_len, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device
    )
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    if visible is not None:
        # A query with no visible key would otherwise spread its weight uniformly over masked keys.
        probs = probs * visible.any(dim=-1, keepdim=True)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)

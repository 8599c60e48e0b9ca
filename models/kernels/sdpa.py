"""The PyTorch backend: `F.scaled_dot_product_attention`, which picks a fused kernel when it can.

Without padding, bias or window the call passes no mask at all, so the fused (flash / memory-efficient)
kernels stay eligible; any other case builds one mask tensor and lets SDPA take its masked path.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from models.kernels.bias import RelativeBias
from models.kernels.mask import dense_bias, visibility


def sdpa_attention(
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
    if key_padding_mask is None and bias is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)

    q_len, k_len = q.shape[-2], k.shape[-2]
    visible = visibility(
        q_len, k_len, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device
    )
    has_key = None
    if key_padding_mask is not None:
        # Only padding can leave a query without keys; give such rows every key (no NaN in forward or
        # backward) and zero their output afterwards.
        has_key = visible.any(dim=-1, keepdim=True)
        visible = visible | ~has_key
    mask = visible
    dense = dense_bias(bias, q_len, k_len)
    if dense is not None:
        dense = dense.to(q.dtype)
        mask = dense if visible is None else dense.masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = out * has_key
    return out

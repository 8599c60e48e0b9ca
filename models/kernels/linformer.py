"""Linformer: keys and values projected along the sequence to k rows, then exact attention over those.

K' = E K and V' = F V with learned E, F of shape (k, max_len), one pair per layer shared by its heads
(or E = F with `share_kv`), so every query attends to k mixtures of positions: O(n * k) time and memory.
A sequence shorter than max_len uses the first L columns. Padded keys and values are zeroed before the
projection, and a projected key that draws on no real position (all its weights on padding) is masked,
so with k = L and E = F = I this is exact attention, padding included. It is bidirectional by
construction (every projected key mixes all positions): a causal or cross-attention call is refused.

The attention over the k projected keys runs on the chunked kernel (linear memory in L) when there is no
dropout, else on SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.kernels.chunked import chunked_attention
from models.kernels.sdpa import sdpa_attention


@dataclass(frozen=True)
class LinformerProjections:
    """The layer's sequence projections, each (k, max_len): keys by `keys`, values by `values`."""

    keys: Tensor
    values: Tensor


def _check(q: Tensor, k: Tensor, causal: bool, bias, window, proj: LinformerProjections | None) -> None:
    if causal:
        raise ValueError(
            "attention backend 'linformer' is not causal (each projected key mixes all positions); "
            "use sparse or lsh for causal attention"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"attention backend 'linformer' is for self attention; got {q.shape[2]} queries, {k.shape[2]} keys"
        )
    if bias is not None or window is not None:
        raise ValueError(
            "attention backend 'linformer' takes no bias and no window (keys lose their positions)"
        )
    if proj is None:
        raise ValueError(
            "attention backend 'linformer' needs the layer's projections (LinformerSelfAttention)"
        )
    if k.shape[2] > proj.keys.shape[1]:
        raise ValueError(
            f"linformer: sequence length {k.shape[2]} exceeds the projections' max length {proj.keys.shape[1]}"
        )


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    bias: object = None,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    projections: LinformerProjections | None = None,
) -> Tensor:
    """q, k, v (B, H, L, D) -> (B, H, L, Dv), attending to E k and F v; see the module docstring."""
    _check(q, k, causal, bias, window, projections)
    length = k.shape[2]
    e, f = projections.keys[:, :length], projections.values[:, :length]
    mask = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None].to(k.dtype)  # (B, 1, L, 1)
        k, v = k * keep, v * keep
        # Projected key r is real iff some real position has a nonzero weight in row r of E.
        mask = (key_padding_mask.to(e.dtype) @ e.abs().t()) > 0  # (B, k)
    kp, vp = torch.matmul(e, k).to(q.dtype), torch.matmul(f, v).to(q.dtype)  # (B, H, k, D)
    if dropout_p > 0.0:
        return sdpa_attention(q, kp, vp, key_padding_mask=mask, scale=scale, dropout_p=dropout_p)
    with torch.autocast(q.device.type, enabled=False):
        return chunked_attention(q, kp, vp, key_padding_mask=mask, scale=scale)

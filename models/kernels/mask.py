"""Which keys each query may see, as one boolean tensor, for the backends that materialise scores.

The chunked backend evaluates the same rules block by block instead; keeping the rules in one place
keeps the backends in agreement.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.kernels.bias import PositionScores, RelativeBias


def visibility(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Boolean (B or 1, 1, Lq, Lk), True = attend; None when every key is visible to every query."""
    visible = None
    if causal or window is not None:
        offset = torch.arange(q_len, device=device)[:, None] - torch.arange(k_len, device=device)[None, :]
        if causal:
            visible = offset >= 0
        if window is not None:
            near = offset.abs() < window
            visible = near if visible is None else visible & near
        visible = visible[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        visible = keys if visible is None else visible & keys
    return visible


def dense_bias(bias: Tensor | RelativeBias | PositionScores | None, q_len: int, k_len: int) -> Tensor | None:
    """A dense additive bias broadcastable to (B, H, Lq, Lk), whatever form the caller passed."""
    if isinstance(bias, RelativeBias | PositionScores):
        return bias.dense(q_len, k_len)
    return bias

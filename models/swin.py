"""Swin Transformer (Liu et al. 2021) with a SimMIM head.

Patch embedding + LayerNorm -> stages of `PreNormBlock`s whose self attention is `WindowAttention`
(windows of window x window patches, every other block shifted by half a window, a learned bias per
relative offset) -> patch merging between stages (2x2 patches -> one, width x2) -> LayerNorm -> SimMIM head
at the last stage's stride. Masked patches enter as a learned [MASK] embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.attention import SelfAttention, attend
from models.base import LanguageModel, SampleShape
from models.blocks import BlockConfig, PreNormBlock, Stack
from models.config import SwinConfig
from models.outputs import ModelOutput
from models.vision import (
    DropPath,
    PatchEmbedding,
    SimMIMHead,
    check_image_size,
    init_dense_layers,
    mask_token_mix,
    simmim_loss,
)

SHIFT_MASK = (
    -100.0
)  # added to scores between patches from different regions of a shifted window (Swin's value)
NORM_EPS = 1e-5  # the patch-embedding and patch-merging LayerNorms (fixed in Swin, not the config's eps)


def relative_position_index(window: int) -> Tensor:
    """(N, N) index into the ((2 w - 1)**2, heads) bias table for the N = w**2 patches of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offset = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, N, N), each in [0, 2 w - 2]
    return offset[0] * (2 * window - 1) + offset[1]


def shift_mask(side: int, window: int, shift: int) -> Tensor:
    """(num_windows, N, N): 0 where two patches of a shifted window were neighbours before the cyclic
    shift, SHIFT_MASK where the shift brought them together from opposite edges."""
    index = torch.arange(side)
    region = (index >= side - window).long() + (index >= side - shift).long()  # 0, 1, 2 along each axis
    labels = (region[:, None] * 3 + region[None, :]).float()[None, :, :, None]  # (1, side, side, 1)
    labels = partition(labels, window).squeeze(-1)  # (num_windows, N)
    differs = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, SHIFT_MASK)


def partition(x: Tensor, window: int) -> Tensor:
    """(B, S, S, C) -> (B * num_windows, window**2, C), windows in row-major order."""
    b, side, _, c = x.shape
    n = side // window
    x = x.view(b, n, window, n, window, c).transpose(2, 3)
    return x.reshape(b * n * n, window * window, c)


def merge_windows(windows: Tensor, window: int, side: int) -> Tensor:
    """The inverse of `partition`: (B * num_windows, window**2, C) -> (B, S, S, C)."""
    n = side // window
    c = windows.shape[-1]
    x = windows.view(-1, n, n, window, window, c).transpose(2, 3)
    return x.reshape(-1, side, side, c)


class WindowAttention(SelfAttention):
    """Self attention inside (shifted) windows of a side x side patch grid, with a learned bias per head and
    relative offset.

    The windows are folded into the heads dimension, (B, windows * heads, N, D), so one `attend` call
    covers all of them, with one (1, windows * heads, N, N) bias (relative positions + the shift mask)
    broadcast over the batch; every backend runs it, and `auto` picks the chunked kernel for the learned
    bias as it does for T5's. A grid that is not a multiple of the window is zero-padded (the padding is
    attended to, as in Swin).
    """

    def __init__(self, d_model: int, n_heads: int, *, side: int, window: int, shift: int, **kwargs) -> None:
        super().__init__(d_model, n_heads, d_model // n_heads, **kwargs)
        self.side, self.window_size, self.shift = side, window, shift
        self.relative_bias = nn.Parameter(torch.empty((2 * window - 1) ** 2, n_heads))

    def forward(
        self, x: Tensor, *, key_padding_mask: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        if key_padding_mask is not None or bias is not None:
            raise ValueError("WindowAttention builds its own bias and takes no padding mask")
        b, _, c = x.shape
        w = self.window_size
        padded = -(-self.side // w) * w
        x = F.pad(x.view(b, self.side, self.side, c), (0, 0, 0, padded - self.side, 0, padded - self.side))
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        q, k, v = self._split(self.qkv(partition(x, w)), 3)  # (B * windows, H, N, D) each
        windows = (padded // w) ** 2

        def fold(t: Tensor) -> Tensor:
            return t.reshape(b, windows * self.n_heads, w * w, self.head_dim)

        y = attend(
            fold(q),
            fold(k),
            fold(v),
            bias=self._bias(padded, windows).to(q.dtype),
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
            block_size=self.block_size,
        )  # (B, windows * H, N, D)
        y = y.view(b * windows, self.n_heads, w * w, self.head_dim).transpose(1, 2)
        y = merge_windows(self.out(y.reshape(b * windows, w * w, c)), w, padded)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        return y[:, : self.side, : self.side].reshape(b, self.side * self.side, c)

    def _bias(self, padded: int, windows: int) -> Tensor:
        """(1, windows * heads, N, N): the relative-position bias, plus the shift mask when shifted."""
        n = self.window_size**2
        index = relative_position_index(self.window_size).to(self.relative_bias.device)
        table = self.relative_bias[index.flatten()].view(n, n, self.n_heads).permute(2, 0, 1)  # (H, N, N)
        if self.shift:
            mask = shift_mask(padded, self.window_size, self.shift).to(table.device, table.dtype)
            bias = table[None] + mask[:, None]  # (windows, H, N, N)
        else:
            bias = table[None].expand(windows, -1, -1, -1)
        return bias.reshape(1, windows * self.n_heads, n, n)


class SwinBlock(PreNormBlock):
    """A pre-norm block with window attention and stochastic depth on both residual branches."""

    def __init__(self, cfg: BlockConfig, attention: WindowAttention, drop_path: float) -> None:
        super().__init__(cfg, attention)
        if drop_path > 0.0:
            self.drop = nn.Sequential(self.drop, DropPath(drop_path))


class PatchMerging(nn.Module):
    """Each 2x2 group of patches concatenated (4C), normalised, projected to 2C: half the resolution."""

    def __init__(self, d_model: int, side: int) -> None:
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * d_model, eps=NORM_EPS)
        self.reduction = nn.Linear(4 * d_model, 2 * d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, self.side, self.side, c)
        if self.side % 2:
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
        # Order (row, col): (0, 0), (1, 0), (0, 1), (1, 1), as in Swin.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """`depth` blocks at one resolution (windows alternately unshifted and shifted), then patch merging."""

    def __init__(
        self, config: SwinConfig, stage: int, side: int, drop_paths: list[float], *, merge: bool
    ) -> None:
        super().__init__()
        d, heads = config.d_model * 2**stage, config.stage_heads[stage]
        cfg = BlockConfig.from_model(
            config, d_model=d, n_heads=heads, head_dim=d // heads, d_ff=int(config.mlp_ratio * d)
        )
        # A grid no larger than a window is one window: nothing to shift (Swin does the same).
        shift = 0 if side <= config.window_size else config.window_size // 2
        attention = dict(
            side=side,
            window=config.window_size,
            scale=None,
            dropout=config.attention_dropout,
            backend=config.attention,
            block_size=config.attention_block,
        )
        self.blocks = Stack(
            [
                SwinBlock(cfg, WindowAttention(d, heads, shift=shift if i % 2 else 0, **attention), rate)
                for i, rate in enumerate(drop_paths)
            ],
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.merge = PatchMerging(d, side) if merge else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return x if self.merge is None else self.merge(x)


class Swin(LanguageModel):
    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch = PatchEmbedding(config.num_channels, d, config.patch_size)
        self.patch_norm = nn.LayerNorm(d, eps=NORM_EPS)
        self.mask_token = nn.Parameter(torch.empty(1, 1, d))
        self.positions = (
            nn.Parameter(torch.empty(1, config.grid_size**2, d)) if config.absolute_positions else None
        )
        self.drop = nn.Dropout(config.dropout)
        total = sum(config.depths)
        rates = [config.drop_path * i / max(total - 1, 1) for i in range(total)]
        stages, side, first = [], config.grid_size, 0
        for s, depth in enumerate(config.depths):
            last = s == len(config.depths) - 1
            stages.append(SwinStage(config, s, side, rates[first : first + depth], merge=not last))
            side, first = (side + 1) // 2, first + depth
        self.stages = nn.ModuleList(stages)
        width = d * 2 ** (len(config.depths) - 1)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.head = SimMIMHead(width, config.stride, config.num_channels)

    def encode(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """The last stage's normalised tokens, (B, (grid / 2**(stages - 1))**2, D_last)."""
        check_image_size(pixel_values, self.config.image_size)
        x = mask_token_mix(self.patch_norm(self.patch(pixel_values)), self.mask_token, bool_masked_pos)
        if self.positions is not None:
            x = x + self.positions
        x = self.drop(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> ModelOutput:
        """logits: the reconstructed image (B, C, H, W); loss (L1 on masked patches) when a mask is given.
        bool_masked_pos: (B, grid_size**2) at the patch level, True = masked."""
        reconstruction = self.head(self.encode(pixel_values, bool_masked_pos))
        loss = None
        if bool_masked_pos is not None:
            loss = simmim_loss(reconstruction, pixel_values, bool_masked_pos, self.config.patch_size)
        return ModelOutput(logits=reconstruction, loss=loss)

    def features(self, pixel_values: Tensor) -> Tensor:
        """The encoder over the unmasked image: the last stage's tokens."""
        return self.encode(pixel_values)

    def transformer_blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in stage.blocks]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The [MASK] token and absolute positions: added, not multiplied."""
        return [p for p in (self.mask_token, self.positions) if p is not None]

    def flops_per_token(self, seq_len: SampleShape | int | None = None) -> float:
        """Training FLOPs per image patch: each stage's parameters over its tokens, window attention
        12 d N per token (N = window**2 keys), merging and head at their resolutions."""
        cfg = self.config
        tokens, total = cfg.grid_size**2, 0.0
        stem = sum(p.numel() for m in (self.patch, self.patch_norm) for p in m.parameters())
        total += 6.0 * stem * tokens
        for s, stage in enumerate(self.stages):
            width = cfg.d_model * 2**s
            params = sum(p.numel() for p in stage.blocks.parameters())
            total += tokens * (6.0 * params + 12.0 * len(stage.blocks) * width * cfg.window_size**2)
            if stage.merge is not None:
                total += 6.0 * sum(p.numel() for p in stage.merge.parameters()) * (tokens // 4)
            tokens = tokens // 4 if stage.merge is not None else tokens
        total += 6.0 * tokens * sum(p.numel() for m in (self.norm, self.head) for p in m.parameters())
        return total / cfg.grid_size**2

    def init_weights(self, seed: int | None = None) -> None:
        """Swin's scheme: truncated N(0, 0.02) for linear layers, the bias tables, [MASK] and positions."""
        if seed is not None:  # drawn from the global RNG (these families are not built sharded yet)
            torch.manual_seed(seed)
        std = self.config.init_std
        init_dense_layers(self, std=std)
        extra = [*self.embedding_parameters()]
        extra += [block.attn.relative_bias for block in self.transformer_blocks()]
        for p in extra:
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

"""What the image families share: patch embedding, 2-D sin-cos positions, (un)patchify, MAE's random
masking, the SimMIM head, both pixel losses, stochastic depth, and the init helpers.

Pixel tensors are (B, C, H, W); patch sequences are row-major over the patch grid, as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class PatchEmbedding(nn.Module):
    """Non-overlapping patches to vectors: one strided convolution, (B, C, H, W) -> (B, N, D)."""

    def __init__(self, num_channels: int, d_model: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(num_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; the model takes {self.proj.in_channels}"
            )
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def check_image_size(pixel_values: Tensor, image_size: int) -> None:
    """Positions and masks are laid out for one image size; another one is an error naming both."""
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"pixel_values must be (B, C, {image_size}, {image_size}), got {tuple(pixel_values.shape)}"
        )


def sincos_positions_2d(grid: int, dim: int, *, cls_token: bool) -> Tensor:
    """MAE's fixed positions, (1, [1 +] grid**2, dim): patch (row r, column c) gets
    [sin(c w), cos(c w), sin(r w), cos(r w)] with w = 10000**(-k / (dim / 4)); the [CLS] row is zero.
    Computed in float64 and rounded once, as transformers does."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    by_col, by_row = cols.flatten().outer(omega), rows.flatten().outer(omega)  # (N, dim / 4)
    table = torch.cat([by_col.sin(), by_col.cos(), by_row.sin(), by_row.cos()], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table])
    return table.float().unsqueeze(0)


def patchify(pixel_values: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch_size**2 * C), each patch's pixels row by row, channels last."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, num_channels: int) -> Tensor:
    """The inverse of `patchify` for square images."""
    b, n, _ = patches.shape
    side, p = round(n**0.5), patch_size
    x = patches.reshape(b, side, side, p, p, num_channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, num_channels, side * p, side * p)


def random_masking(noise: Tensor, num_kept: int) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample masking: the `num_kept` patches with the lowest noise are kept.

    Returns ids_keep (B, num_kept) in increasing-noise order, the mask (B, N; 1 = masked, as a float) and
    ids_restore (B, N), the permutation that puts [kept, masked] back into patch order.
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :num_kept] = 0
    return ids_shuffle[:, :num_kept], torch.gather(mask, 1, ids_restore), ids_restore


def mae_loss(
    predicted: Tensor, pixel_values: Tensor, mask: Tensor, patch_size: int, *, norm_pix: bool
) -> Tensor:
    """Mean squared error per patch, averaged over the masked patches; with `norm_pix` each target patch is
    first normalised by its own mean and (unbiased) variance, as in MAE."""
    target = patchify(pixel_values, patch_size).float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((predicted.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mask_token_mix(tokens: Tensor, mask_token: Tensor, bool_masked_pos: Tensor | None) -> Tensor:
    """SimMIM's input: masked patches' embeddings replaced by the learned [MASK] embedding."""
    if bool_masked_pos is None:
        return tokens
    if bool_masked_pos.shape != tokens.shape[:2]:
        raise ValueError(
            f"bool_masked_pos must be (B, num_patches) = {tuple(tokens.shape[:2])}, got {tuple(bool_masked_pos.shape)}"
        )
    mask = bool_masked_pos.unsqueeze(-1).type_as(tokens)
    return tokens * (1.0 - mask) + mask_token.to(tokens.dtype) * mask


class SimMIMHead(nn.Module):
    """A 1x1 convolution to stride**2 * C channels, then a pixel shuffle: each token paints its stride x stride
    pixels. Takes (B, side**2, D) tokens, returns (B, C, side * stride, side * stride)."""

    def __init__(self, d_model: int, stride: int, num_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(d_model, stride**2 * num_channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        side = round(n**0.5)
        return self.shuffle(self.proj(tokens.transpose(1, 2).reshape(b, d, side, side)))


def simmim_loss(
    reconstruction: Tensor, pixel_values: Tensor, bool_masked_pos: Tensor, patch_size: int
) -> Tensor:
    """L1 over the pixels of masked patches, per channel (what transformers' SimMIM computes)."""
    b, c, h, _ = pixel_values.shape
    side = h // patch_size
    mask = bool_masked_pos.reshape(b, side, side).repeat_interleave(patch_size, 1)
    mask = mask.repeat_interleave(patch_size, 2).unsqueeze(1).float()
    l1 = F.l1_loss(pixel_values.float(), reconstruction.float(), reduction="none")
    return (l1 * mask).sum() / (mask.sum() + 1e-5) / c


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random `rate` share of the samples and
    scale the rest by 1 / (1 - rate)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.rate)
        return x * keep / (1.0 - self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def init_dense_layers(model: nn.Module, *, std: float, xavier: bool = False) -> None:
    """Linear layers N(0, std) truncated at 2 std (BEiT/SimMIM/Swin) or Xavier-uniform (MAE), zero biases;
    convolutions PyTorch's default; LayerNorms unit scale, zero shift."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if xavier:
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()

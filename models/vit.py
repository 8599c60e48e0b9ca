"""ViT with an MAE or a SimMIM head: patches + [CLS] + absolute positions -> pre-norm blocks -> LayerNorm.

The encoder's blocks are GPT-2's `PreNormBlock` without the causal mask. MAE (He et al. 2021): the encoder
sees only the kept patches; a light decoder of the same blocks fills the masked places with a learned
token and predicts their pixels. SimMIM (Xie et al. 2021): every patch goes in, the masked ones as a
learned [MASK] embedding, and a 1x1 convolution reconstructs the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from models.base import LanguageModel, SampleShape
from models.blocks import BlockConfig, PreNormBlock, Stack
from models.config import ViTMAEConfig, ViTSimMIMConfig, _ViTConfig
from models.outputs import ModelOutput
from models.vision import (
    PatchEmbedding,
    SimMIMHead,
    check_image_size,
    init_dense_layers,
    mae_loss,
    mask_token_mix,
    random_masking,
    simmim_loss,
    sincos_positions_2d,
)


@dataclass
class MAEOutput(ModelOutput):
    """logits: predicted pixels (B, N, patch_size**2 * C) for every patch; mask: (B, N), 1 = masked."""

    mask: Tensor | None = None


class ViTEncoder(nn.Module):
    """Patch embedding, [CLS], positions (a learned table, or MAE's fixed one kept as a buffer), blocks, norm."""

    def __init__(self, config: _ViTConfig, *, fixed_positions: bool, mask_token: bool) -> None:
        super().__init__()
        d, tokens = config.d_model, config.grid_size**2 + 1
        self.image_size = config.image_size
        self.patch = PatchEmbedding(config.num_channels, d, config.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        if fixed_positions:
            self.register_buffer("positions", torch.empty(1, tokens, d))
        else:
            self.positions = nn.Parameter(torch.empty(1, tokens, d))
        self.mask_token = nn.Parameter(torch.empty(1, 1, d)) if mask_token else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = Stack(
            [PreNormBlock(BlockConfig.from_model(config)) for _ in range(config.n_layers)],
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: Tensor, *, bool_masked_pos: Tensor | None = None, ids_keep: Tensor | None = None
    ) -> Tensor:
        """(B, 1 + N, D), [CLS] first; with `ids_keep` (B, K) only those patches go in: (B, 1 + K, D)."""
        check_image_size(pixel_values, self.image_size)
        x = self.patch(pixel_values)  # (B, N, D)
        if bool_masked_pos is not None:
            x = mask_token_mix(x, self.mask_token, bool_masked_pos)
        x = x + self.positions[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.positions[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(self.drop(torch.cat([cls, x], dim=1))))

    def additive_parameters(self) -> list[nn.Parameter]:
        """Tokens and tables that are added, not multiplied (excluded from FLOPs like embeddings)."""
        extra = [self.cls_token, self.mask_token]
        if isinstance(self.positions, nn.Parameter):
            extra.append(self.positions)
        return [p for p in extra if p is not None]


class MAEDecoder(nn.Module):
    """Project the kept tokens, put a mask token in every masked place, unshuffle, add fixed positions,
    run the blocks, predict each patch's pixels. The [CLS] token goes through and is dropped at the end."""

    def __init__(self, config: ViTMAEConfig) -> None:
        super().__init__()
        d = config.decoder_d_model
        block = BlockConfig.from_model(
            config,
            d_model=d,
            n_heads=config.decoder_n_heads,
            head_dim=d // config.decoder_n_heads,
            d_ff=config.decoder_d_ff,
        )
        self.embed = nn.Linear(config.d_model, d)
        self.mask_token = nn.Parameter(torch.empty(1, 1, d))
        self.register_buffer("positions", torch.empty(1, config.grid_size**2 + 1, d))
        self.blocks = Stack(
            [PreNormBlock(block) for _ in range(config.decoder_n_layers)],
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.pred = nn.Linear(d, config.patch_size**2 * config.num_channels)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (B, 1 + K, D_enc), ids_restore (B, N) -> predicted pixels (B, N, patch_size**2 * C)."""
        x = self.embed(latent)  # (B, 1 + K, D)
        b, kept, d = x.shape
        filler = self.mask_token.to(x.dtype).expand(b, ids_restore.shape[1] + 1 - kept, d)
        patches = torch.cat([x[:, 1:], filler], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.positions
        return self.pred(self.norm(self.blocks(x))[:, 1:])


class ViTMAE(LanguageModel):
    def __init__(self, config: ViTMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config, fixed_positions=True, mask_token=False)
        self.decoder = MAEDecoder(config)

    def forward(self, pixel_values: Tensor, noise: Tensor | None = None) -> MAEOutput:
        """noise: (B, N) per-patch scores, the lowest `num_kept` are kept. The data layer passes it so that a
        resumed run masks identically; None draws it from torch's generator (as transformers does)."""
        cfg = self.config
        shape = (pixel_values.shape[0], cfg.grid_size**2)
        if noise is None:
            noise = torch.rand(shape, device=pixel_values.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be (B, num_patches) = {shape}, got {tuple(noise.shape)}")
        ids_keep, mask, ids_restore = random_masking(noise, cfg.num_kept)
        predicted = self.decoder(self.encoder(pixel_values, ids_keep=ids_keep), ids_restore)
        loss = mae_loss(predicted, pixel_values, mask, cfg.patch_size, norm_pix=cfg.norm_pix_loss)
        return MAEOutput(logits=predicted, loss=loss, mask=mask)

    def features(self, pixel_values: Tensor) -> Tensor:
        """The encoder over every patch (no masking), (B, 1 + N, D): what a probe or a fine-tune sees."""
        return self.encoder(pixel_values)

    def transformer_blocks(self) -> list[nn.Module]:
        return [*self.encoder.blocks, *self.decoder.blocks]

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.additive_parameters(), self.decoder.mask_token]

    def flops_per_token(self, seq_len: SampleShape | int | None = None) -> float:
        """Training FLOPs per image patch: the encoder runs over the kept patches + [CLS], the decoder over
        all patches + [CLS] (6 N per token and 12 L d T for attention, PaLM's count per stack)."""
        cfg = self.config
        n = cfg.grid_size**2
        enc_tokens, dec_tokens = cfg.num_kept + 1, n + 1
        decoder = sum(p.numel() for p in self.decoder.parameters()) - self.decoder.mask_token.numel()
        encoder = self.num_parameters(exclude_embeddings=True) - decoder
        per_image = enc_tokens * (6.0 * encoder + 12.0 * cfg.n_layers * cfg.d_model * enc_tokens)
        per_image += dec_tokens * (
            6.0 * decoder + 12.0 * cfg.decoder_n_layers * cfg.decoder_d_model * dec_tokens
        )
        return per_image / n

    def init_weights(self, seed: int | None = None) -> None:
        """MAE's scheme: Xavier-uniform linear layers and patch projection (as a matrix), N(0, 0.02) tokens,
        the fixed 2-D sin-cos positions."""
        if seed is not None:  # drawn from the global RNG (these families are not built sharded yet)
            torch.manual_seed(seed)
        cfg = self.config
        init_dense_layers(self, std=cfg.init_std, xavier=True)
        weight = self.encoder.patch.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for token in (self.encoder.cls_token, self.decoder.mask_token):
            nn.init.normal_(token, std=cfg.init_std)
        with torch.no_grad():
            self.encoder.positions.copy_(sincos_positions_2d(cfg.grid_size, cfg.d_model, cls_token=True))
            self.decoder.positions.copy_(
                sincos_positions_2d(cfg.grid_size, cfg.decoder_d_model, cls_token=True)
            )


class ViTSimMIM(LanguageModel):
    def __init__(self, config: ViTSimMIMConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config, fixed_positions=False, mask_token=True)
        self.head = SimMIMHead(config.d_model, config.patch_size, config.num_channels)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> ModelOutput:
        """logits: the reconstructed image (B, C, H, W); loss (L1 on masked patches) when a mask is given."""
        x = self.encoder(pixel_values, bool_masked_pos=bool_masked_pos)
        reconstruction = self.head(x[:, 1:])
        loss = None
        if bool_masked_pos is not None:
            loss = simmim_loss(reconstruction, pixel_values, bool_masked_pos, self.config.patch_size)
        return ModelOutput(logits=reconstruction, loss=loss)

    def features(self, pixel_values: Tensor) -> Tensor:
        """The encoder over the unmasked image, (B, 1 + N, D)."""
        return self.encoder(pixel_values)

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return self.encoder.additive_parameters()

    def flops_per_token(self, seq_len: SampleShape | int | None = None) -> float:
        """Training FLOPs per image patch: every patch + [CLS] through the encoder, the head per patch."""
        cfg = self.config
        n = cfg.grid_size**2
        head = sum(p.numel() for p in self.head.parameters())
        encoder = self.num_parameters(exclude_embeddings=True) - head
        per_image = (n + 1) * (6.0 * encoder + 12.0 * cfg.n_layers * cfg.d_model * (n + 1)) + n * 6.0 * head
        return per_image / n

    def init_weights(self, seed: int | None = None) -> None:
        """BEiT/SimMIM's scheme: truncated N(0, 0.02) for linear layers, positions and tokens."""
        if seed is not None:  # drawn from the global RNG (these families are not built sharded yet)
            torch.manual_seed(seed)
        std = self.config.init_std
        init_dense_layers(self, std=std)
        for p in self.encoder.additive_parameters():
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

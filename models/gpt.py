"""GPT (GPT-2 layout): embed -> pre-norm causal blocks -> LayerNorm -> head tied to the token embedding."""

from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.base import (
    InitFn,
    LanguageModel,
    SampleShape,
    attention_flops,
    cross_entropy,
    default_rules,
    key_padding,
    matmul_flops,
    normal,
    parameter_names,
    self_attention_keys,
)
from models.blocks import BlockConfig, Embeddings, PreNormBlock, Stack, vocabulary_columns
from models.config import GPTConfig
from models.outputs import ModelOutput
from models.position import make_positions


class GPT(LanguageModel):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        block = BlockConfig.from_model(config, causal=True)
        positions = make_positions(config.positions, config.max_seq_len, config.d_model)
        self.embed = Embeddings(
            config.vocab_size,
            config.d_model,
            positions=positions,
            dropout=config.dropout,
            tied_head=True,
            table_rows=config.padded_vocab_size,
        )
        self.blocks = Stack(
            [PreNormBlock(block) for _ in range(config.n_layers)],
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> ModelOutput:
        """Causal LM. `labels` are aligned with `input_ids` (usually equal); the shift happens here."""
        padding = key_padding(attention_mask)
        x = self.blocks(self.embed(input_ids), key_padding_mask=padding)  # (B, L, D)
        logits = self.embed.project(self.norm(x))  # (B, L, padded V)
        loss = None
        if labels is not None:
            # Predict token t+1 at position t; padding the shifted labels avoids copying the logits.
            loss = cross_entropy(logits, F.pad(labels[:, 1:], (0, 1), value=-100))
        return ModelOutput(logits=vocabulary_columns(logits, self.config.vocab_size), loss=loss)

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def flops_per_token(self, shape: SampleShape) -> float:
        """Every block and the head (tied to the token embedding: a matmul all the same) at every position."""
        if shape.target_len is not None or shape.predicted_fraction != 1.0:
            raise ValueError(f"GPT has no decoder and predicts at every position; got {shape}")
        cfg, n = self.config, shape.input_len
        weights = self.num_parameters(exclude_embeddings=True) + self.embed.tokens.weight.numel()
        width = cfg.n_heads * cfg.head_dim
        keys = self_attention_keys(cfg, n, causal=True)
        return (matmul_flops(weights, n) + attention_flops(cfg.n_layers, width, n, keys)) / n

    def init_rules(self) -> dict[str, InitFn]:
        """GPT-2's scheme: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 L)."""
        std = self.config.init_std
        rules = default_rules(self, std)
        names = parameter_names(self)
        scaled = normal(std / math.sqrt(2 * self.config.n_layers))
        for block in self.blocks:
            for proj in (block.attn.out, block.ff.down):
                rules[names[id(proj.weight)]] = scaled
        return rules

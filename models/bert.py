"""BERT: embed (tokens + types + positions, LayerNorm) -> post-norm blocks -> MLM head tied to the embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from models.base import (
    InitFn,
    LanguageModel,
    SampleShape,
    attention_flops,
    constant,
    cross_entropy,
    default_rules,
    key_padding,
    matmul_flops,
    num_weights,
    self_attention_keys,
    sequence_projection_weights,
)
from models.blocks import ACTIVATIONS, BlockConfig, Embeddings, PostNormBlock, Stack, vocabulary_columns
from models.config import BERTConfig
from models.outputs import ModelOutput
from models.position import make_positions


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> (word embedding)^T + bias, as in BERT's pre-training."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.transform = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))

    def forward(self, x: Tensor, embed: Embeddings) -> Tensor:
        x = self.norm(ACTIVATIONS[self.activation](self.transform(x)))
        return embed.project(x, self.bias)


class BERT(LanguageModel):
    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        block = BlockConfig.from_model(config)
        self.embed = Embeddings(
            config.vocab_size,
            config.d_model,
            positions=make_positions(config.positions, config.max_seq_len, config.d_model),
            type_vocab_size=config.type_vocab_size,
            norm_eps=config.layer_norm_eps,
            dropout=config.dropout,
            padding_idx=config.pad_token_id,
            tied_head=True,
            table_rows=config.padded_vocab_size,
        )
        self.blocks = Stack(
            [PostNormBlock(block) for _ in range(config.n_layers)],
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.head = MLMHead(config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> ModelOutput:
        """Masked LM. With `labels`, logits are (num_masked, vocab) for labels != -100 (see ModelOutput)."""
        padding = key_padding(attention_mask)
        x = self.blocks(self.embed(input_ids, token_type_ids), key_padding_mask=padding)  # (B, L, D)
        vocab = self.config.vocab_size
        if labels is None:
            return ModelOutput(logits=vocabulary_columns(self.head(x, self.embed), vocab))
        masked = labels != -100
        logits = self.head(x[masked], self.embed)  # (num_masked, padded V)
        return ModelOutput(
            logits=vocabulary_columns(logits, vocab), loss=cross_entropy(logits, labels[masked])
        )

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def flops_per_token(self, shape: SampleShape) -> float:
        """The blocks at every position; the MLM head (transform, norm, the vocabulary projection tied to
        the embedding) only at `shape.predicted_fraction` of them, as with labels it runs at the masked ones."""
        if shape.target_len is not None:
            raise ValueError(f"BERT has no decoder; got {shape}")
        cfg, n = self.config, shape.input_len
        head = num_weights(self.head)
        body = self.num_parameters(exclude_embeddings=True) - head - sequence_projection_weights(self)
        predicted = n * shape.predicted_fraction
        width = cfg.n_heads * cfg.head_dim
        return (
            matmul_flops(body, n)
            + matmul_flops(head + self.embed.tokens.weight.numel(), predicted)
            + attention_flops(cfg.n_layers, width, n, self_attention_keys(cfg, n, causal=False))
        ) / n

    def init_rules(self) -> dict[str, InitFn]:
        """BERT's scheme: N(0, init_std) for weights, zero biases (and padding row), unit LayerNorms."""
        rules = default_rules(self, self.config.init_std)
        rules["head.bias"] = constant(0.0)
        return rules

"""T5: shared embedding -> encoder (pre-norm, RMSNorm, relative bias) -> decoder (+ cross attention) -> head.

v1.0 ties the head to the embedding and scales the decoder output by d_model**-0.5 first; v1.1 has its
own head and no scaling. Attention is unscaled (scale = 1). One relative-bias table per stack is shared
by all its layers: bidirectional buckets in the encoder, causal ones in the decoder.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from models.attention import SelfAttention
from models.base import (
    InitFn,
    LanguageModel,
    SampleShape,
    attention_flops,
    constant,
    cross_entropy,
    key_padding,
    matmul_flops,
    normal,
    num_weights,
    parameter_names,
    row_blocks,
    self_attention_keys,
)
from models.blocks import BlockConfig, Embeddings, PreNormBlock, Stack, VocabularyHead, vocabulary_columns
from models.config import T5Config
from models.outputs import ModelOutput
from models.position import RelativePositionBias


def shift_right(labels: Tensor, *, start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: [start, labels[:-1]] with ignored (-100) labels as padding."""
    shifted = labels.new_full(labels.shape, start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class T5(LanguageModel):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        # T5: RMSNorm, no biases, no 1/sqrt(d) scaling, dropout inside the feed-forward too.
        block = dict(gated=config.gated, norm="rms", bias=False, scale=1.0, ff_dropout=config.dropout)
        encoder_block = BlockConfig.from_model(config, **block)
        decoder_block = BlockConfig.from_model(config, **block, causal=True, cross_attention=True)
        bias = dict(num_buckets=config.relative_buckets, max_distance=config.relative_max_distance)
        checkpointing = config.gradient_checkpointing

        self.embed = Embeddings(
            config.vocab_size,
            config.d_model,
            dropout=config.dropout,
            tied_head=config.tie_embeddings,
            table_rows=config.padded_vocab_size,
        )
        self.encoder_bias = RelativePositionBias(config.n_heads, bidirectional=True, **bias)
        self.encoder = Stack(
            [PreNormBlock(encoder_block) for _ in range(config.n_layers)],
            gradient_checkpointing=checkpointing,
        )
        self.encoder_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.decoder_bias = RelativePositionBias(config.n_heads, bidirectional=False, **bias)
        self.decoder = Stack(
            [PreNormBlock(decoder_block) for _ in range(config.n_decoder_layers)],
            gradient_checkpointing=checkpointing,
        )
        self.decoder_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = (
            None
            if config.tie_embeddings
            else VocabularyHead(config.d_model, config.vocab_size, config.padded_vocab_size)
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> ModelOutput:
        """Seq2seq LM. Without `decoder_input_ids` they are `labels` shifted right (start token first)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5 needs decoder_input_ids or labels")
            cfg = self.config
            decoder_input_ids = shift_right(
                labels, start_token_id=cfg.decoder_start_token_id, pad_token_id=cfg.pad_token_id
            )
        enc_mask = key_padding(attention_mask)
        dec_mask = key_padding(decoder_attention_mask)

        memory = self.encoder(self.embed(input_ids), key_padding_mask=enc_mask, bias=self.encoder_bias())
        memory = self.drop(self.encoder_norm(memory))  # (B, Lin, D)
        x = self.decoder(
            self.embed(decoder_input_ids),
            key_padding_mask=dec_mask,
            bias=self.decoder_bias(),
            context=memory,
            context_mask=enc_mask,
        )
        x = self.drop(self.decoder_norm(x))  # (B, Ltgt, D)
        if self.lm_head is None:
            logits = self.embed.project(x * self.config.d_model**-0.5)
        else:
            logits = self.lm_head(x)
        loss = cross_entropy(logits, labels) if labels is not None else None  # over the padded V
        return ModelOutput(logits=vocabulary_columns(logits, self.config.vocab_size), loss=loss)

    def transformer_blocks(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The shared token embedding and both relative-position tables: lookups, not matmuls."""
        return [self.embed.tokens.weight, self.encoder_bias.table.weight, self.decoder_bias.table.weight]

    def flops_per_token(self, shape: SampleShape) -> float:
        """Per input token: the encoder over the inputs, the decoder and the head over the targets.

        Cross attention splits across the two lengths: its queries come from the targets, its keys and
        values are projections of the encoder output, computed once per input token.
        """
        if shape.target_len is None or shape.predicted_fraction != 1.0:
            raise ValueError(
                f"T5 needs its decoder length (target_len) and predicts at every target; got {shape}"
            )
        cfg, s, t = self.config, shape.input_len, shape.target_len
        width = cfg.n_heads * cfg.d_kv
        cross_kv = sum(num_weights(block.cross_attn.kv) for block in self.decoder)
        head = (self.embed.tokens if self.lm_head is None else self.lm_head).weight.numel()
        over_inputs = num_weights(self.encoder, self.encoder_norm) + cross_kv
        over_targets = num_weights(self.decoder, self.decoder_norm) - cross_kv + head
        per_sample = (
            matmul_flops(over_inputs, s)
            + matmul_flops(over_targets, t)
            + attention_flops(cfg.n_layers, width, s, self_attention_keys(cfg, s, causal=False))
            # decoder: self, then (always exact) cross attention
            + attention_flops(cfg.n_decoder_layers, width, t, self_attention_keys(cfg, t, causal=True) + s)
        )
        return per_sample / s

    def init_rules(self) -> dict[str, InitFn]:
        """Mesh TensorFlow's scheme (as in transformers): each matrix N(0, 1/sqrt(fan-in)), q also / sqrt(d_kv)."""
        cfg, f = self.config, self.config.init_std
        d_inner = cfg.n_heads * cfg.d_kv
        names = parameter_names(self)
        rules: dict[str, InitFn] = {names[id(self.embed.tokens.weight)]: normal(f)}
        if self.lm_head is not None:
            rules[names[id(self.lm_head.weight)]] = normal(f)
        for bias in (self.encoder_bias, self.decoder_bias):
            rules[names[id(bias.table.weight)]] = normal(f * cfg.d_model**-0.5)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                rules[names[id(module.weight)]] = constant(f)
        q, kv = normal(f * (cfg.d_model * cfg.d_kv) ** -0.5), normal(f * cfg.d_model**-0.5)
        for block in self.transformer_blocks():
            for attn in (block.attn, block.cross_attn):
                if attn is None:  # an encoder block has no cross attention
                    continue
                if isinstance(attn, SelfAttention):
                    rules[names[id(attn.qkv.weight)]] = row_blocks([(d_inner, q), (2 * d_inner, kv)])
                else:
                    rules[names[id(attn.q.weight)]] = q
                    rules[names[id(attn.kv.weight)]] = kv
                rules[names[id(attn.out.weight)]] = normal(f * d_inner**-0.5)
            rules[names[id(block.ff.up.weight)]] = normal(f * cfg.d_model**-0.5)
            rules[names[id(block.ff.down.weight)]] = normal(f * cfg.d_ff**-0.5)
        return rules

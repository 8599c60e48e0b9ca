"""T5: shared embedding -> encoder (pre-norm, RMSNorm, relative bias) -> decoder (+ cross attention) -> head.

v1.0 ties the head to the embedding and scales the decoder output by d_model**-0.5 first; v1.1 has its
own head and no scaling. Attention is unscaled (scale = 1). One relative-bias table per stack is shared
by all its layers: bidirectional buckets in the encoder, causal ones in the decoder.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.attention import SelfAttention
from models.base import LanguageModel, cross_entropy, key_padding
from models.blocks import BlockConfig, Embeddings, PreNormBlock, Stack
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

        self.embed = Embeddings(config.vocab_size, config.d_model, dropout=config.dropout)
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
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
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
            logits = F.linear(x * self.config.d_model**-0.5, self.embed.tokens.weight)
        else:
            logits = self.lm_head(x)
        loss = cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)

    def transformer_blocks(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def _tied_head_params(self) -> int:
        return self.embed.tokens.weight.numel() if self.lm_head is None else 0

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The shared token embedding and both relative-position tables: lookups, not matmuls."""
        return [self.embed.tokens.weight, self.encoder_bias.table.weight, self.decoder_bias.table.weight]

    def flops_per_token(self, seq_len: int, *, target_len: int | None = None) -> float:
        """Training FLOPs per input token (PaLM appendix B per stack): the encoder runs over `seq_len` inputs,
        the decoder (self attention over the targets, cross attention over the inputs) and the head over
        `target_len` targets (None: as long as the inputs; span corruption makes them much shorter)."""
        cfg = self.config
        t = seq_len if target_len is None else target_len
        hq = cfg.n_heads * cfg.d_kv
        encoder = sum(p.numel() for m in (self.encoder, self.encoder_norm) for p in m.parameters())
        decoder = self.num_parameters(exclude_embeddings=True) - encoder + self._tied_head_params()
        per_input = 6.0 * encoder + 12.0 * cfg.n_layers * hq * seq_len
        per_target = 6.0 * decoder + 12.0 * cfg.n_decoder_layers * hq * (t + seq_len)
        return per_input + per_target * t / seq_len

    def init_weights(self) -> None:
        """Mesh TensorFlow's scheme (as in transformers): each matrix N(0, 1/sqrt(fan-in)), q also / sqrt(d_kv)."""
        cfg, f = self.config, self.config.init_std
        d_inner = cfg.n_heads * cfg.d_kv
        nn.init.normal_(self.embed.tokens.weight, std=f)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=f)
        for bias in (self.encoder_bias, self.decoder_bias):
            nn.init.normal_(bias.table.weight, std=f * cfg.d_model**-0.5)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.constant_(module.weight, f)
        for block in self.transformer_blocks():
            for attn in (block.attn, block.cross_attn):
                if attn is None:  # an encoder block has no cross attention
                    continue
                q, kv = (
                    attn.qkv.weight.split([d_inner, 2 * d_inner])
                    if isinstance(attn, SelfAttention)
                    else (attn.q.weight, attn.kv.weight)
                )
                nn.init.normal_(q, std=f * (cfg.d_model * cfg.d_kv) ** -0.5)
                nn.init.normal_(kv, std=f * cfg.d_model**-0.5)
                nn.init.normal_(attn.out.weight, std=f * d_inner**-0.5)
            nn.init.normal_(block.ff.up.weight, std=f * cfg.d_model**-0.5)
            nn.init.normal_(block.ff.down.weight, std=f * cfg.d_ff**-0.5)

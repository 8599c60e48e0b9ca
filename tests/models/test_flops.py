"""FLOPs per token against a hand count on tiny models, and the bench's step count built on the same method.

Every tiny model here: vocab 10, width 4, 1 layer (per stack), 2 heads, feed-forward 8, 16 positions.
A Linear(i, o) has i*o weights (+ o biases), a LayerNorm(4) 8 parameters, an RMSNorm(4) 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models

TINY = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, d_ff=8)
SEQ = 16

# One post-norm (BERT) or pre-norm (GPT) block: qkv 4x12+12, out 4x4+4, up 4x8+8, down 8x4+4, two LayerNorms.
BLOCK = (48 + 12) + (16 + 4) + (32 + 8) + (32 + 4) + 2 * 8  # 172
TIED_HEAD = 10 * 4  # the vocabulary projection reuses the token embedding: a matmul all the same
ATTENTION = 12 * 1 * 2 * 2 * SEQ  # 12 L H Q T with head width 4 / 2


def tiny(preset: str, **overrides) -> models.LanguageModel:
    return models.build_model(preset, **TINY, **overrides)


def test_gpt_hand_count() -> None:
    n = BLOCK + 8 + TIED_HEAD  # blocks, final LayerNorm, head; token and position tables are lookups
    assert tiny("gpt-tiny", max_seq_len=SEQ).flops_per_token(SEQ) == 6 * n + ATTENTION == 2088


def test_bert_head_runs_only_at_masked_positions() -> None:
    model = tiny("bert-tiny", max_seq_len=SEQ)
    head = (16 + 4) + 8 + 10 + TIED_HEAD  # transform Linear(4, 4), LayerNorm, output bias, projection: 78
    body = 8 + BLOCK  # embedding LayerNorm + block (token, type and position tables are lookups): 180
    assert model.flops_per_token(SEQ) == 6 * (body + head) + ATTENTION == 2316  # no labels: every position
    assert model.flops_per_token(SEQ, masked_fraction=0.25) == 6 * (body + 0.25 * head) + ATTENTION == 1965
    assert model.flops_per_token(SEQ, masked_fraction=0.0) == 6 * body + ATTENTION
    with pytest.raises(ValueError, match="masked_fraction"):
        model.flops_per_token(SEQ, masked_fraction=1.5)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_t5_counts_encoder_over_inputs_and_decoder_over_targets(tie_embeddings: bool) -> None:
    model = tiny("t5-tiny", d_kv=3, relative_buckets=5, tie_embeddings=tie_embeddings)
    hq = 2 * 3
    # Encoder block: RMSNorm, qkv 4x18, out 6x4, RMSNorm, up 4x8, down 8x4; then the encoder's final RMSNorm.
    encoder = 4 + 72 + 24 + 4 + 32 + 32 + 4  # 172
    # Decoder block adds cross attention (RMSNorm, q 4x6, kv 4x12, out 6x4); final RMSNorm; the head 4x10,
    # tied or not. The token table and both relative-bias tables are lookups.
    decoder = 4 + 72 + 24 + (4 + 24 + 48 + 24) + 4 + 32 + 32 + 4 + 40  # 312
    inputs, targets = SEQ, 5
    per_sample = inputs * (6 * encoder + 12 * hq * inputs) + targets * (
        6 * decoder + 12 * hq * (targets + inputs)
    )
    assert model.flops_per_token(SEQ, target_len=targets) == per_sample / inputs == 3241.5
    # Targets as long as the inputs: the plain 6 N + 12 (L_enc + 2 L_dec) H Q T.
    assert model.flops_per_token(SEQ) == 6 * (encoder + decoder) + 12 * 3 * hq * SEQ == 6360


def test_bench_step_flops_is_the_model_count_for_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/_common.step_flops reads the masked count and the target length off the batch."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from bench._common import step_flops

    ids = torch.zeros(2, SEQ, dtype=torch.long)
    labels = torch.full((2, SEQ), -100)
    labels[0, :5] = labels[1, :3] = 1  # 8 of 32 positions masked
    bert = tiny("bert-tiny", max_seq_len=SEQ)
    assert step_flops(bert, {"input_ids": ids, "labels": labels}) == 1965 * 2 * SEQ
    t5 = tiny("t5-tiny", d_kv=3, relative_buckets=5)
    assert (
        step_flops(t5, {"input_ids": ids, "labels": torch.ones(2, 5, dtype=torch.long)}) == 3241.5 * 2 * SEQ
    )
    gpt = tiny("gpt-tiny", max_seq_len=SEQ)
    assert step_flops(gpt, {"input_ids": ids, "labels": ids}) == 2088 * 2 * SEQ

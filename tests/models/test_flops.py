"""FLOPs per token: against what torch counts in a training step, against a hand count on tiny models, and
the bench's step count built on the same method.

The hand-counted tiny models: vocab 10, width 4, 1 layer (per stack), 2 heads, feed-forward 8, 16 positions.
A Linear(i, o) has i*o weights (+ o biases), a LayerNorm(4) 8 parameters, an RMSNorm(4) 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from data.objectives import compute_input_and_target_lengths
from models import SampleShape
from models.base import matmul_flops

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
    assert tiny("gpt-tiny", max_seq_len=SEQ).flops_per_token(SampleShape(SEQ)) == 6 * n + ATTENTION == 2088


def test_bert_head_runs_only_at_masked_positions() -> None:
    model = tiny("bert-tiny", max_seq_len=SEQ)
    head = (16 + 4) + 8 + 10 + TIED_HEAD  # transform Linear(4, 4), LayerNorm, output bias, projection: 78
    body = 8 + BLOCK  # embedding LayerNorm + block (token, type and position tables are lookups): 180
    assert model.flops_per_token(SampleShape(SEQ)) == 6 * (body + head) + ATTENTION == 2316  # no labels
    masked = SampleShape(SEQ, predicted_fraction=0.25)
    assert model.flops_per_token(masked) == 6 * (body + 0.25 * head) + ATTENTION == 1965
    assert model.flops_per_token(SampleShape(SEQ, predicted_fraction=0.0)) == 6 * body + ATTENTION
    with pytest.raises(ValueError, match="predicted_fraction"):
        SampleShape(SEQ, predicted_fraction=1.5)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_t5_counts_encoder_over_inputs_and_decoder_over_targets(tie_embeddings: bool) -> None:
    model = tiny("t5-tiny", d_kv=3, relative_buckets=5, tie_embeddings=tie_embeddings)
    hq = 2 * 3
    # Encoder block: RMSNorm, qkv 4x18, out 6x4, RMSNorm, up 4x8, down 8x4; then the encoder's final RMSNorm.
    encoder = 4 + 72 + 24 + 4 + 32 + 32 + 4  # 172
    # Decoder block adds cross attention (RMSNorm, q 4x6, kv 4x12, out 6x4); final RMSNorm; the head 4x10,
    # tied or not. The token table and both relative-bias tables are lookups. Cross attention's keys and
    # values (kv 4x12) are projections of the encoder output: they run once per input, not per target.
    kv = 48
    decoder = 4 + 72 + 24 + (4 + 24 + 24) + 4 + 32 + 32 + 4 + 40  # 264
    inputs, targets = SEQ, 5
    per_sample = inputs * (6 * (encoder + kv) + 12 * hq * inputs) + targets * (
        6 * decoder + 12 * hq * (targets + inputs)
    )
    assert model.flops_per_token(SampleShape(SEQ, target_len=targets)) == per_sample / inputs == 3439.5
    # Targets as long as the inputs: the plain 6 N + 12 (L_enc + 2 L_dec) H Q T.
    same = SampleShape(SEQ, target_len=SEQ)
    assert model.flops_per_token(same) == 6 * (encoder + kv + decoder) + 12 * 3 * hq * SEQ == 6360


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
        step_flops(t5, {"input_ids": ids, "labels": torch.ones(2, 5, dtype=torch.long)}) == 3439.5 * 2 * SEQ
    )
    gpt = tiny("gpt-tiny", max_seq_len=SEQ)
    assert step_flops(gpt, {"input_ids": ids, "labels": ids}) == 2088 * 2 * SEQ


def test_each_family_refuses_a_shape_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="GPT has no decoder"):
        tiny("gpt-tiny", max_seq_len=SEQ).flops_per_token(SampleShape(SEQ, target_len=5))
    with pytest.raises(ValueError, match="BERT has no decoder"):
        tiny("bert-tiny", max_seq_len=SEQ).flops_per_token(SampleShape(SEQ, target_len=5))
    with pytest.raises(ValueError, match="target_len"):
        tiny("t5-tiny").flops_per_token(SampleShape(SEQ))


# Against torch's own count: FlopCounterMode sees every matmul of a training step (forward and backward) on
# the eager attention backend, which materialises the scores. Widths of 128 keep biases and norms, which
# it does not count and we do (as 6 FLOPs per parameter and position), under 1%.
WIDE = dict(vocab_size=512, d_model=128, n_heads=4, d_ff=384, attention="eager", dropout=0.0)
BATCH, INPUTS = 2, 64
TARGETS = compute_input_and_target_lengths(INPUTS, 0.15, 3.0)[1]  # span corruption's targets: 15 for 64


def counted_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def span_batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, vocab, (BATCH, INPUTS))
    labels = torch.randint(4, vocab, (BATCH, TARGETS))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_gpt_count_matches_torch() -> None:
    torch.manual_seed(0)
    model = models.build_model("gpt-tiny", **WIDE, n_layers=2)
    ids = torch.randint(4, 512, (BATCH, INPUTS))
    ours = model.flops_per_token(SampleShape(INPUTS)) * BATCH * INPUTS
    assert ours == pytest.approx(counted_flops(model, dict(input_ids=ids, labels=ids)), rel=0.02)


def test_bert_count_matches_torch_with_the_head_at_masked_positions() -> None:
    torch.manual_seed(0)
    model = models.build_model("bert-tiny", **WIDE, n_layers=2)
    ids = torch.randint(4, 512, (BATCH, INPUTS))
    masked = torch.rand(BATCH, INPUTS) < 0.15
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
        labels=ids.masked_fill(~masked, -100),
    )
    shape = SampleShape(INPUTS, predicted_fraction=masked.float().mean().item())
    ours = model.flops_per_token(shape) * BATCH * INPUTS
    assert ours == pytest.approx(counted_flops(model, batch), rel=0.02)


@pytest.mark.parametrize(
    "fields",
    [
        dict(d_kv=48, n_layers=3, n_decoder_layers=2),  # v1.0: ReLU, head tied; heads x d_kv = 192 != 128
        dict(
            d_kv=24, n_layers=2, n_decoder_layers=3, gated=True, activation="gelu_tanh", tie_embeddings=False
        ),
    ],
    ids=["v1_0", "v1_1"],
)
def test_t5_count_matches_torch_with_targets_shorter_than_inputs(fields: dict) -> None:
    torch.manual_seed(0)
    model = models.build_model("t5-tiny", **WIDE, **fields)
    counted = counted_flops(model, span_batch(512))
    ours = model.flops_per_token(SampleShape(INPUTS, target_len=TARGETS)) * BATCH * INPUTS
    assert ours == pytest.approx(counted, rel=0.02)
    # The test sees the cross-attention keys and values run over the inputs: counted over the targets
    # (as the decoder's other matmuls are), the total would be more than 2% low.
    kv = sum(block.cross_attn.kv.weight.numel() for block in model.decoder)
    kv_over_targets = ours - matmul_flops(kv, INPUTS - TARGETS) * BATCH
    assert kv_over_targets < counted * 0.98


# The approximate backends skip work, so their count is their pattern's (models.base.self_attention_keys), not
# the whole score matrix: counted as exact attention these cases are 10-33% over torch's count.
@pytest.mark.parametrize(
    "preset, fields",
    [
        ("bert-tiny", dict(attention="linformer", linformer_k=32)),
        ("bert-tiny", dict(attention="linformer", linformer_k=32, linformer_share_kv=True)),
        ("gpt-tiny", dict(attention="sparse", attention_window=32, attention_block=32)),
        ("bert-tiny", dict(attention="sparse", attention_window=32, attention_block=32, attention_global=8)),
        ("bert-tiny", dict(attention="lsh", lsh_bucket_size=32, lsh_n_hashes=2)),
        ("gpt-tiny", dict(attention="lsh", lsh_bucket_size=32, lsh_n_hashes=2)),
    ],
    ids=["linformer", "linformer-shared", "sparse-causal", "sparse-global", "lsh", "lsh-causal"],
)
def test_approximate_attention_counts_what_it_computes(preset: str, fields: dict) -> None:
    torch.manual_seed(0)
    length = 256  # long enough for the patterns to leave most of the score matrix out
    model = models.build_model(preset, **{**WIDE, **fields}, n_layers=2, max_seq_len=length)
    ids = torch.randint(4, 512, (BATCH, length))
    batch = dict(input_ids=ids, labels=ids)
    if preset.startswith("bert"):
        batch.update(attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    ours = model.flops_per_token(SampleShape(length)) * BATCH * length
    assert ours == pytest.approx(counted_flops(model, batch), rel=0.05)

"""Presets, overrides and the errors for bad ones; parameter counts equal transformers' for every preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from models.build import build_from_config
from models.config import CONFIG_CLASSES, PRESETS, T5Config, get_config
from models.hf import vocabulary_tensors


@pytest.mark.parametrize("family", list(CONFIG_CLASSES))
def test_every_settable_field_is_documented_where_declared(family: str) -> None:
    """`pretrain config` prints `metadata["doc"]`: text, image and speech families alike carry one per field."""
    undocumented = [
        f.name for f in dataclasses.fields(CONFIG_CLASSES[family]) if f.init and not f.metadata.get("doc")
    ]
    assert undocumented == [], undocumented


def test_unknown_preset_names_it_and_lists_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt5'.*gpt-tiny.*t5-v1_1-base"):
        models.build_model("gpt5")


def test_unknown_field_names_it_and_lists_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) n_layer; accepted: .*n_layers"):
        models.build_model("gpt-tiny", n_layer=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(attention="flash"), "attention='flash'; accepted: auto, eager, sdpa, chunked"),
        (dict(n_heads=5), "d_model=256 is not divisible by n_heads=5"),
        (dict(activation="swish"), "activation='swish'"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_invalid_values_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_config("gpt-tiny", **overrides)


def test_overrides_reach_the_model() -> None:
    model = models.build_model(
        "gpt-tiny", n_layers=1, vocab_size=100, attention="eager", gradient_checkpointing=True
    )
    assert len(model.transformer_blocks()) == 1
    assert model.embed.tokens.weight.shape == (100, 256)
    assert model.blocks[0].attn.backend == "eager" and model.blocks.gradient_checkpointing
    assert model.config.family == "gpt" and model.config.max_seq_len == 512


def test_config_round_trips_through_a_dict() -> None:
    cfg = get_config("t5-v1_1-base", vocab_size=512)
    again = models.config.make_config(T5Config, cfg.to_dict())
    assert again == cfg and again.n_decoder_layers == 12 and again.decoder_start_token_id == 0


def _hf_twin(config: models.ModelConfig) -> torch.nn.Module:
    import transformers

    from models.hf import _FAMILIES

    spec = _FAMILIES[config.family]
    return getattr(transformers, spec.hf_class)(spec.to_hf_config(config))


@pytest.mark.parametrize(
    "preset", [p for p, (cls, _) in PRESETS.items() if cls.family in ("gpt", "bert", "t5")]
)
def test_parameter_count_equals_transformers(preset: str) -> None:
    """Built on the meta device (no memory): same architecture as transformers' => same parameter count; the
    preset's padded vocabulary adds its padding rows to the tables with a row per token, nothing else."""
    config = get_config(preset, vocab_multiple=1)
    with torch.device("meta"):
        ours = build_from_config(config, init=False)
        theirs = _hf_twin(config)
        padded = build_from_config(get_config(preset), init=False)
    expected = theirs.num_parameters()
    if config.family == "t5" and not config.tie_embeddings:
        expected += config.vocab_size * config.d_model  # transformers >= 5 ties T5's head; v1.1's is its own
    assert ours.num_parameters() == expected
    assert ours.num_parameters(exclude_embeddings=True) < ours.num_parameters()
    rows = padded.config.padded_vocab_size - config.vocab_size
    vocabulary = dict(padded.named_parameters())
    extra = sum(rows * vocabulary[n][0].numel() for n in vocabulary_tensors(config.family) if n in vocabulary)
    assert padded.num_parameters() == expected + extra
    assert padded.config.padded_vocab_size % 128 == 0


def test_known_sizes_and_flops() -> None:
    with torch.device("meta"):
        gpt2 = models.build_model("gpt2-small", vocab_multiple=1)
        padded = models.build_model("gpt2-small")
    assert gpt2.num_parameters() == 124_439_808  # the published GPT-2 small count
    assert padded.num_parameters() == 124_439_808 + (50304 - 50257) * 768  # the preset pads to 128 rows
    for model, rows in ((gpt2, 50257), (padded, 50304)):
        n = model.num_parameters(exclude_embeddings=True) + rows * 768  # the tied head is a matmul, every row
        assert model.flops_per_token(models.SampleShape(1024)) == 6 * n + 12 * 12 * 768 * 1024


def test_init_weights_is_deterministic_and_follows_the_scheme() -> None:
    torch.manual_seed(3)
    a = models.build_model("gpt-tiny")
    torch.manual_seed(3)
    b = models.build_model("gpt-tiny")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert abs(a.embed.tokens.weight.std().item() - 0.02) < 1e-3
    assert abs(a.blocks[0].attn.out.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 1e-3  # 1/sqrt(2 L)
    assert torch.all(a.blocks[0].attn.qkv.bias == 0) and torch.all(a.norm.weight == 1)

"""Tiny randomly initialised transformers models (no downloads) and matching inputs for parity tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


@dataclass
class HFCase:
    """One transformers model plus the inputs to feed both it and ours (HF keyword names)."""

    model: torch.nn.Module
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _right_padded_mask(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return mask


def _gpt(n_embd: int, n_head: int, n_layer: int, length: int, **kw) -> HFCase:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=101,
        n_embd=n_embd,
        n_head=n_head,
        n_layer=n_layer,
        n_positions=40,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    ids = torch.randint(0, 101, (3, length))
    mask = _right_padded_mask(3, length, [length, length - 4, 1])
    labels = ids.masked_fill(mask == 0, -100)
    return HFCase(GPT2LMHeadModel(cfg).eval(), dict(input_ids=ids, attention_mask=mask, labels=labels))


def _bert(hidden: int, heads: int, layers: int, length: int, **kw) -> HFCase:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=101,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=40,
        **kw,
    )
    ids = torch.randint(1, 101, (3, length))
    mask = _right_padded_mask(3, length, [length, length - 3, 2])
    types = (torch.arange(length) >= length // 2).long().expand(3, length).clone()
    labels = torch.full_like(ids, -100)
    picked = torch.rand(3, length) < 0.3
    picked[:, 0] = True
    labels[picked] = ids[picked]
    return HFCase(
        BertForMaskedLM(cfg).eval(),
        dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels),
    )


def _t5(
    d_model: int, d_kv: int, heads: int, layers: int, decoder_layers: int, src: int, tgt: int, **kw
) -> HFCase:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=101, d_model=d_model, d_kv=d_kv, d_ff=2 * d_model + 6, num_heads=heads, num_layers=layers,
        num_decoder_layers=decoder_layers, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        decoder_start_token_id=0, **kw,
    )  # fmt: skip
    ids = torch.randint(2, 101, (2, src))
    labels = torch.randint(2, 101, (2, tgt))
    labels[1, tgt - 3 :] = -100
    inputs = dict(
        input_ids=ids,
        attention_mask=_right_padded_mask(2, src, [src, src - 5]),
        labels=labels,
        decoder_attention_mask=(labels != -100).long(),
    )
    return HFCase(T5ForConditionalGeneration(cfg).eval(), inputs)


# Shapes chosen to vary heads, widths, head widths (T5: d_kv * heads != d_model), depths (T5: encoder !=
# decoder), activations, and odd lengths past T5's max_distance so that log-spaced buckets are used.
CASES = {
    "gpt-48x3": lambda: _gpt(48, 3, 2, 13),
    "gpt-64x8-gelu": lambda: _gpt(64, 8, 3, 17, n_inner=100, activation_function="gelu"),
    "bert-48x3": lambda: _bert(48, 3, 2, 11, intermediate_size=80),
    "bert-64x2-tanh": lambda: _bert(64, 2, 3, 19, intermediate_size=96, hidden_act="gelu_new"),
    "t5-v1_0": lambda: _t5(48, 10, 3, 2, 3, 21, 9, feed_forward_proj="relu"),
    "t5-v1_1": lambda: _t5(
        64, 16, 4, 3, 2, 15, 19, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
}

BACKENDS = ["eager", "sdpa", "chunked"]


@pytest.fixture(params=list(CASES))
def hf_case(request: pytest.FixtureRequest) -> HFCase:
    torch.manual_seed(0)
    return CASES[request.param]()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param

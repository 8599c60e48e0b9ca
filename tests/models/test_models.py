"""Behaviour of the assembled models beyond HF parity: checkpointing, label conventions, input errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import models
from models.hf import vocabulary_tensors
from models.t5 import shift_right

SMALL = dict(vocab_size=64, d_model=32, n_heads=2, d_ff=48, n_layers=2)


def batch(family: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    if family == "gpt":
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    if family == "bert":
        labels = torch.full_like(ids, -100)
        labels[:, [2, 5]] = ids[:, [2, 5]]
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids > 30).long(), labels=labels)
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(1, 64, (2, 6)))


def grads_of(
    model: torch.nn.Module, inputs: dict, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "t5-tiny"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_leaves_gradients_unchanged(preset: str, dropout: float) -> None:
    """Also with dropout: the recomputation replays the same random masks (RNG state is restored)."""
    torch.manual_seed(0)
    plain = models.build_model(preset, **SMALL, dropout=dropout, attention="sdpa").train()
    torch.manual_seed(0)
    ckpt = models.build_model(
        preset, **SMALL, dropout=dropout, attention="sdpa", gradient_checkpointing=True
    ).train()
    inputs = batch(plain.config.family)

    calls = []
    for block in ckpt.transformer_blocks():
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    loss_a, grads_a = grads_of(plain, inputs)
    loss_b, grads_b = grads_of(ckpt, inputs)
    assert len(calls) == 2 * len(ckpt.transformer_blocks())  # every block ran again in backward
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "t5-tiny"])
def test_a_tied_table_gets_its_lookup_gradient_sparse_and_its_whole_gradient_dense(preset: str) -> None:
    """The lookup adds B x L rows into the head's dense gradient; the sum equals the dense lookup's."""
    torch.manual_seed(0)
    model = models.build_model(preset, **SMALL, attention="sdpa")
    table = model.embed.tokens.weight
    inputs = batch(model.config.family)
    (lookup,) = torch.autograd.grad(model.embed(inputs["input_ids"]).sum(), table)
    assert lookup.is_sparse
    _, grads = grads_of(model, inputs)
    assert table.grad.layout == torch.strided  # what DDP's reducer and every optimizer expect
    model.embed.tied_head = False
    _, dense = grads_of(model, inputs)
    name = "embed.tokens.weight"
    torch.testing.assert_close(grads[name], dense[name], rtol=1e-6, atol=1e-7)


class _TableSizedOutputs(TorchDispatchMode):
    """Records the ops that make a new dense tensor of the token table's shape (not views, not in-place)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.ops = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = not func.is_view and not func._schema.is_mutable
        dense = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.layout == torch.strided]
        if fresh and any(t.shape == self.shape for t in dense):
            self.ops.append(func.__name__)
        return out


@pytest.mark.parametrize(("preset", "expected"), [("gpt-tiny", 1), ("bert-tiny", 1), ("t5-tiny", 2)])
def test_the_tied_tables_gradient_is_made_once(preset: str, expected: int) -> None:
    """The head's weight gradient is the only V x D tensor backward makes: the lookup adds its rows into it in
    place (models/blocks.py `_TiedLookup`) instead of autograd summing the two into a new one. T5 looks tokens
    up twice (encoder, decoder); the encoder's rows still arrive sparse and are summed out of place."""
    torch.manual_seed(0)
    tie = {"tie_embeddings": True} if preset.startswith("t5") else {}  # GPT and BERT always tie
    model = models.build_model(preset, **SMALL, attention="sdpa", **tie)
    table = model.embed.tokens.weight
    loss = model(**batch(model.config.family)).loss
    with _TableSizedOutputs(table.shape) as made:
        loss.backward()
    assert len(made.ops) == expected, made.ops
    assert table.grad.layout == torch.strided and table.grad.is_contiguous()


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "t5-tiny", "t5-v1_1-small"])
def test_a_padded_vocabulary_computes_what_the_unpadded_one_does(preset: str) -> None:
    """vocab_multiple adds table (and head) rows that never count: logits come back at vocab_size, the loss
    and every real row's gradient are the unpadded model's, the padded rows get exactly zero gradient, whatever
    their values (here large, so that an unmasked padded logit would dominate the softmax)."""
    extra = dict(n_heads=2) if preset.startswith("t5-v1_1") else {}
    torch.manual_seed(0)
    plain = models.build_model(preset, **{**SMALL, **extra}, attention="sdpa", vocab_multiple=1)
    padded = models.build_model(preset, **{**SMALL, **extra}, attention="sdpa", vocab_multiple=48)
    vocabulary = vocabulary_tensors(plain.config.family)
    state = plain.state_dict()
    with torch.no_grad():
        for name, param in padded.named_parameters():
            if name in vocabulary:
                assert param.shape[0] == 96 and state[name].shape[0] == 64, name
                param[:64] = state[name]
                param[64:] = 50.0
            else:
                param.copy_(state[name])
    inputs = batch(plain.config.family)
    loss_a, grads_a = grads_of(plain, inputs)
    loss_b, grads_b = grads_of(padded, inputs)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name][: grad.shape[0]], grad, rtol=1e-5, atol=1e-7, msg=name)
        if name in vocabulary:
            assert torch.count_nonzero(grads_b[name][64:]) == 0, name
    with torch.no_grad():
        logits_a, logits_b = plain(**inputs).logits, padded(**inputs).logits
    assert logits_b.shape == logits_a.shape and logits_b.shape[-1] == 64
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)


def test_bert_with_labels_returns_logits_only_at_masked_positions() -> None:
    model = models.build_model("bert-tiny", **SMALL).eval()
    inputs = batch("bert")
    with torch.no_grad():
        full = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        out = model(**inputs)
    masked = inputs["labels"] != -100
    assert full.shape == (2, 11, 64) and out.logits.shape == (int(masked.sum()), 64)
    torch.testing.assert_close(out.logits, full[masked], rtol=1e-6, atol=1e-6)
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, 64), inputs["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_gpt_loss_predicts_the_next_token() -> None:
    model = models.build_model("gpt-tiny", **SMALL).eval()
    inputs = batch("gpt")
    with torch.no_grad():
        out = model(**inputs)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 64), inputs["labels"][:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)


def test_t5_derives_decoder_inputs_from_labels_like_transformers() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    labels = torch.tensor([[5, 6, 7, 1], [8, 9, -100, -100]])
    hf = T5ForConditionalGeneration(
        T5Config(
            vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, decoder_start_token_id=3
        )
    )
    expected = hf._shift_right(labels)
    assert torch.equal(shift_right(labels, start_token_id=3, pad_token_id=0), expected)
    assert expected.tolist() == [[3, 5, 6, 7], [3, 8, 9, 0]]

    model = models.build_model("t5-tiny", **SMALL).eval()
    inputs = batch("t5")
    derived = shift_right(inputs["labels"], start_token_id=0, pad_token_id=0)
    with torch.no_grad():
        a = model(**inputs)
        b = model(**inputs, decoder_input_ids=derived)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


@pytest.mark.parametrize(
    ("preset", "inputs", "error", "message"),
    [
        (
            "gpt-tiny",
            dict(token_type_ids=torch.zeros(1, 4, dtype=torch.long)),
            TypeError,
            "unexpected keyword argument 'token_type_ids'",
        ),
        (
            "bert-tiny",
            dict(decoder_input_ids=torch.zeros(1, 4, dtype=torch.long)),
            TypeError,
            "unexpected keyword argument 'decoder_input_ids'",
        ),
        (
            "t5-tiny",
            dict(token_type_ids=torch.zeros(1, 4, dtype=torch.long)),
            TypeError,
            "unexpected keyword argument 'token_type_ids'",
        ),
        ("t5-tiny", dict(), ValueError, "T5 needs decoder_input_ids or labels"),
        (
            "gpt-tiny",
            dict(input_ids=torch.zeros(1, 600, dtype=torch.long)),
            ValueError,
            "sequence length 600 exceeds max_seq_len=512",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(preset: str, inputs: dict, error: type[Exception], message: str) -> None:
    """An input a family has no use for is refused by its forward's signature, before any work."""
    model = models.build_model(preset, **{**SMALL, "n_layers": 1})
    inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long), **inputs}
    with pytest.raises(error, match=message):
        model(**inputs)


def test_t5_relative_bias_is_one_table_per_stack() -> None:
    model = models.build_model("t5-tiny", **SMALL)
    tables = [n for n, _ in model.named_parameters() if "bias.table" in n]
    assert tables == ["encoder_bias.table.weight", "decoder_bias.table.weight"]


def test_sliding_window_limits_the_receptive_field(backend: str) -> None:
    """Two layers with window 3: position i sees tokens >= i - 4 only, on every backend alike."""
    torch.manual_seed(0)
    model = models.build_model("gpt-tiny", **SMALL, attention_window=3, attention=backend).eval()
    ids = torch.randint(1, 64, (1, 9))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 64
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
        reference = models.build_model("gpt-tiny", **SMALL, attention_window=3, attention="eager").eval()
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(a, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(a[0, 5:], b[0, 5:])
    assert not torch.allclose(a[0, 4], b[0, 4])


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "t5-tiny", "t5-v1_1-small"])
def test_init_weights_sets_every_parameter_and_matches_a_meta_build(preset: str) -> None:
    """The FSDP path (meta build, to_empty, init_weights) gives exactly build_model's weights, NaN-free."""
    overrides = dict(SMALL, n_heads=2)
    config = models.get_config(preset, **overrides)
    with torch.device("meta"):
        model = models.build_from_config(config, init=False)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    torch.manual_seed(5)
    model.init_weights()
    torch.manual_seed(5)
    reference = models.build_model(preset, **overrides)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert not p.isnan().any(), f"{name} left uninitialised"
        assert torch.equal(p, q), name


def test_sinusoidal_positions() -> None:
    from models.position import SinusoidalPositions

    pe = SinusoidalPositions(6)(5)
    assert pe.shape == (5, 6)
    assert pe[3, 2].item() == pytest.approx(torch.sin(torch.tensor(3 / 10000 ** (2 / 6))).item(), abs=1e-6)
    assert pe[3, 5].item() == pytest.approx(torch.cos(torch.tensor(3 / 10000 ** (4 / 6))).item(), abs=1e-6)
    model = models.build_model("gpt-tiny", **SMALL, positions="sinusoidal")
    learned = models.build_model("gpt-tiny", **SMALL)
    assert learned.num_parameters() - model.num_parameters() == 512 * 32  # no position table
    assert torch.isfinite(model(**batch("gpt")).loss)
    with pytest.raises(ValueError, match="learned positions"):
        models.to_hf(model)


def test_an_all_ones_mask_is_dropped_so_fused_kernels_stay_eligible() -> None:
    from models.base import key_padding

    assert key_padding(torch.ones(2, 5, dtype=torch.long)) is None
    assert key_padding(None) is None
    assert key_padding(torch.tensor([[1, 0]])).tolist() == [[True, False]]
    model = models.build_model("gpt-tiny", **SMALL).eval()
    ids = batch("gpt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)

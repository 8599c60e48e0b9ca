"""The approximate backends and reversible layers inside the families: checkpointing, exact resume, padding,
a loss that falls, and the config refusals. Training is a few optimizer steps with torch directly."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from models import reversible
from models.config import get_config

TINY = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=64, dropout=0.1)
LENGTH, BATCH = 48, 3

CASES = {
    "bert-sparse": ("bert-tiny", dict(attention="sparse", attention_window=6, attention_global=2,
                                      attention_random=1, attention_block=8)),
    "bert-linformer": ("bert-tiny", dict(attention="linformer", linformer_k=16, max_seq_len=LENGTH)),
    "bert-linformer-shared-kv": ("bert-tiny", dict(attention="linformer", linformer_k=8, max_seq_len=64,
                                                   linformer_share_kv=True)),
    "bert-lsh": ("bert-tiny", dict(attention="lsh", lsh_bucket_size=8, lsh_n_hashes=2)),
    "gpt-sparse": ("gpt-tiny", dict(attention="sparse", attention_window=8, attention_global=1,
                                    attention_block=8)),
    "gpt-lsh": ("gpt-tiny", dict(attention="lsh", lsh_bucket_size=8, lsh_n_hashes=2)),
    "gpt-lsh-reversible": ("gpt-tiny", dict(attention="lsh", lsh_bucket_size=8, reversible=True)),
    "t5-sparse": ("t5-tiny", dict(attention="sparse", attention_window=8, attention_global=1, d_kv=8)),
    "t5-reversible": ("t5-tiny", dict(attention="chunked", reversible=True, d_kv=8)),
}  # fmt: skip


def build(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    preset, kw = CASES[name]
    torch.manual_seed(seed)
    return models.build_model(preset, **{**TINY, **kw, **overrides})


def batches(name: str, n: int, *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches shaped like the objectives': clm ids = labels, mlm 15% labelled, span short targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 64, (BATCH, LENGTH), generator=g)
        if name.startswith("gpt"):
            out.append(dict(input_ids=ids, labels=ids))
        elif name.startswith("bert"):
            picked = torch.rand(BATCH, LENGTH, generator=g) < 0.15
            picked[:, 1] = True
            out.append(dict(input_ids=ids.masked_fill(picked, 3), labels=ids.masked_fill(~picked, -100)))
        else:
            out.append(dict(input_ids=ids, labels=torch.randint(4, 64, (BATCH, 12), generator=g)))
    return out


def train(model, optimizer, data) -> list[float]:
    model.train()
    losses = []
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_checkpointing_keeps_the_gradients(name):
    batch = batches(name, 1)[0]
    grads = []
    for checkpointing in (False, True):
        model = build(name, gradient_checkpointing=checkpointing).train()
        torch.manual_seed(1)  # the same dropout masks
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(CASES))
def test_resume_from_saved_state_continues_exactly(name):
    """Model, optimizer and RNG state saved after 2 steps, restored into a differently initialised model:
    the next 2 losses equal those of the uninterrupted run, bit for bit (LSH's rotations and sparse's
    random blocks come from the seed, so they need no state of their own)."""
    data = batches(name, 4)
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optimizer, data[:2])
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    expected = train(model, optimizer, data[2:])

    again = build(name, seed=99)
    optimizer = torch.optim.AdamW(again.parameters(), lr=1e-3)
    again.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    assert train(again, optimizer, data[2:]) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_a_tiny_training_run_lowers_the_loss(name):
    model = build(name, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = train(model, optimizer, batches(name, 1) * 25)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", list(CASES))
def test_padding_does_not_reach_real_positions(name):
    """Left padding in row 1: whatever the padded tokens are, the real positions' logits do not move."""
    model = build(name).eval()
    batch = batches(name, 1)[0]
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, :10] = 0
    other = batch["input_ids"].clone()
    other[1, :10] = torch.randint(4, 64, (10,), generator=torch.Generator().manual_seed(5))
    t5 = name.startswith("t5")

    def logits(ids: torch.Tensor) -> torch.Tensor:
        inputs = {**batch, "input_ids": ids, "attention_mask": mask} | ({} if t5 else {"labels": None})
        with torch.no_grad():
            return model(**inputs).logits

    a, b = logits(batch["input_ids"]), logits(other)
    if t5:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the decoder reads only real encoder rows
    else:
        torch.testing.assert_close(a[1, 10:], b[1, 10:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize("name", ["gpt-lsh-reversible", "t5-reversible"])
def test_reversible_gradients_equal_ordinary_backprop_of_the_same_function(name, monkeypatch):
    """Gradients by reconstruction (float64, dropout on: its masks are replayed) equal autograd's through
    the same two-stream computation, including the T5 relative bias table and the cross attention."""
    batch = batches(name, 1)[0]
    grads = []
    for function in (reversible.reversible_stack, reversible.two_streams):
        monkeypatch.setattr("models.blocks.reversible_stack", function)
        model = build(name).double().train()
        torch.manual_seed(2)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[1].items():
        assert grads[0][n] is not None, n
        torch.testing.assert_close(grads[0][n], g, rtol=1e-9, atol=1e-11, msg=n)


def test_reversible_activation_memory_does_not_grow_with_depth():
    def saved(n_layers: int, reversible_layers: bool) -> int:
        model = build("gpt-lsh", n_layers=n_layers, reversible=reversible_layers).train()
        batch = batches("gpt-lsh", 1)[0]
        total, seen = 0, set()
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen and t.untyped_storage().data_ptr() not in params:
                seen.add(key)
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss  # what the forward keeps for backward
        loss.backward()
        return total

    assert saved(6, True) == saved(2, True)
    assert saved(6, False) > 2 * saved(2, False)


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("gpt-tiny", dict(attention="linformer"), "'linformer' is not causal"),
        ("t5-tiny", dict(attention="linformer"), "relative position bias"),
        ("t5-tiny", dict(attention="lsh"), "shared query-key"),
        ("bert-tiny", dict(reversible=True), "post-norm"),
        ("bert-tiny", dict(attention="sparse"), "needs attention_window"),
        ("bert-tiny", dict(attention_global=2), "attention_global applies to attention='sparse' only"),
        ("gpt-tiny", dict(attention="lsh", attention_window=8), "attention_window does not apply"),
        (
            "gpt-tiny",
            dict(attention="sparse", attention_window=8, attention_dropout=0.1),
            "no attention dropout",
        ),
        ("bert-tiny", dict(attention="linformer", linformer_k=0), "linformer_k must be >= 1"),
        ("gpt-tiny", dict(attention="lsh", lsh_n_hashes=0), "lsh_n_hashes must be >= 1"),
    ],
)
def test_config_refusals_name_the_field(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config(preset, **overrides)


@pytest.mark.parametrize("name", ["bert-linformer", "gpt-lsh", "t5-reversible"])
def test_export_to_transformers_is_refused_in_one_line(name):
    with pytest.raises(ValueError, match=r"to_hf: (attention=.*|reversible layers) has no \w+ equivalent"):
        models.to_hf(build(name))


@pytest.mark.parametrize("name", ["bert-sparse", "bert-linformer", "gpt-lsh"])
def test_bf16_autocast_trains(name):
    """Under autocast the kernels accumulate in fp32 (as the chunked one): finite loss and gradients."""
    model = build(name, n_layers=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batches(name, 1)[0]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )

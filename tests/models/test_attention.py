"""`attend`: every backend equals the eager reference, and eager equals attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention import attend, resolve_backend
from models.kernels.bias import RelativeBias


def qkv(b: int = 2, h: int = 3, lq: int = 7, lk: int = 7, d: int = 5, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for n in (lq, lk, lk)]


def by_hand(q, k, v, *, causal, padding, bias, window, scale):
    """Loops over (batch, head, query), no masking tricks: the definition of the semantics."""
    b, h, lq, d = q.shape
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                keys = [
                    j
                    for j in range(k.shape[2])
                    if (padding is None or padding[bi, j])
                    and (not causal or j <= i)
                    and (window is None or abs(i - j) < window)
                ]
                if not keys:
                    continue
                s = torch.stack([(q[bi, hi, i] @ k[bi, hi, j]) * scale for j in keys])
                if bias is not None:
                    s = s + torch.stack([bias[0, hi, i, j] for j in keys])
                out[bi, hi, i] = torch.softmax(s, 0) @ v[bi, hi, keys]
    return out


def relative_bias(h: int, *, bidirectional: bool) -> RelativeBias:
    torch.manual_seed(1)
    table = torch.randn(8, h, dtype=torch.float64, requires_grad=True)
    return RelativeBias(table=table, bidirectional=bidirectional, num_buckets=8, max_distance=6)


PADDING = torch.tensor(
    [[1, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
)  # row 2: no keys

SETTINGS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "padding-fully-masked-row": dict(key_padding_mask=PADDING),
    "causal-padding": dict(causal=True, key_padding_mask=PADDING),
    "window": dict(window=3),
    "causal-window-padding": dict(causal=True, window=4, key_padding_mask=PADDING),
    "t5-bias-encoder": dict(bias="bidirectional", scale=1.0),
    "t5-bias-decoder-padding": dict(bias="causal", causal=True, scale=1.0, key_padding_mask=PADDING),
    "dense-bias": dict(bias="dense"),
    "cross": dict(lq=5),
    "cross-causal-longer-queries": dict(lq=12, causal=True),
}


def make_inputs(setting: dict):
    s = dict(setting)
    q, k, v = qkv(lq=s.pop("lq", 9), lk=9)
    bias = s.pop("bias", None)
    if bias == "dense":
        s["bias"] = torch.randn(1, 3, q.shape[2], 9, dtype=torch.float64, requires_grad=True)
    elif bias is not None:
        s["bias"] = relative_bias(3, bidirectional=bias == "bidirectional")
    return q, k, v, s


def bias_leaf(bias):
    return bias.table if isinstance(bias, RelativeBias) else bias


@pytest.mark.parametrize("name", list(SETTINGS))
def test_eager_equals_attention_by_hand(name: str) -> None:
    q, k, v, kw = make_inputs(SETTINGS[name])
    bias = kw.get("bias")
    dense = bias.dense(q.shape[2], 9) if isinstance(bias, RelativeBias) else bias
    expected = by_hand(
        q, k, v, causal=kw.get("causal", False), padding=kw.get("key_padding_mask"), bias=dense,
        window=kw.get("window"), scale=kw.get("scale", 1 / math.sqrt(q.shape[-1])),
    )  # fmt: skip
    torch.testing.assert_close(attend(q, k, v, backend="eager", **kw), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_backends_equal_eager_in_float64(name: str, backend: str) -> None:
    q, k, v, kw = make_inputs(SETTINGS[name])
    leaves = [q, k, v] + ([bias_leaf(kw["bias"])] if "bias" in kw else [])
    ref = attend(q, k, v, backend="eager", **kw)
    ref_grads = torch.autograd.grad((ref * torch.cos(ref)).sum(), leaves)
    out = attend(q, k, v, backend=backend, **kw)
    grads = torch.autograd.grad((out * torch.cos(out)).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    if "key_padding_mask" in kw:
        assert torch.all(out[1] == 0)  # the second row has no visible key at all
        assert all(torch.isfinite(g).all() for g in grads)


def test_auto_picks_fused_sdpa_without_learned_bias_else_chunked() -> None:
    table = torch.zeros(8, 2, requires_grad=True)
    rel = RelativeBias(table=table, bidirectional=True, num_buckets=8, max_distance=6)
    assert resolve_backend("auto", bias=None, window=None, dropout_p=0.0) == "sdpa"
    assert resolve_backend("auto", bias=torch.zeros(1, 2, 3, 3), window=None, dropout_p=0.0) == "sdpa"
    assert resolve_backend("auto", bias=rel, window=None, dropout_p=0.0) == "chunked"
    assert resolve_backend("auto", bias=None, window=16, dropout_p=0.0) == "chunked"
    assert resolve_backend("auto", bias=rel, window=None, dropout_p=0.1) == "sdpa"  # chunked has no dropout


def test_unknown_backend_is_a_clear_error() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attend(q, k, v, backend="flash")


def test_attention_block_reaches_the_chunked_kernel_and_keeps_the_output(monkeypatch) -> None:
    """`attention_block` in a model config sets the chunked kernel's tiles; the numbers do not change."""
    import models
    import models.attention as attention_module

    seen: list[tuple] = []
    kernel = attention_module.chunked_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("q_block"), kwargs.get("k_block")))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention_module, "chunked_attention", spy)
    ids = torch.randint(4, 100, (2, 40))
    labels = torch.randint(4, 100, (2, 9))
    outputs = {}
    for block in (None, 16):
        torch.manual_seed(0)
        model = models.build_model("t5-tiny", vocab_size=100, n_layers=1, attention_block=block).double()
        seen.clear()
        outputs[block] = model(input_ids=ids, labels=labels).logits
        assert seen and set(seen) == {(block, block)}  # encoder, decoder self attention: chunked (T5 bias)
    assert torch.allclose(outputs[None], outputs[16], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="attention_block must be >= 1"):
        models.build_model("t5-tiny", attention_block=0)

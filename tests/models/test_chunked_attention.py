"""The chunked attention kernel equals a float64 reference that materialises the scores, and keeps O(n) memory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models.attention import attend
from models.kernels import chunked
from models.kernels.bias import PositionScores, RelativeBias, relative_shift
from models.kernels.chunked import _Tiling, chunked_attention

H, D = 3, 8
NUM_BUCKETS, MAX_DISTANCE = 16, 20  # lengths up to 70 reach far past max_distance


def reference(q, k, v, *, causal=False, key_padding_mask=None, bias=None, window=None, scale=None):
    """Textbook attention: full score matrix, a query with no visible key gives 0."""
    lq, lk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if isinstance(bias, RelativeBias | PositionScores):
        s = s + bias.dense(lq, lk).to(s.dtype)
    elif bias is not None:
        s = s + bias.to(s.dtype)
    offset = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
    keep = torch.ones(lq, lk, dtype=torch.bool).expand(q.shape[0], 1, lq, lk)
    if causal:
        keep = keep & (offset <= 0)
    if window is not None:
        keep = keep & (offset.abs() < window)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~keep, -math.inf).masked_fill(empty, 0.0), dim=-1) * keep
    return (p.to(v.dtype) @ v).to(q.dtype)


def make_qkv(b, lq, lk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, H, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (lq, lk, lk)]


def padding(b, lk, seed=1, fully_masked_row=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, lk, generator=g) > 0.3
    mask[:, 0] = True
    if fully_masked_row is not None:
        mask[fully_masked_row] = False
    return mask


def t5_bias(bidirectional, seed=2):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(NUM_BUCKETS, H, generator=g, dtype=torch.float64)
    return RelativeBias(
        table=table, bidirectional=bidirectional, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE
    )


CASES = {
    "bidirectional": dict(lq=37, lk=37),
    "causal": dict(lq=37, lk=37, causal=True),
    "cross": dict(lq=19, lk=45, pad=True),
    "cross_causal_long_q": dict(lq=45, lk=19, causal=True),
    "padding_fully_masked_row": dict(lq=30, lk=30, pad=True, dead_row=1),
    "causal_padding": dict(lq=33, lk=33, causal=True, pad=True, dead_row=0),
    "window": dict(lq=41, lk=41, window=7),
    "window_causal_padding": dict(lq=41, lk=41, window=5, causal=True, pad=True),
    "window_cross_empty_rows": dict(lq=40, lk=12, window=4),
    "t5_bidirectional": dict(lq=70, lk=70, t5="bi", pad=True),
    "t5_causal": dict(lq=70, lk=70, t5="causal", causal=True),
    "t5_cross_window": dict(lq=50, lk=64, t5="bi", window=20),
    "dense_bias_full": dict(lq=29, lk=23, dense=(1, H, 29, 23), pad=True),
    "dense_bias_broadcast": dict(lq=29, lk=29, dense=(2, 1, 1, 29), causal=True),
    "dense_bias_2d": dict(lq=21, lk=26, dense=(21, 26)),
    "position_padding": dict(lq=37, lk=37, position=True, pad=True, dead_row=1),
    "position_cross": dict(lq=19, lk=45, position=True, pad=True),
    "position_causal_window": dict(lq=41, lk=41, position=True, causal=True, window=9),
}


def position_scores(b, lq, lk, seed=5):
    """Transformer-XL's position term: a query per head and position, encodings of lq + lk - 1 offsets."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, H, lq, D, generator=g, dtype=torch.float64)
    positions = torch.randn(H, lq + lk - 1, D, generator=g, dtype=torch.float64)
    return PositionScores(query=query, positions=positions, scale=D**-0.5)


def build_case(
    lq, lk, causal=False, pad=False, dead_row=None, window=None, t5=None, dense=None, position=False
):
    b = 2
    q, k, v = make_qkv(b, lq, lk)
    kwargs = dict(causal=causal, window=window, scale=None)
    if pad or dead_row is not None:
        kwargs["key_padding_mask"] = padding(b, lk, fully_masked_row=dead_row)
    if t5 is not None:
        kwargs["bias"] = t5_bias(bidirectional=t5 == "bi")
        kwargs["scale"] = 1.0
    if dense is not None:
        kwargs["bias"] = torch.randn(dense, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if position:
        kwargs["bias"] = position_scores(b, lq, lk)
    return q, k, v, kwargs


def grad_leaves(q, k, v, kwargs):
    leaves = [t.requires_grad_() for t in (q, k, v)]
    bias = kwargs.get("bias")
    if isinstance(bias, RelativeBias):
        leaves.append(bias.table.requires_grad_())
    elif isinstance(bias, PositionScores):
        leaves += [bias.query.requires_grad_(), bias.positions.requires_grad_()]
    elif bias is not None:
        leaves.append(bias.requires_grad_())
    return leaves


@pytest.mark.parametrize("blocks", [(8, 16), (7, 5), (64, 64)], ids=["8x16", "7x5", "one_tile"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_float64_reference(case, blocks):
    q, k, v, kwargs = build_case(**CASES[case])
    leaves = grad_leaves(q, k, v, kwargs)
    out = chunked_attention(q, k, v, q_block=blocks[0], k_block=blocks[1], **kwargs)
    ref = reference(q, k, v, **kwargs)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)

    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, leaves, upstream)
    want = torch.autograd.grad(ref, leaves, upstream)
    for name, g, w in zip(["q", "k", "v", "bias", "positions"], got, want):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize(
    "case", ["causal_padding", "window_cross_empty_rows", "t5_causal", "dense_bias_full", "position_padding"]
)
def test_matches_the_eager_backend_of_attend(case, monkeypatch):
    """The same check against the models' own reference backend, through the public dispatcher."""
    monkeypatch.setattr(chunked, "DEFAULT_Q_BLOCK", 8)  # several tiles even at these small lengths
    monkeypatch.setattr(chunked, "DEFAULT_K_BLOCK", 11)
    q, k, v, kwargs = build_case(**CASES[case])
    leaves = grad_leaves(q, k, v, kwargs)
    out = attend(q, k, v, backend="chunked", **kwargs)
    ref = attend(q, k, v, backend="eager", **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for g, w in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_fully_masked_rows_give_zero_output_and_zero_grads():
    q, k, v, kwargs = build_case(lq=16, lk=16, pad=True, dead_row=1)
    q.requires_grad_()
    out = chunked_attention(q, k, v, q_block=4, k_block=4, **kwargs)
    assert out[1].abs().max().item() == 0.0
    (grad_q,) = torch.autograd.grad(out.sum(), [q])
    assert grad_q[1].abs().max().item() == 0.0
    assert grad_q[0].abs().max().item() > 0.0


def test_t5_bias_past_max_distance_uses_the_far_buckets():
    """Offsets up to +-69 with max_distance 20: the farthest bucket on each side gets gradient."""
    q, k, v, kwargs = build_case(lq=70, lk=70, t5="bi")
    table = kwargs["bias"].table.requires_grad_()
    chunked_attention(q, k, v, q_block=16, k_block=16, **kwargs).sum().backward()
    far_past, far_future = NUM_BUCKETS // 2 - 1, NUM_BUCKETS - 1
    assert table.grad[far_past].abs().sum() > 0 and table.grad[far_future].abs().sum() > 0


def test_gradcheck_tiny():
    """Finite differences on (B, H, D) = (2, 2, 3), several tiles, padding with a fully masked row."""

    def tiny(lq, lk):
        q, k, v = make_qkv(2, lq, lk)
        return [t[:, :2, :, :3].detach().requires_grad_() for t in (q, k, v)]

    mask = torch.tensor([[True, True, False, True, True], [False] * 5])
    rule = t5_bias(bidirectional=True)
    table = rule.table[:, :2].detach().requires_grad_()

    def f(q, k, v, table):
        bias = dataclasses.replace(rule, table=table)
        return chunked_attention(q, k, v, bias=bias, key_padding_mask=mask, q_block=4, k_block=3)

    assert torch.autograd.gradcheck(f, [*tiny(6, 5), table])

    dense = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def g(q, k, v, dense):
        return chunked_attention(q, k, v, causal=True, window=3, bias=dense, q_block=2, k_block=2)

    assert torch.autograd.gradcheck(g, [*tiny(5, 5), dense])


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_error_within_twice_eager_bf16(causal):
    q, k, v = (t * 2 for t in make_qkv(2, 256, 256, seed=5))  # larger scores make rounding matter
    q16, k16, v16 = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_() for t in (q16, k16, v16))
    upstream = torch.randn(2, H, 256, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def run(fn, leaves):
        out = fn(*leaves, causal=causal)
        grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
        return [t.double() for t in (out, *grads)]

    exact = run(reference, [q64, k64, v64])
    eager = run(reference, [q16, k16, v16])
    chunked = run(lambda *t, **kw: chunked_attention(*t, q_block=64, k_block=96, **kw), [q16, k16, v16])
    assert chunked[0].dtype == torch.float64  # (converted) and the kernel returned bf16:
    assert chunked_attention(q16, k16, v16).dtype == torch.bfloat16
    for name, c, e, x in zip(["out", "dq", "dk", "dv"], chunked, eager, exact):
        err_chunked = (c - x).abs().max().item()
        err_eager = (e - x).abs().max().item()
        assert err_chunked <= 2 * err_eager, f"{name}: chunked {err_chunked:.3g} vs eager {err_eager:.3g}"


def saved_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn(*args)` runs."""
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


@pytest.mark.parametrize("bias_kind", [None, "t5", "position"])
def test_saved_memory_is_linear_in_length(bias_kind):
    def run(length):
        q, k, v = (t.float().requires_grad_() for t in make_qkv(1, length, length))
        bias = None
        if bias_kind == "t5":
            rule = t5_bias(True)
            bias = dataclasses.replace(rule, table=rule.table.float().requires_grad_())
        if bias_kind == "position":
            terms = position_scores(1, length, length)
            bias = PositionScores(
                query=terms.query.float().requires_grad_(),
                positions=terms.positions.float().requires_grad_(),
                scale=terms.scale,
            )
        chunked = saved_bytes(lambda: chunked_attention(q, k, v, causal=True, bias=bias, scale=1.0))
        eager = saved_bytes(lambda: reference(q, k, v, causal=True, bias=bias, scale=1.0))
        return chunked, eager

    (c1, e1), (c2, e2) = run(512), run(1024)
    assert 1.9 < c2 / c1 < 2.1, (c1, c2)
    assert e2 / e1 > 3.5, (e1, e2)  # the reference really is quadratic, so the measurement can tell
    assert c2 < e2 / 20


def test_relative_shift_reads_offset_i_minus_j_for_any_shape():
    """Lq = 2, Lk = 3: columns hold offsets i - j = 1, 0, -1, -2; entry (i, j) is column 1 - i + j."""
    scores = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]])
    assert relative_shift(scores).tolist() == [[11, 12, 13], [20, 21, 22]]


def test_window_visits_only_tiles_near_the_diagonal():
    """Out-of-window tiles are skipped, so the work is O(n * w), not O(n^2)."""
    tiling = _Tiling(q_len=4096, k_len=4096, q_block=128, k_block=128, causal=False, window=64)
    visited = sum(ke - ks for qs, qe in tiling.query_blocks() for _, ks, ke in tiling.key_blocks(qs, qe))
    assert visited == 32 * (128 + 2 * 63) - 2 * 63  # each block sees its rows +- (w - 1), clipped at the ends
    causal = _Tiling(q_len=4096, k_len=4096, q_block=128, k_block=128, causal=True, window=None)
    visited = sum(ke - ks for qs, qe in causal.query_blocks() for _, ks, ke in causal.key_blocks(qs, qe))
    assert visited == sum(128 * (i + 1) for i in range(32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key_padding_mask=torch.ones(2, 9)), "key_padding_mask"),
        (dict(bias=torch.zeros(2, H, 5, 7)), "does not broadcast"),
        (dict(bias="t5"), "bias must be"),
        (dict(window=0), "window"),
        (dict(q_block=-1), "q_block"),
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    q, k, v = make_qkv(2, 8, 8)
    with pytest.raises(ValueError, match=match):
        chunked_attention(q, k, v, **kwargs)


def test_compiled_callers_run_the_kernel_eagerly():
    """torch.compile traces around the kernel (a graph break) instead of unrolling its tile loops."""
    q, k, v, kwargs = build_case(**CASES["t5_causal"])
    weight = torch.randn(D, D, dtype=torch.float64)

    def f(q, k, v):
        return chunked_attention(q @ weight, k, v, q_block=16, k_block=16, **kwargs).tanh()

    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(q, k, v).graph_break_count == 1
    torch.testing.assert_close(torch.compile(f, backend="eager")(q, k, v), f(q, k, v), rtol=0, atol=0)

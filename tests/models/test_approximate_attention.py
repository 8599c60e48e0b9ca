"""The approximate backends (sparse, linformer, lsh) against exact attention where they must equal it, against
a dense reference of their own pattern elsewhere, and against transformers' Reformer LSH attention."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention import attend
from models.config import ATTENTION_BACKENDS
from models.kernels.bias import RelativeBias
from models.kernels.linformer import LinformerProjections
from models.kernels.lsh import LSHSettings, default_buckets, hash_buckets, lsh_attention, normalize_keys
from models.kernels.sparse import SparsePattern, _SparseTiling, sparse_attention

H, D = 3, 8


def qkv(b: int, length: int, *, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, H, length, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def padding(b: int, length: int, *, empty_row: bool = False) -> torch.Tensor:
    """Row 0 keeps all keys but the last 3, row 1 every third one masked (or, `empty_row`, all masked)."""
    keep = torch.ones(b, length, dtype=torch.bool)
    keep[0, -3:] = False
    keep[1, ::3] = False
    if empty_row:
        keep[1] = False
    return keep


def masked_reference(q, k, v, visible, *, scale, bias=None):
    """Softmax over the visible (query, key) pairs only; a query that sees nothing outputs 0."""
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    empty = ~visible.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~visible, -math.inf).masked_fill(empty, 0.0), dim=-1) * visible
    return p @ v


def grads(out, leaves):
    return torch.autograd.grad((out * torch.cos(out)).sum(), leaves)


def assert_same(out, ref, leaves, tol=1e-10):
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for g, r in zip(grads(out, leaves), grads(ref, leaves)):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `fn()` runs."""
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_the_backend_list_is_defined_once_and_dispatched() -> None:
    from models import attention

    assert attention.ATTENTION_BACKENDS is ATTENTION_BACKENDS  # imported, not redefined
    assert set(ATTENTION_BACKENDS) == {"auto"} | set(attention._KERNELS) | set(attention._APPROXIMATE)


# ---------------------------------------------------------------- sparse


def sparse_visible(length: int, *, window, global_tokens, causal, keep=None, random=None, k_block=None):
    """The pattern written out: |i - j| < w, or i or j global, or j in a random block of i's query block."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    vis = ((i - j).abs() < window) | (i < global_tokens) | (j < global_tokens)
    for (qs, qe), blocks in (random or {}).items():
        for b in blocks:
            vis[qs:qe, b * k_block : (b + 1) * k_block] = True
    if causal:
        vis &= j <= i
    vis = vis[None, None]
    return vis if keep is None else vis & keep[:, None, None, :]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("global_tokens", [0, 1, 5])
def test_sparse_with_a_window_covering_the_sequence_is_exact(causal, pad, global_tokens):
    q, k, v = qkv(2, 37)
    keep = padding(2, 37, empty_row=True) if pad else None
    pattern = SparsePattern(global_tokens=global_tokens, random_blocks=2)
    out = sparse_attention(
        q, k, v, causal=causal, key_padding_mask=keep, window=37, pattern=pattern, q_block=8, k_block=8
    )
    ref = attend(q, k, v, causal=causal, key_padding_mask=keep, backend="eager")
    assert_same(out, ref, [q, k, v])
    if pad:
        assert torch.all(out[1] == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "window, global_tokens, random_blocks, block",
    [(4, 0, 0, 8), (3, 2, 0, 8), (5, 3, 2, 8), (2, 11, 1, 4), (6, 0, 3, 5)],
)
def test_sparse_equals_its_pattern_written_out(causal, window, global_tokens, random_blocks, block):
    length = 45
    q, k, v = qkv(2, length, seed=1)
    keep = padding(2, length)
    pattern = SparsePattern(global_tokens=global_tokens, random_blocks=random_blocks, seed=7)
    tiling = _SparseTiling(
        q_len=length, k_len=length, q_block=block, k_block=block, causal=causal, window=window,
        global_tokens=global_tokens, random_blocks=random_blocks, seed=7,
    )  # fmt: skip
    random = {(qs, qe): tiling.random_keys(qs, qe) for qs, qe in tiling.query_blocks() if qe > global_tokens}
    if random_blocks:
        assert any(random.values())  # the case does exercise random blocks
    out = sparse_attention(
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=keep,
        window=window,
        pattern=pattern,
        q_block=block,
        k_block=block,
    )
    vis = sparse_visible(
        length,
        window=window,
        global_tokens=global_tokens,
        causal=causal,
        keep=keep,
        random=random,
        k_block=block,
    )
    assert_same(out, masked_reference(q, k, v, vis, scale=D**-0.5), [q, k, v])


def test_sparse_with_a_t5_bias_and_gradient_into_the_table():
    q, k, v = qkv(2, 30, seed=2)
    table = torch.randn(16, H, dtype=torch.float64, requires_grad=True)
    rel = RelativeBias(table=table, bidirectional=True, num_buckets=16, max_distance=20)
    pattern = SparsePattern(global_tokens=2)
    out = sparse_attention(q, k, v, bias=rel, window=4, scale=1.0, pattern=pattern, q_block=8, k_block=8)
    vis = sparse_visible(30, window=4, global_tokens=2, causal=False)
    ref = masked_reference(q, k, v, vis, scale=1.0, bias=rel.dense(30, 30))
    assert_same(out, ref, [q, k, v, table])


def test_sparse_visits_only_the_pattern_and_draws_random_blocks_from_the_seed():
    def tiling(seed):
        return _SparseTiling(
            q_len=4096, k_len=4096, q_block=128, k_block=128, causal=False, window=64,
            global_tokens=16, random_blocks=2, seed=seed,
        )  # fmt: skip

    t = tiling(0)
    visits = [(qs, qe, ks, ke) for qs, qe in t.query_blocks() for _, ks, ke in t.key_blocks(qs, qe)]
    per_query = {}
    for qs, qe, ks, ke in visits:
        per_query.setdefault((qs, qe), []).append((ks, ke))
    for pieces in per_query.values():
        keys = [j for ks, ke in pieces for j in range(ks, ke)]
        assert len(keys) == len(set(keys)), "a key visited twice by one query block"
    visited = sum(ke - ks for _, _, ks, ke in visits)
    n = 4096
    # global rows see all keys; other blocks: their band, the global keys and 2 random blocks.
    assert visited <= 16 * n + n * (128 + 2 * 63 + 16 + 2 * 128)
    assert visited < n * n / 8
    assert t.random_keys(16, 144) == tiling(0).random_keys(16, 144) != tiling(1).random_keys(16, 144)


def test_sparse_saved_memory_is_linear_in_length():
    def run(length):
        q, k, v = (t.float().detach().requires_grad_() for t in qkv(1, length))
        pattern = SparsePattern(global_tokens=4, random_blocks=1)
        return saved_bytes(lambda: sparse_attention(q, k, v, window=64, pattern=pattern, causal=True))

    assert 1.9 < run(2048) / run(1024) < 2.1


# ---------------------------------------------------------------- linformer


def identity(length: int) -> LinformerProjections:
    eye = torch.eye(length, dtype=torch.float64, requires_grad=True)
    return LinformerProjections(keys=eye, values=eye)


@pytest.mark.parametrize("pad", [None, "padding", "empty-row"])
def test_linformer_with_k_equal_l_and_identity_projections_is_exact(pad):
    q, k, v = qkv(2, 23)
    keep = None if pad is None else padding(2, 23, empty_row=pad == "empty-row")
    out = attend(q, k, v, key_padding_mask=keep, backend="linformer", options=identity(23))
    assert_same(out, attend(q, k, v, key_padding_mask=keep, backend="eager"), [q, k, v])
    if pad == "empty-row":
        assert torch.all(out[1] == 0)


def test_linformer_attends_to_the_projected_keys_and_values():
    """With learned projections and padding: softmax(q (E k)^T) (F v), padded rows of k and v zeroed first,
    shorter sequences using the first L columns; gradients reach the projections."""
    q, k, v = qkv(2, 20, seed=3)
    g = torch.Generator().manual_seed(4)
    e, f = (torch.randn(6, 32, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    keep = padding(2, 20)
    out = attend(q, k, v, key_padding_mask=keep, backend="linformer", options=LinformerProjections(e, f))
    z = keep[:, None, :, None].double()
    kp, vp = e[:, :20] @ (k * z), f[:, :20] @ (v * z)
    ref = torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(D), -1) @ vp
    assert_same(out, ref, [q, k, v, e, f])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(causal=True), "'linformer' is not causal"),
        (dict(lk=9), "self attention"),
        (dict(window=3), "no bias and no window"),
        (dict(bias=torch.zeros(1, H, 12, 12)), "no bias and no window"),
        (dict(options=None), "needs the layer's projections"),
        (dict(max_len=8), "exceeds the projections' max length 8"),
    ],
)
def test_linformer_refusals_are_one_line(kwargs, match):
    kwargs = dict(kwargs)
    q, k, v = qkv(1, 12)
    lk = kwargs.pop("lk", None)
    if lk is not None:
        k, v = k[:, :, :lk], v[:, :, :lk]
    eye = torch.eye(kwargs.pop("max_len", 12), dtype=torch.float64)
    kwargs.setdefault("options", LinformerProjections(eye, eye))
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, backend="linformer", **kwargs)


# ---------------------------------------------------------------- lsh


def self_score_bias(length: int) -> torch.Tensor:
    """Reformer's rule as a dense bias: a query's own key scores -1e5 (so it wins only when alone)."""
    return torch.diag(torch.full((length,), -1e5, dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_lsh_with_one_bucket_is_exact_attention_over_normalised_keys(causal, pad, n_hashes):
    q, _, v = qkv(2, 19)
    keep = padding(2, 19, empty_row=True) if pad else None
    settings = LSHSettings(n_hashes=n_hashes, bucket_size=19, n_buckets=1)
    out = attend(q, q, v, causal=causal, key_padding_mask=keep, backend="lsh", options=settings)
    # The self score replaces the dot product; exp(-1e5) is 0 in float64 unless the query is alone.
    vis = sparse_visible(19, window=19, global_tokens=0, causal=causal, keep=keep)
    s = (q @ normalize_keys(q).transpose(-1, -2)).masked_fill(torch.eye(19, dtype=torch.bool), -1e5)
    empty = ~vis.any(-1, keepdim=True)
    ref = (torch.softmax(s.masked_fill(~vis, -math.inf).masked_fill(empty, 0.0), -1) * vis) @ v
    assert_same(out, ref, [q, v])
    if pad:
        assert torch.all(out[1] == 0)


def test_lsh_buckets_a_sequence_in_chunks_and_gradchecks():
    q, _, v = qkv(1, 24, seed=5)
    q, v = q.detach()[:, :2, :, :4].requires_grad_(), v.detach()[:, :2, :, :4].requires_grad_()
    settings = LSHSettings(n_hashes=2, bucket_size=4, n_buckets=4, seed=3)
    keep = torch.ones(1, 24, dtype=torch.bool)
    keep[0, -2:] = False
    assert torch.autograd.gradcheck(
        lambda q, v: lsh_attention(q, q, v, causal=True, key_padding_mask=keep, settings=settings), (q, v)
    )


def test_lsh_rotations_come_from_the_seed_not_the_global_rng():
    q, _, _ = qkv(2, 64)
    state = torch.get_rng_state()
    a = hash_buckets(q, n_hashes=2, n_buckets=8, seed=1, keep=None)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(a, hash_buckets(q, n_hashes=2, n_buckets=8, seed=1, keep=None))
    assert not torch.equal(a, hash_buckets(q, n_hashes=2, n_buckets=8, seed=2, keep=None))
    assert default_buckets(1024, 64) == 32 and default_buckets(16384, 64) == (16, 32)


def test_lsh_saved_memory_is_linear_in_length():
    def run(length):
        q, _, v = (t.float().detach().requires_grad_() for t in qkv(1, length))
        settings = LSHSettings(n_hashes=4, bucket_size=32)
        return saved_bytes(lambda: lsh_attention(q, q, v, causal=True, settings=settings))

    small, large = run(1024), run(2048)
    assert 1.9 < large / small < 2.1
    assert large < 40 * 2048 * H * D * 4  # a few copies of q, k, v: no (hashes x L x 2 x chunk) scores


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(other_k=True), "pass k = q"),
        (dict(window=3), "no bias and no window"),
        (dict(dropout_p=0.1), "no attention dropout"),
    ],
)
def test_lsh_refusals_are_one_line(kwargs, match):
    q, k, v = qkv(1, 12)
    k = k if kwargs.pop("other_k", False) else q
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, backend="lsh", **kwargs)


# ---------------------------------------------------------------- transformers' Reformer


def _reformer(causal: bool, n_hashes: int, n_buckets, dtype):
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    cfg = ReformerConfig(
        hidden_size=16, num_attention_heads=2, attention_head_size=8, attn_layers=["lsh"],
        lsh_attn_chunk_length=4, num_hashes=n_hashes, num_buckets=n_buckets, hash_seed=5,
        is_decoder=causal, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=64,
        lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LSHSelfAttention(cfg, layer_idx=0).to(dtype).eval()


@pytest.mark.parametrize(
    "causal, n_hashes, n_buckets, pad",
    [
        (False, 1, 4, False),
        (True, 2, 4, False),
        (False, 4, [2, 4], False),
        (True, 3, 8, True),
        (False, 2, 4, True),
    ],
)
def test_lsh_matches_transformers_reformer(causal, n_hashes, n_buckets, pad):
    """Same weights, same hash seed: same outputs and gradients (positions that are padding excepted:
    transformers lets a padded query attend to itself, ours outputs 0 for a query with no visible key)."""
    hf = _reformer(causal, n_hashes, n_buckets, torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.long)
    if pad:
        mask[1, -5:] = 0
    theirs = hf(x, attention_mask=mask if pad else None).hidden_states

    def split(t):
        return t.view(2, 24, 2, 8).transpose(1, 2)

    qk, v = split(hf.query_key(x)), split(hf.value(x))
    settings = LSHSettings(
        n_hashes=n_hashes,
        bucket_size=4,
        seed=5,
        n_buckets=n_buckets if isinstance(n_buckets, int) else tuple(n_buckets),
    )
    keep = mask.bool() if pad else None
    ours = attend(qk, qk, v, causal=causal, key_padding_mask=keep, backend="lsh", options=settings)
    ours = ours.transpose(1, 2).reshape(2, 24, 16)
    real = mask.bool()[..., None]
    torch.testing.assert_close(ours * real, theirs * real, rtol=1e-10, atol=1e-10)
    leaves = [x, hf.query_key.weight, hf.value.weight]
    for a, b in zip(grads(ours * real, leaves), grads(theirs * real, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

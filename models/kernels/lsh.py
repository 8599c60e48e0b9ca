"""Reformer's LSH attention: shared query-key vectors hashed into buckets, sorted, attended chunk by chunk.

Each of `n_hashes` rounds hashes every vector by a random rotation (bucket = argmax of [xR, -xR]; large
bucket counts are factorised into two hashes, as in transformers), sorts the positions by (round, bucket,
position), cuts the sorted sequence into chunks of `bucket_size`, and lets each chunk attend to itself
and the chunk before it (cyclically, so a round's first chunk sees the previous round's last one, as in
transformers). A query's outputs from all rounds are combined by one softmax over every key it met,
which is what transformers' per-round log-sum-exp weighting computes. Keys are the shared vectors
normalised to unit length (queries are not); a query does not attend to itself unless nothing else is
visible in any round, and then it attends to itself alone (transformers scores itself -1e5, whose
exp is exactly 0 next to any visible key, so the outputs agree); causal and padding masks apply by
original position; padded tokens hash into an extra bucket of their own.

Memory: a custom autograd function keeps only q, k, v, the sort order, the output and one log-sum-exp
per position; forward and backward walk the sorted sequence in slabs of chunks and gather, score and
scatter one slab at a time (the forward in two passes: log-sum-exp per position first, then the
weighted values), so memory is linear in L at any number of hashes, with no L x L or (hashes x L x
2 x bucket_size) tensor kept. Time: O(L log L) for the sort, O(L * bucket_size * n_hashes) for the rest.

The rotations are a fixed function of (seed, shape, dtype): drawn like transformers' with
`hash_seed = seed`, the same at every step and layer, so a recomputed forward (checkpointing, reversible
layers) and a resumed run hash exactly as the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

HIDDEN = 1e30  # a hidden pair's score is pushed below -HIDDEN: exp2 gives exactly 0
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
NORM_EPS = 1e-6  # inside the key normalisation, as transformers' _len_norm
SLAB_SCORES = 1 << 19  # score entries per slab (2 MiB in fp32, as a chunked tile): bounds transients


@dataclass(frozen=True, kw_only=True)
class LSHSettings:
    """What an LSH attention module carries: rounds, chunk length, bucket count, rotation seed."""

    n_hashes: int = 4
    bucket_size: int = 64
    n_buckets: int | tuple[int, int] | None = None  # None: `default_buckets(L, bucket_size)`
    seed: int = 0


def default_buckets(length: int, bucket_size: int) -> int | tuple[int, int]:
    """transformers' rule: about 2 L / bucket_size, a power of 2, factorised in two when large."""
    power = (2 * (length // bucket_size)).bit_length() - 1
    if power < 1:
        return 2
    limit = 2 * max(int((length // bucket_size) ** 0.5), bucket_size)
    if 2**power > limit:
        return (2 ** (power // 2), 2 ** (power - power // 2))
    return 2**power


def _factors(n_buckets: int | tuple[int, ...]) -> tuple[int, ...]:
    factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)
    if any(f < 1 or (f > 1 and f % 2) for f in factors):
        raise ValueError(f"lsh: bucket counts must be even (or 1: no hashing), got {n_buckets}")
    return factors


@lru_cache(maxsize=16)
def _rotations(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H, D, n_hashes, sum(factors) / 2), the numbers `torch.manual_seed(seed); torch.randn(shape)` draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


@torch.no_grad()
def hash_buckets(
    x: Tensor, *, n_hashes: int, n_buckets: int | tuple[int, ...], seed: int, keep: Tensor | None
) -> Tensor:
    """Bucket ids (B, H, n_hashes, L) of the vectors x (B, H, L, D); padded positions (keep False) get an
    extra bucket. Rotated in slices of positions so no (hashes x L x buckets) tensor exists at once."""
    B, H, L, D = x.shape
    factors = _factors(n_buckets)
    total = math.prod(factors)
    buckets = torch.zeros(B, H, n_hashes, L, dtype=torch.long, device=x.device)
    if total > 1:
        rot = _rotations((H, D, n_hashes, sum(factors) // 2), seed, x.dtype, x.device)
        step = max(1, (1 << 22) // max(1, B * H * n_hashes * rot.shape[-1]))
        for s in range(0, L, step):
            rotated = torch.einsum("bhld,hdkr->bhklr", x[:, :, s : s + step], rot)
            ids, offset, scale = 0, 0, 1
            for f in factors:
                part = rotated[..., offset : offset + f // 2]
                ids = ids + scale * torch.cat([part, -part], dim=-1).argmax(dim=-1)
                offset, scale = offset + f // 2, scale * f
            buckets[..., s : s + step] = ids
    if keep is not None and not bool(keep.all()):
        buckets.masked_fill_(~keep[:, None, None, :], total)
    return buckets


@dataclass(frozen=True, kw_only=True)
class _Spec:
    length: int  # L; position L is the sentinel that pads the sorted sequence to whole chunks
    chunk: int
    causal: bool
    scale: float  # natural units; scores are kept in base 2 (times LOG2E) so the softmax uses exp2
    slab: int  # chunks per slab


class _Slab:
    """The sorted chunks [c0, c1) of every sequence: query rows, the keys of the chunk before them and of
    theirs, and the additive mask between them.

    Rows are gathered from (B * H * L, D) inputs; the sentinel position L reads row L - 1 (masked as a key,
    weight 0 as a query) and scatters into one spare row at the end of each accumulator. Masks are
    arithmetic on positions held as floats (exact below 2^24): adding -HIDDEN * (a count >= 1) costs a few
    vectorised passes where a boolean masked_fill over the score tile measured 10x slower.
    """

    def __init__(self, spec: _Spec, order: Tensor, hidden_keys: Tensor, c0: int, c1: int) -> None:
        c, n, L = spec.chunk, c1 - c0, spec.length
        N = order.shape[0]
        qpos = order[:, c0 * c : c1 * c]  # (N, n c) positions in [0, L]
        before = order[:, (c0 - 1) * c : c0 * c] if c0 else order[:, -c:]
        kpos = torch.cat([before, qpos], dim=1)  # (N, (n + 1) c): window t is rows [t c, (t + 2) c)
        base = torch.arange(N, device=order.device)[:, None] * L
        self.q_read, self.k_read = ((p.clamp(max=L - 1) + base).reshape(-1) for p in (qpos, kpos))
        self.q_write, self.k_write = (torch.where(p < L, p + base, N * L).reshape(-1) for p in (qpos, kpos))
        self.qpos = qpos
        self.n, self.c, self.N = n, c, N
        self._qf = qpos.to(hidden_keys.dtype).view(N, n, c, 1)
        self._kf = self.windows(kpos.to(hidden_keys.dtype).unsqueeze(-1)).view(N, n, 1, 2 * c)
        self._key_bias = self.windows(hidden_keys.gather(1, kpos).unsqueeze(-1)).view(N, n, 1, 2 * c)
        self.causal = spec.causal

    def windows(self, rows: Tensor) -> Tensor:
        """(N, (n + 1) c, D) slab key rows -> (N, n, 2c, D): each chunk's previous chunk, then itself."""
        N, n, c = self.N, self.n, self.c
        return torch.cat([rows[:, : n * c].view(N, n, c, -1), rows[:, c:].view(N, n, c, -1)], dim=2)

    def gather(self, rows: Tensor, keys: bool) -> Tensor:
        if keys:
            return self.windows(rows.index_select(0, self.k_read).view(self.N, -1, rows.shape[1]))
        return rows.index_select(0, self.q_read).view(self.N, self.n, self.c, -1)

    def scatter(self, into: Tensor, grads: Tensor, keys: bool) -> None:
        """Add (N, n, c or 2c, D) row gradients into the (B * H * L + 1, D) accumulator."""
        N, n, c = self.N, self.n, self.c
        if not keys:
            into.index_add_(0, self.q_write, grads.reshape(-1, grads.shape[-1]))
            return
        rows = grads.new_zeros(N, (n + 1) * c, grads.shape[-1])  # fold the two windows' overlap first
        rows[:, : n * c] += grads[:, :, :c].reshape(N, n * c, -1)
        rows[:, c:] += grads[:, :, c:].reshape(N, n * c, -1)
        into.index_add_(0, self.k_write, rows.view(-1, rows.shape[-1]))

    def mask(self) -> Tensor:
        """Additive (N, n, c, 2c) mask: 0 where the key is visible, <= -HIDDEN where hidden (padding, the
        sentinel, the future if causal) or where it is the query itself (handled apart: `alone`)."""
        d = self._qf - self._kf  # query position - key position
        if self.causal:
            d.sub_(1.0).clamp_(max=0.0)  # visible iff d >= 1
        else:
            d.abs_().sub_(1.0).clamp_(max=0.0)  # visible iff |d| >= 1
        return d.mul_(HIDDEN).add_(self._key_bias)

    def scores(self, spec: _Spec, q: Tensor, k: Tensor, shift: Tensor | None = None) -> Tensor:
        """Masked base-2 scores (N, n, c, 2c), minus `shift` (N, n, c, 1) per query if given."""
        s = self.mask()
        if shift is not None:
            s.sub_(shift)
        N, n, c = self.N, self.n, self.c
        flat = s.view(N * n, c, 2 * c)
        torch.baddbmm(flat, q.view(N * n, c, -1), k.view(N * n, 2 * c, -1).transpose(1, 2),
                      alpha=spec.scale * LOG2E, out=flat)  # fmt: skip
        return s

    def at(self, per_position: Tensor) -> Tensor:
        """A (B * H, L + 1) per-position value at the slab's query rows, shaped (N, n, c, 1)."""
        return per_position.gather(1, self.qpos).view(self.N, self.n, self.c, 1)


def _slabs(spec: _Spec, order: Tensor):
    n_chunks = order.shape[1] // spec.chunk
    for c0 in range(0, n_chunks, spec.slab):
        yield c0, min(c0 + spec.slab, n_chunks)


def _merged_lse(spec: _Spec, q: Tensor, k: Tensor, order: Tensor, hidden_keys: Tensor) -> Tensor:
    """(B * H, L + 1) base-2 log-sum-exp over every visible key each position met in any round; -inf where
    it met none. Each (query, round) copy's own log-sum-exp first, then merged per position."""
    N, L1 = order.shape[0], spec.length + 1
    lse_max = q.new_full((N, L1), -math.inf)
    copies: list[tuple[Tensor, Tensor]] = []
    for c0, c1 in _slabs(spec, order):
        slab = _Slab(spec, order, hidden_keys, c0, c1)
        s = slab.scores(spec, slab.gather(q, False), slab.gather(k, True))
        top = s.amax(-1, keepdim=True)
        lse = (top + s.sub_(top).exp2_().sum(-1, keepdim=True).log2_()).view(N, -1)
        lse.masked_fill_(top.view(N, -1) < -HIDDEN / 2, -math.inf)  # saw nothing visible
        copies.append((slab.qpos, lse))
        lse_max.scatter_reduce_(1, slab.qpos, lse, "amax")
    shift = lse_max.masked_fill(lse_max == -math.inf, 0.0)
    total = q.new_zeros(N, L1)
    for pos, lse in copies:
        total.scatter_add_(1, pos, (lse - shift.gather(1, pos)).exp2_())
    return shift + total.log2()  # log2(0) = -inf: nothing visible


class _LSHAttention(torch.autograd.Function):
    """q, k, v as (B * H * L, D) rows; `order` (B * H, chunks * chunk) the sorted positions; `keep`
    (B * H, L + 1) the real positions (False: padding and the sentinel)."""

    @staticmethod
    def forward(ctx, q, k, v, order, keep, spec: _Spec):
        hidden_keys = (~keep).to(q.dtype).mul_(-HIDDEN)
        lse = _merged_lse(spec, q, k, order, hidden_keys)
        # A real query that saw no other visible key attends to itself alone (Reformer's rule).
        alone = (lse == -math.inf) & keep
        lse = lse.masked_fill(lse == -math.inf, math.inf)  # so p = exp2(s - lse) = 0 for those rows
        out = v.new_zeros(v.shape[0] + 1, v.shape[1])  # + the sentinel's spare row
        for c0, c1 in _slabs(spec, order):
            slab = _Slab(spec, order, hidden_keys, c0, c1)
            p = slab.scores(spec, slab.gather(q, False), slab.gather(k, True), slab.at(lse)).exp2_()
            slab.scatter(out, torch.matmul(p, slab.gather(v, True)), keys=False)
        alone = alone[:, : spec.length].reshape(-1, 1).to(v.dtype)
        out = out[:-1].addcmul_(alone, v)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, order, keep, out, lse, alone)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, order, keep, out, lse, alone = ctx.saved_tensors
        spec: _Spec = ctx.spec
        N = order.shape[0]
        hidden_keys = (~keep).to(q.dtype).mul_(-HIDDEN)
        # rowsum(dO * O) per position (sentinel column 0), without an (L, D) temporary.
        delta = torch.bmm(grad_out.unsqueeze(1), out.unsqueeze(2)).view(N, -1)
        delta = torch.cat([delta, delta.new_zeros(N, 1)], dim=1)
        dq, dk, dv = (t.new_zeros(t.shape[0] + 1, t.shape[1]) for t in (q, k, v))
        for c0, c1 in _slabs(spec, order):
            slab = _Slab(spec, order, hidden_keys, c0, c1)
            qs, ks, vs = slab.gather(q, False), slab.gather(k, True), slab.gather(v, True)
            do = slab.gather(grad_out, False)
            p = slab.scores(spec, qs, ks, slab.at(lse)).exp2_()
            slab.scatter(dv, torch.matmul(p.transpose(-1, -2), do), keys=True)
            ds = torch.matmul(do, vs.transpose(-1, -2)).sub_(slab.at(delta)).mul_(p).mul_(spec.scale)
            slab.scatter(dq, torch.matmul(ds, ks), keys=False)
            slab.scatter(dk, torch.matmul(ds.transpose(-1, -2), qs), keys=True)
        dv = dv[:-1].addcmul_(alone, grad_out)  # a query alone passes its value through
        return dq[:-1], dk[:-1], dv, None, None, None


def _check(q: Tensor, k: Tensor, key_padding_mask, bias, window, dropout_p: float) -> None:
    if k is not q and (k.shape != q.shape or not torch.equal(k, q)):
        raise ValueError("attention backend 'lsh' shares queries and keys (Reformer): pass k = q")
    if bias is not None or window is not None:
        raise ValueError("attention backend 'lsh' takes no bias and no window")
    if dropout_p > 0.0:
        raise ValueError("attention backend 'lsh' has no attention dropout; set attention_dropout=0")
    if q.dim() != 4:
        raise ValueError(f"lsh_attention: q must be (B, H, L, D), got shape {tuple(q.shape)}")
    B, _, L, _ = q.shape
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, L)
    ):
        raise ValueError(f"lsh_attention: key_padding_mask must be a bool ({B}, {L}) tensor (True = attend)")


def normalize_keys(k: Tensor) -> Tensor:
    """Reformer's keys: the shared vectors at unit length (transformers' _len_and_dim_norm)."""
    return (k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + NORM_EPS)).div_(math.sqrt(k.shape[-1]))


@torch.compiler.disable
def lsh_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    bias: object = None,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    settings: LSHSettings | None = None,
) -> Tensor:
    """LSH self attention, q = k (B, H, L, D) shared query-key vectors, v (B, H, L, Dv) -> (B, H, L, Dv).

    Scores are scale * q . k/|k| (scale None: 1, as Reformer: the keys are normalised). With one bucket
    and bucket_size >= L it is exact attention over the normalised keys with the self-score rule.
    """
    _check(q, k, key_padding_mask, bias, window, dropout_p)
    settings = settings or LSHSettings()
    if settings.n_hashes < 1 or settings.bucket_size < 1:
        raise ValueError(f"lsh_attention: n_hashes and bucket_size must be >= 1, got {settings}")
    B, H, L, D = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    keep = key_padding_mask
    n_buckets = settings.n_buckets or default_buckets(L, settings.bucket_size)
    buckets = hash_buckets(q, n_hashes=settings.n_hashes, n_buckets=n_buckets, seed=settings.seed, keep=keep)
    # Sorted positions, round after round: by bucket, then by position (keys are unique).
    order = (buckets * L + torch.arange(L, device=q.device)).argsort(dim=-1)  # (B, H, hashes, L)
    order = order.reshape(B * H, -1)
    c = settings.bucket_size
    pad = -order.shape[1] % c
    order = torch.cat([order, order.new_full((B * H, pad), L)], dim=1)  # sentinel L: masked, dropped
    keep_ext = torch.ones(B * H, L + 1, dtype=torch.bool, device=q.device)  # real positions
    keep_ext[:, L] = False
    if keep is not None:
        keep_ext[:, :L] = keep.repeat_interleave(H, dim=0)
    spec = _Spec(
        length=L,
        chunk=c,
        causal=causal,
        scale=1.0 if scale is None else float(scale),
        slab=max(1, SLAB_SCORES // (B * H * c * 2 * c)),
    )
    q2, k2, v2 = (t.to(dtype).reshape(B * H * L, -1) for t in (q, normalize_keys(k.to(dtype)), v))
    out = _LSHAttention.apply(q2, k2, v2, order, keep_ext, spec)
    return out.view(B, H, L, -1).to(v.dtype)

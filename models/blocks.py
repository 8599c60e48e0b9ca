"""The building blocks all three families share: embeddings, feed-forward, norms, residual blocks, stacks.

A family file only chooses among these (pre- or post-norm, LayerNorm or RMSNorm, activation, cross
attention) through a `BlockConfig`; no family re-implements a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.attention import ApproximateAttention, CrossAttention, MultiHeadAttention, self_attention
from models.config import ModelConfig
from models.kernels.bias import RelativeBias
from models.reversible import reversible_stack

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Everything one residual block needs to know, and nothing else."""

    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    activation: str
    gated: bool = False
    norm: str = "layer"  # "layer" (LayerNorm) | "rms" (T5's RMSNorm, no bias, no mean)
    norm_eps: float = 1e-5
    bias: bool = True  # biases on the linear layers
    causal: bool = False
    window: int | None = None  # sliding-window self attention
    cross_attention: bool = False
    scale: float | None = None  # None -> 1/sqrt(head_dim)
    dropout: float = 0.0  # on each residual branch
    attention_dropout: float = 0.0
    ff_dropout: float = 0.0  # inside the feed-forward, after the activation (T5)
    attention: str = "auto"
    attention_block: int | None = None  # the chunked kernel's tile size
    approx: ApproximateAttention | None = None  # the approximate backends' settings (None: defaults)
    reversible: bool = False  # pre-norm only: the stack runs as reversible layers (models/reversible.py)

    @classmethod
    def from_model(cls, config: ModelConfig, **overrides: object) -> BlockConfig:
        """The settings every family takes straight from its model config; the family adds the rest."""
        shared: dict[str, object] = dict(
            d_model=config.d_model,
            n_heads=config.n_heads,
            head_dim=config.head_dim,
            d_ff=config.d_ff,
            activation=config.activation,
            norm_eps=config.layer_norm_eps,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            attention=config.attention,
            window=config.attention_window,
            attention_block=config.attention_block,
            approx=ApproximateAttention.from_model(config),
            reversible=config.reversible,
        )
        return cls(**{**shared, **overrides})


def make_norm(cfg: BlockConfig) -> nn.Module:
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class FeedForward(nn.Module):
    """Position-wise MLP. Gated (T5 v1.1): act(x W_gate) * (x W_lin), with both in one fused `up` matmul."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.activation, self.gated = cfg.activation, cfg.gated
        self.up = nn.Linear(cfg.d_model, (2 if cfg.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.ff_dropout)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        h = self.up(x)
        if self.gated:
            gate, linear = h.chunk(2, dim=-1)
            h = act(gate) * linear
        else:
            h = act(h)
        return self.down(self.dropout(h))


def _attention_kwargs(cfg: BlockConfig) -> dict:
    return dict(
        bias=cfg.bias,
        scale=cfg.scale,
        dropout=cfg.attention_dropout,
        backend=cfg.attention,
        block_size=cfg.attention_block,
    )


def _self_attention(cfg: BlockConfig) -> MultiHeadAttention:
    return self_attention(
        cfg.d_model, cfg.n_heads, cfg.head_dim, causal=cfg.causal, window=cfg.window, approx=cfg.approx,
        **_attention_kwargs(cfg),
    )  # fmt: skip


class PreNormBlock(nn.Module):
    """x + f(norm(x)) for self attention, optional cross attention, and the feed-forward (GPT-2, T5).

    `attention` replaces the plain self attention (Swin's window attention); it is called as one.
    """

    def __init__(self, cfg: BlockConfig, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = attention if attention is not None else _self_attention(cfg)
        # None in a block without cross attention (no parameters, so the state dict has no such names).
        self.cross_norm: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if cfg.cross_attention:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.head_dim, **_attention_kwargs(cfg))
        self.ff_norm = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.reversible = cfg.reversible

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        bias: Tensor | RelativeBias | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask, bias=bias))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("a block with cross attention needs the encoder output (context)")
            x = x + self.drop(self.cross_attn(self.cross_norm(x), context, key_padding_mask=context_mask))
        return x + self.drop(self.ff(self.ff_norm(x)))


class PostNormBlock(nn.Module):
    """norm(x + f(x)) for self attention and the feed-forward (BERT)."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        if cfg.cross_attention or cfg.reversible:
            raise ValueError("PostNormBlock has no cross attention and is not reversible")
        self.attn = _self_attention(cfg)
        self.attn_norm = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.ff_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, *, key_padding_mask: Tensor | None = None, bias: Tensor | RelativeBias | None = None
    ) -> Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, key_padding_mask=key_padding_mask, bias=bias)))
        return self.ff_norm(x + self.drop(self.ff(x)))


class Stack(nn.ModuleList):
    """Blocks applied in order; with `gradient_checkpointing`, each block's activations are recomputed
    in the backward pass instead of stored (non-reentrant, so keyword inputs and RNG state are kept).
    Reversible blocks run as one reversible stack instead (`models.reversible`), which needs neither."""

    def __init__(self, blocks: list[nn.Module], *, gradient_checkpointing: bool = False) -> None:
        super().__init__(blocks)
        self.gradient_checkpointing = gradient_checkpointing
        self.reversible = bool(blocks) and all(isinstance(b, PreNormBlock) and b.reversible for b in blocks)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        if self.reversible:
            return reversible_stack(list(self), x, **kwargs)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self:
            x = checkpoint(block, x, use_reentrant=False, **kwargs) if recompute else block(x, **kwargs)
        return x


class _TiedLookup(torch.autograd.Function):
    """Token lookup that also returns the table for the tied head, so that both gradients of the table meet in
    this node's backward.

    Left to autograd, the head's dense V x D gradient arrives first and waits in the table's input buffer; the
    lookup's gradient (sparse: B x L rows) is then added to it out of place, so the table's gradient briefly
    exists twice (bench/NOTES.md, "The tied table's gradient, once"). Here the head reads the returned table, so
    its gradient comes back as this node's second output gradient, and the backward adds the looked-up rows into
    it in place: the table receives one dense gradient, and no second V x D tensor is made.
    """

    @staticmethod
    def forward(ctx, input_ids: Tensor, table: Tensor, padding_idx: int | None) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(input_ids)
        ctx.padding_idx = padding_idx
        ctx.table_shape = table.shape
        ctx.set_materialize_grads(False)  # an unread table's gradient stays None, not a V x D of zeros
        return F.embedding(input_ids, table, padding_idx), table.view_as(table)

    @staticmethod
    def backward(ctx, grad_x: Tensor | None, grad_table: Tensor | None) -> tuple[None, Tensor | None, None]:
        if grad_x is None:
            return None, grad_table, None
        (input_ids,) = ctx.saved_tensors
        index = input_ids.reshape(-1)
        rows = grad_x.reshape(index.numel(), -1)
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient from the lookup
            keep = index != ctx.padding_idx
            index, rows = index[keep], rows[keep]
        if grad_table is None:  # the head did not read this lookup's table (T5's encoder lookup)
            return (
                None,
                torch.sparse_coo_tensor(index.unsqueeze(0), rows, ctx.table_shape, check_invariants=False),
                None,
            )
        # The head's weight gradient is a fresh matmul result that nothing else holds: add into it.
        return None, grad_table.contiguous().index_add_(0, index, rows.to(grad_table.dtype)), None


def vocabulary_logits(x: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int) -> Tensor:
    """`x @ weight.T + bias` over a head whose rows past `vocab_size` pad the vocabulary (`vocab_multiple`).

    Those columns get -inf, added through the bias so that no second logits-sized tensor is made: softmax
    gives them exactly 0, so the loss and every real logit are what an unpadded head computes and the padded
    rows get a zero gradient. The caller computes its loss on these logits and returns `vocabulary_columns`.
    """
    rows = weight.shape[0]
    if rows > vocab_size:
        mask = torch.zeros(rows, dtype=x.dtype if bias is None else bias.dtype, device=x.device)
        mask[vocab_size:] = float("-inf")
        bias = mask if bias is None else bias + mask
    return F.linear(x, weight, bias)


def vocabulary_columns(logits: Tensor, vocab_size: int) -> Tensor:
    """The logits of the real vocabulary: `vocabulary_logits`' own tensor when nothing is padded, else a view."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]


class VocabularyHead(nn.Linear):
    """An untied LM head (no bias) whose rows may pad the vocabulary; padded logits at -inf, as `project`'s."""

    def __init__(self, d_model: int, vocab_size: int, rows: int) -> None:
        super().__init__(d_model, rows, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x: Tensor) -> Tensor:
        return vocabulary_logits(x, self.weight, None, self.vocab_size)  # (..., rows)


class Embeddings(nn.Module):
    """Token embedding (+ token types) (+ absolute positions), then an optional LayerNorm and dropout.

    `tied_head`: the token table is also the model's output projection (`project`), called in every
    forward that looks tokens up, after the lookup; in training it reads the table through the last
    lookup (`_TiedLookup`), so that the table's two gradients are summed in place.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        positions: nn.Module | None = None,
        type_vocab_size: int = 0,
        norm_eps: float | None = None,
        dropout: float = 0.0,
        padding_idx: int | None = None,
        tied_head: bool = False,
        table_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # Rows past the vocabulary pad the table (ModelConfig.vocab_multiple); no token id reaches them.
        self.tokens = nn.Embedding(table_rows or vocab_size, d_model, padding_idx=padding_idx)
        self.tied_head = tied_head
        self.token_types = nn.Embedding(type_vocab_size, d_model) if type_vocab_size else None
        self.positions = positions
        self.norm = nn.LayerNorm(d_model, eps=norm_eps) if norm_eps is not None else None
        self.drop = nn.Dropout(dropout)
        self._head_table: Tensor | None = None  # the table as the last lookup returned it, until `project`

    def lookup_parameters(self) -> list[nn.Parameter]:
        """Parameters used by lookup, not matmul (excluded from FLOPs and `exclude_embeddings` counts)."""
        tables = (self.tokens, self.token_types, self.positions)
        return [p for table in tables if table is not None for p in table.parameters()]

    def project(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """Logits from the token table, the LM head of a model built with `tied_head`: over all its rows, the
        padding ones at -inf (`vocabulary_logits`)."""
        table, self._head_table = self._head_table, None  # dropped here: it would keep the table alive
        weight = self.tokens.weight if table is None else table
        return vocabulary_logits(x, weight, bias, self.vocab_size)  # (..., rows)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        t = self.tokens
        self._head_table = None
        if self.tied_head and torch.is_grad_enabled() and t.weight.requires_grad:
            x, self._head_table = _TiedLookup.apply(input_ids, t.weight, t.padding_idx)  # (B, L, D)
        else:
            x = F.embedding(input_ids, t.weight, t.padding_idx)
        if self.token_types is not None:
            # No ids means type 0 everywhere: add that one row instead of a lookup per token.
            x = x + (
                self.token_types.weight[0] if token_type_ids is None else self.token_types(token_type_ids)
            )
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given to a model without token type embeddings")
        if self.positions is not None:
            x = x + self.positions(input_ids.shape[1], device=input_ids.device).to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)

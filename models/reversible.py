"""Reversible residual layers (RevNet, as Reformer uses them): activation memory independent of depth.

The stream is split in two halves, both starting as the embeddings x. Each pre-norm block maps
y1 = x1 + F(x2), y2 = x2 + G(y1), where F is the block's attention sublayers (self attention, then
cross attention if it has one) and G its feed-forward, and the stack returns (y1 + y2) / 2 so that the
model around it (final norm, head) keeps its width. The backward pass rebuilds each block's inputs from
its outputs (x2 = y2 - G(y1), x1 = y1 - F(x2)) and recomputes F and G to differentiate them, so only
the last block's two outputs are kept, whatever the depth, plus one block's recomputation at a time.

Dropout replays its random numbers (the RNG state before each F and G is recorded in the forward);
the approximate attention backends are deterministic already. The blocks' submodules are called
directly, not through the block's `forward`, so per-block wrappers that hook `forward` (FSDP) do not
see them: reversible layers are for the single-device, DDP and ZeRO engines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models.kernels.bias import RelativeBias


def attention_branch(block: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """F: what a pre-norm block adds for its attention sublayers, as a function of its input."""
    a = block.drop(
        block.attn(
            block.attn_norm(x), key_padding_mask=kwargs.get("key_padding_mask"), bias=kwargs.get("bias")
        )
    )
    cross = getattr(block, "cross_attn", None)
    if cross is None:
        return a
    if kwargs.get("context") is None:
        raise ValueError("a block with cross attention needs the encoder output (context)")
    mask = kwargs.get("context_mask")
    return a + block.drop(cross(block.cross_norm(x + a), kwargs["context"], key_padding_mask=mask))


def ff_branch(block: nn.Module, x: Tensor) -> Tensor:
    """G: what a pre-norm block adds for its feed-forward."""
    return block.drop(block.ff(block.ff_norm(x)))


def two_streams(blocks: list[nn.Module], x: Tensor, **kwargs: Any) -> Tensor:
    """The reversible stack's function, with ordinary autograd: inference, and the tests' reference."""
    x1 = x2 = x
    for block in blocks:
        x1 = x1 + attention_branch(block, x2, kwargs)
        x2 = x2 + ff_branch(block, x1)
    return (x1 + x2) / 2


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replay(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@dataclasses.dataclass(frozen=True)
class _Run:
    """The non-tensor part of one call: blocks, and how to rebuild the keyword inputs from tensors."""

    blocks: list[nn.Module]
    params: list[nn.Parameter]
    kwarg_slots: dict[str, Any]  # name -> ("tensor", i) | ("relative", i, RelativeBias) | ("value", v)

    def kwargs(self, tensors: list[Tensor]) -> dict[str, Any]:
        out = {}
        for name, slot in self.kwarg_slots.items():
            if slot[0] == "tensor":
                out[name] = tensors[slot[1]]
            elif slot[0] == "relative":
                out[name] = dataclasses.replace(slot[2], table=tensors[slot[1]])
            else:
                out[name] = slot[1]
        return out


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, run: _Run, n_tensors: int, *inputs: Tensor) -> Tensor:
        kwargs = run.kwargs(list(inputs[:n_tensors]))
        states = []
        with torch.no_grad():
            x1 = x2 = x
            for block in run.blocks:
                state_f = _rng_state(x.device)
                x1 = x1 + attention_branch(block, x2, kwargs)
                state_g = _rng_state(x.device)
                x2 = x2 + ff_branch(block, x1)
                states.append((state_f, state_g))
        ctx.run, ctx.states, ctx.n_tensors = run, states, n_tensors
        ctx.save_for_backward(x1, x2, *inputs[:n_tensors])
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx, grad: Tensor):
        y1, y2, *tensors = ctx.saved_tensors
        run: _Run = ctx.run
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        wanted = [t for t in leaves if t.requires_grad]
        kwargs = run.kwargs(leaves)
        param_grads: list[Tensor | None] = [None] * len(run.params)
        leaf_grads: list[Tensor | None] = [None] * len(wanted)
        dy1 = dy2 = grad / 2
        for block, (state_f, state_g) in zip(reversed(run.blocks), reversed(ctx.states)):
            with torch.enable_grad(), _replay(state_g, y1.device):
                y1_ = y1.detach().requires_grad_()
                g = ff_branch(block, y1_)
            dy1_g, *dp = torch.autograd.grad(g, [y1_, *run.params], dy2, allow_unused=True)
            dy1 = dy1 + dy1_g
            _accumulate(param_grads, dp)
            x2 = (y2 - g).detach()
            with torch.enable_grad(), _replay(state_f, y1.device):
                x2_ = x2.requires_grad_()
                f = attention_branch(block, x2_, kwargs)
            dx2, *rest = torch.autograd.grad(f, [x2_, *run.params, *wanted], dy1, allow_unused=True)
            _accumulate(param_grads, rest[: len(run.params)])
            _accumulate(leaf_grads, rest[len(run.params) :])
            y1, y2, dy2 = (y1 - f).detach(), x2.detach(), dy2 + dx2
        it = iter(leaf_grads)
        tensor_grads = [next(it) if t.requires_grad else None for t in leaves]
        return (dy1 + dy2, None, None, *tensor_grads, *param_grads)


def _accumulate(into: list[Tensor | None], grads: list[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            into[i] = g if into[i] is None else into[i] + g


def reversible_stack(blocks: list[nn.Module], x: Tensor, **kwargs: Any) -> Tensor:
    """`two_streams(blocks, x, **kwargs)`, differentiated by reconstruction instead of stored activations."""
    params = list({id(p): p for b in blocks for p in b.parameters() if p.requires_grad}.values())
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return two_streams(blocks, x, **kwargs)
    tensors: list[Tensor] = []
    slots: dict[str, Any] = {}
    for name, value in kwargs.items():
        if isinstance(value, Tensor):
            slots[name] = ("tensor", len(tensors))
            tensors.append(value)
        elif isinstance(value, RelativeBias):
            slots[name] = ("relative", len(tensors), value)
            tensors.append(value.table)
        else:
            slots[name] = ("value", value)
    run = _Run(blocks=list(blocks), params=params, kwarg_slots=slots)
    return _ReversibleStack.apply(x, run, len(tensors), *tensors, *params)

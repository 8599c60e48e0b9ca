"""What the bench scripts share: the benchmark shapes, transformers twins of our models, batches shaped
like the data layer's, one training step, and interleaved timing.

Timings on a shared 2-core machine are noisy, so every comparison runs its candidates in one process,
alternating step by step on the same batch, and reports medians.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from models.base import SampleShape

ROOT = Path(__file__).resolve().parents[1]  # the working directory of the scripts' worker processes

FAMILIES = ("gpt", "bert", "t5")


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Model and batch size of one benchmark row."""

    n_layers: int = 6
    d_model: int = 384
    n_heads: int = 6
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model

    @property
    def d_kv(self) -> int:
        return self.d_model // self.n_heads


SMALL = Shape()
QUICK = Shape(n_layers=2, d_model=128, n_heads=4, vocab_size=2048, seq_len=128, batch_size=4)


def hf_model(family: str, shape: Shape) -> nn.Module:
    """A randomly initialised transformers model (no download) with every dropout at 0.

    Dropout is off in both models (ours inherits the zeros through `from_hf`), so the two compute the
    same function and the comparison is of kernels, not of random masks; both stay in train() mode.
    transformers keeps its default attention implementation (SDPA where it has one), as a user would get.
    """
    import transformers as tf

    torch.manual_seed(0)
    s = shape
    if family == "gpt":
        cfg = tf.GPT2Config(
            vocab_size=s.vocab_size, n_positions=s.seq_len, n_embd=s.d_model, n_layer=s.n_layers,
            n_head=s.n_heads, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = tf.BertConfig(
            vocab_size=s.vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads, intermediate_size=s.d_ff, max_position_embeddings=s.seq_len,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return tf.BertForMaskedLM(cfg)
    if family == "t5":
        cfg = tf.T5Config(
            vocab_size=s.vocab_size, d_model=s.d_model, d_kv=s.d_kv, d_ff=s.d_ff, num_layers=s.n_layers,
            num_heads=s.n_heads, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        return tf.T5ForConditionalGeneration(cfg)
    raise ValueError(f"family {family!r}; accepted: {', '.join(FAMILIES)}")


def t5_target_len(seq_len: int) -> int:
    """Targets length the span-corruption objective produces for `seq_len` inputs (15% noise, spans of 3)."""
    from data.objectives import compute_input_and_target_lengths

    return compute_input_and_target_lengths(seq_len, 0.15, 3.0)[1]


def make_batch(family: str, shape: Shape, *, seed: int = 0) -> dict[str, Tensor]:
    """Random ids with the keys and shapes the data layer yields for the family's objective (packed, so
    the attention masks are all ones, as from our loader)."""
    g = torch.Generator().manual_seed(seed)
    b, n, v = shape.batch_size, shape.seq_len, shape.vocab_size
    ids = torch.randint(4, v, (b, n), generator=g)
    if family == "gpt":
        return {"input_ids": ids, "labels": ids.clone()}
    ones = torch.ones(b, n, dtype=torch.long)
    if family == "bert":
        masked = torch.rand(b, n, generator=g) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return {
            "input_ids": ids.masked_fill(masked, 3),
            "token_type_ids": torch.zeros_like(ids),
            "attention_mask": ones,
            "labels": labels,
        }
    labels = torch.randint(4, v, (b, t5_target_len(n)), generator=g)
    return {"input_ids": ids, "attention_mask": ones, "labels": labels}


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device the step runs on, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}; accepted: fp32, bf16")


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer `pretrain train` builds (decay groups, fused AdamW where available)."""
    from pretrain.config import TrainConfig
    from pretrain.engines.optim import build_optimizer

    return build_optimizer(model, TrainConfig(lr=1e-4).optimizer)


def train_step_fn(
    model: nn.Module, batch: dict[str, Tensor], precision: str, optimizer: torch.optim.Optimizer
) -> Callable[[], float]:
    """One full training step as `pretrain train` runs it (forward, backward, gradient clipping to norm
    1.0, AdamW update), as a closure returning the loss."""

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating fn after fn (so load spikes hit all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A fixed-width text table (markdown-compatible, so it pastes into NOTES.md)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def step_flops(model: nn.Module, batch: dict[str, Tensor]) -> float:
    """Training FLOPs of one step on `batch`: the model's own count, told what this batch makes it run
    (BERT's MLM head only at the masked positions, T5's decoder and head over the shorter targets)."""
    b, n = batch["input_ids"].shape
    shape = SampleShape(n)
    if model.config.family == "bert":
        shape = SampleShape(n, predicted_fraction=int((batch["labels"] != -100).sum()) / (b * n))
    elif model.config.family == "t5":
        shape = SampleShape(n, target_len=batch["labels"].shape[1])
    return model.flops_per_token(shape) * b * n

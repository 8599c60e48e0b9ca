"""Helpers for the pretrain tests: tiny run configs and files."""

from __future__ import annotations

from pathlib import Path

# Shrinks any preset run so a CLI run takes seconds on 2 CPU cores (dropout on: RNG state must resume too).
TINY = [
    "model.n_layers=1",
    "model.d_model=64",
    "model.n_heads=2",
    "model.d_ff=128",
    "model.dropout=0.1",
    "model.attention_dropout=0.1",  # T5 exports one dropout_rate
    "data.seq_len=32",
    "data.vocab_size=512",
    "data.tokenizer_train_chars=100000",
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "log.every=1",
    "wandb.mode=disabled",
]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

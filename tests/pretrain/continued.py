"""Continued-pretraining helpers: a run config starting from a source, and transformers' loss on our first batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.common import REPO, subprocess_env

RUN_YAML = """\
model:
  init_from: {source}
data:
  source: builtin
  seq_len: 32
  num_workers: 0
train:
  max_steps: {steps}
  micro_batch_size: 2
  grad_accum: 2
  warmup_steps: 0
  lr: 1.0e-3
checkpoint:
  every: 100
log:
  every: 1
  progress: false
wandb:
  mode: offline
"""


def write_run_config(path: Path, source: Path, steps: int) -> Path:
    path.write_text(RUN_YAML.format(source=source, steps=steps))
    return path


def clean_env() -> dict[str, str]:
    """Single process, no launcher variables, no W&B key (offline mode writes under the run directory)."""
    drop = {"WANDB_API_KEY", "WANDB_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in subprocess_env(OMP_NUM_THREADS="1").items() if k not in drop}


def run_cli(*args: str, timeout: int = 400) -> str:
    """`python -m pretrain ARGS` (or `python -m launch` when args start with "launch"); its stderr."""
    module = "launch" if args and args[0] == "launch" else "pretrain"
    argv = list(args[1:] if module == "launch" else args)
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stderr


@torch.no_grad()
def transformers_first_step_loss(config_path: Path, overrides: list[str], world_size: int = 1) -> float:
    """transformers' mean loss over the micro-batches every rank draws for step 1 of the run `config_path`
    describes (the same loader, seed and tokenizer as the run), from the source model itself."""
    import transformers

    import data
    from models.hf import HF_CLASSES
    from pretrain.config import load_config
    from pretrain.rng import seed_everything

    cfg = load_config(config_path, overrides, check_files=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.run_dir / "tokenizer")
    hf_class = getattr(transformers, HF_CLASSES[cfg.model.family])
    hf = hf_class.from_pretrained(cfg.model.init_from, dtype=torch.float32).eval()
    losses = []
    for rank in range(world_size):
        seed_everything(cfg.train.seed + rank)
        loader = data.build_loader(
            cfg.data,
            objective=cfg.objective,
            tokenizer=tokenizer,
            batch_size=cfg.train.micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed,
            grad_accum=cfg.train.grad_accum,
        )
        batches = iter(loader)
        for _ in range(cfg.train.grad_accum):
            losses.append(hf(**next(batches)).loss.item())
    return sum(losses) / len(losses)


def first_logged_loss(run_dir: Path) -> float:
    from pretrain.logging import read_metrics

    return next(r["loss"] for r in read_metrics(run_dir) if r["step"] == 1)

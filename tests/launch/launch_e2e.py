"""End-to-end helpers: a tiny GPT run config, `launch` subprocesses, and what a run left in its directory.

Every fault test compares its losses step by step with ONE uninterrupted 2-process run of the same config
(the `reference_losses` fixture), so all of them use the same world size (2) and the same `train.max_steps`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.common import REPO

CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "local-cluster.sh"
MAX_STEPS = 40
WORLD_SIZE = 2


def tiny_config(run_dir: Path, tokenizer: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """gpt-tiny cut down to seconds per run on 2 CPU cores; `sections` update the defaults section by section."""
    config: dict[str, Any] = {
        "model": {"preset": "gpt-tiny", "n_layers": 2},
        "data": {
            "source": "builtin",
            "seq_len": 64,
            "vocab_size": 512,
            "tokenizer": str(tokenizer),
            "num_workers": 0,
        },
        "train": {"max_steps": MAX_STEPS, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "seed": 0},
        "engine": {"backend": "ddp"},
        "checkpoint": {"every": 10, "keep": 10},
        "log": {"every": 1, "progress": True},  # a "step N/M" line per step
        "wandb": {"mode": "offline"},  # as users run: W&B's service process lives (and dies) with the job
        "run": {"dir": str(run_dir)},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def train_env() -> dict[str, str]:
    """The environment for training subprocesses: no W&B key, W&B offline (no network), this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


@dataclass(frozen=True)
class Run:
    """What a run left in its directory."""

    dir: Path

    def metrics(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [
            json.loads(line) for line in lines if line.strip().startswith("{") and line.strip().endswith("}")
        ]

    def steps(self) -> list[dict[str, Any]]:
        """Training-step records (those with a loss), in the order they were appended."""
        return [m for m in self.metrics() if "loss" in m and "step" in m]

    def last_step(self) -> int:
        steps = self.steps()
        return steps[-1]["step"] if steps else 0

    def checkpoints(self) -> list[int]:
        root = self.dir / "checkpoints"
        return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*")) if root.exists() else []

    def latest(self) -> str | None:
        path = self.dir / "checkpoints" / "latest"
        return path.read_text().strip() if path.exists() else None


@dataclass(frozen=True)
class Attempt:
    """One start of a run, read from its console output (metrics.jsonl is truncated to the checkpoint on resume)."""

    resumed_from: int  # 0: a fresh start
    steps: list[int]  # the steps it logged, in order


# The loop's start note (rich may wrap it, hence \s+) and its `log.progress` lines, in the order printed.
_EVENT = re.compile(  # console lines start with the time (HH:MM:SS), after torchrun's "[rank]:" when it tees
    r"(?:starting|resuming\s+at\s+step\s+(\d+)),\s+training\s+to\s+step"
    r"|^(?:\[\w+\]:)?\d\d:\d\d:\d\d step (\d+)/\d+\s",
    re.M,
)


def attempts_from_log(text: str) -> list[Attempt]:
    """Split a run's console output into its starts ("starting" / "resuming at step K" notes)."""
    out: list[Attempt] = []
    for event in _EVENT.finditer(text):
        if event.group(2) is None:
            out.append(Attempt(resumed_from=int(event.group(1) or 0), steps=[]))
        elif out:
            out[-1].steps.append(int(event.group(2)))
    return out


def losses_by_step(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run_to_end(cmd: list[str], *, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=train_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def wandb_services(config: Path) -> list[psutil.Process]:
    """The W&B service processes started by the trainer(s) running `config` (found by that file's path)."""
    target = str(config.resolve())
    out: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if target in cmdline and "pretrain" in cmdline and "train" in cmdline:
            try:
                children = process.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            out |= {child.pid: child for child in children if child.name().startswith("wandb-core")}
    return list(out.values())


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, timeout=30)
    return done.returncode == 0

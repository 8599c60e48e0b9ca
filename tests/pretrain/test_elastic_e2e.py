"""Resume at another world size through the CLI (`launch local`): 2 -> 4 -> 2 and 2 -> 1 processes, compared step
by step with the uninterrupted 2-process run, and the data positions at the end identical (no micro-batch lost
or repeated). Per family one engine here (gpt: DDP, bert: FSDP, t5: ZeRO-3) (every engine x family: test_elastic_engines.py); dropout is on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data import merge_states
from pretrain.logging import read_metrics
from tests.common import REPO
from tests.pretrain.helpers import TINY

pytestmark = pytest.mark.slow

STEPS = 6
_straight: dict[str, Path] = {}  # the uninterrupted 2-process run of each family, shared by its tests
REL = 1e-5  # fp32 reduction-order noise
CASES = {
    "gpt": ("configs/gpt-tiny.yaml", "engine.backend=ddp"),
    "bert": ("configs/bert-tiny.yaml", "engine.backend=fsdp"),
    "t5": ("configs/t5-tiny.yaml", "engine.deepspeed.zero_stage=3"),
}


def launch(family: str, run_dir: Path, nproc: int, *extra: str) -> str:
    """`launch local --nproc N` on the tiny config; returns its console output."""
    config, engine = CASES[family]
    args = [config, *TINY, "wandb.mode=offline", "train.schedule=constant", "checkpoint.every=2"]
    args += ["checkpoint.keep=5", engine, f"train.max_steps={STEPS}", f"run.dir={run_dir}", *extra]
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_API_KEY"}
    }
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def cut_at(run_dir: Path, step: int, name: str) -> Path:
    """A copy of a run as it was when its job died right after the step-`step` checkpoint."""
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    for path in (copy / "checkpoints").glob("step_*"):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    (copy / "checkpoints" / "latest").write_text(f"step_{step}")
    return copy


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def data_position(run_dir: Path, step: int) -> tuple[int, dict]:
    """Where every virtual stream stands after `step` (the merge of all ranks' saved states)."""
    path = run_dir / "checkpoints" / f"step_{step}"
    ranks = sorted(path.glob("rank_*/data_state.json"))
    merged = merge_states([json.loads(p.read_text()) for p in ranks])
    return merged["position"], merged["streams"]


def assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= REL * abs(a[step]), (step, a[step], b[step])
    assert a[STEPS] < a[1]  # the numbers compared are real
    assert data_position(straight, STEPS) == data_position(resumed, STEPS)


# (family, world-size changes): gpt all of them, the others one each (a launch costs ~30 s on 2 cores)
CHANGES = [("gpt", "2-1"), ("gpt", "2-4-2"), ("bert", "2-1"), ("t5", "2-4-2")]


@pytest.mark.parametrize(("family", "changes"), CHANGES)
def test_world_size_changes_keep_data_and_losses(family: str, changes: str, tmp_path_factory) -> None:
    straight = _straight.get(family)
    if straight is None:
        straight = _straight[family] = tmp_path_factory.mktemp(family) / "straight"
        launch(family, straight, 2)

    if changes == "2-1":
        shrunk = cut_at(straight, 2, "two-to-one")
        out = launch(family, shrunk, 1)
        assert "resuming at step 2 at world size 1 (was 2), train.grad_accum 2 -> 4" in out
        assert_same_run(straight, shrunk)
        return
    grown = cut_at(straight, 2, "two-to-four-to-two")
    out = launch(family, grown, 4, "train.max_steps=4")  # constant LR: stopping early changes no step
    assert "resuming at step 2 at world size 4 (was 2), train.grad_accum 2 -> 1" in out
    out = launch(family, grown, 2)
    assert "resuming at step 4 at world size 2 (was 4), train.grad_accum 1 -> 2" in out
    assert_same_run(straight, grown)

"""Every engine resumes at another world size: saved by 2 processes, resumed by 1 and by 4 (same global batch),
the losses and gradient norms of every later step equal the uninterrupted 2-process run's up to reduction
order, for each model family. Three torchrun launches cover all cases (tests/pretrain/elastic_worker.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import subprocess_env
from tests.pretrain import elastic_worker as worker

pytestmark = pytest.mark.slow

REL = 1e-5  # fp32 reduction-order noise


def _torchrun(out_dir: Path, nproc: int, phase: str) -> None:
    env = subprocess_env(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(Path(worker.__file__)), str(out_dir), phase, *worker.CASES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("elastic-engines")
    _torchrun(out, 2, "straight")
    _torchrun(out, 1, "resumed")
    _torchrun(out, 4, "resumed")
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


@pytest.mark.parametrize("case", worker.CASES)
@pytest.mark.parametrize("world_size", [1, 4])
def test_resume_at_another_world_size_matches_the_uninterrupted_run(runs: Path, case: str, world_size: int):
    straight = json.loads((runs / f"{case}.straight-2.json").read_text())
    resumed = json.loads((runs / f"{case}.resumed-{world_size}.json").read_text())
    expected = straight["records"][worker.SAVE_AT :]
    assert [r["step"] for r in resumed["records"]] == [r["step"] for r in expected]
    for a, b in zip(expected, resumed["records"], strict=True):
        # the step after the first resumed one shows the optimizer moments, step count and LR were resharded
        assert _rel(a["loss"], b["loss"]) < REL, (case, world_size, a, b)
        assert _rel(a["grad_norm"], b["grad_norm"]) < REL, (case, world_size, a, b)
    assert expected[-1]["loss"] < straight["records"][0]["loss"] - 0.1  # the numbers compared are real
    assert _rel(straight["weights_sum"], resumed["weights_sum"]) < REL

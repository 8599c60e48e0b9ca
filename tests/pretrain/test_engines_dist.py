"""2-process engine tests on CPU (gloo, torchrun): every engine trains, resumes bitwise, shards, skips NaN.

Each torchrun launch checks several engines (a 2-process DeepSpeed start costs ~15 s on 2 cores), so the
runs happen once per module in fixtures and the tests assert on what they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.pretrain import engines_worker as worker

pytestmark = pytest.mark.slow

DEEPSPEED_CASES = ["ds-z0", "ds-z1", "ds-z2", "ds-z3", "ds-z3-bf16", "ds-z2-offload", "ds-z3-t5"]
TORCH_CASES = ["ddp", "fsdp", "fsdp-bf16", "fsdp-bert"]
SHARDED = {"ds-z3", "ds-z3-bf16", "ds-z3-t5", "fsdp", "fsdp-bf16", "fsdp-bert"}
FP32 = ["ds-z0", "ds-z1", "ds-z2", "ds-z3", "ds-z2-offload", "ddp", "fsdp"]


def _torchrun(out_dir: Path, cases: list[str]) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(worker.__file__)), str(out_dir), *cases]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out_dir


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _torchrun(tmp_path_factory.mktemp("deepspeed"), DEEPSPEED_CASES)


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _torchrun(tmp_path_factory.mktemp("accelerate"), TORCH_CASES)


def _result(runs: Path, case: str) -> dict:
    return json.loads((runs / f"{case}.json").read_text())


@pytest.mark.parametrize("case", DEEPSPEED_CASES)
def test_deepspeed_two_ranks(deepspeed_runs: Path, case: str) -> None:
    result = _result(deepspeed_runs, case)
    assert result["world_size"] == 2
    worker.assert_result(result, sharded=case in SHARDED)


@pytest.mark.parametrize("case", TORCH_CASES)
def test_accelerate_two_ranks(accelerate_runs: Path, case: str) -> None:
    result = _result(accelerate_runs, case)
    assert result["world_size"] == 2
    worker.assert_result(result, sharded=case in SHARDED)


def test_fp32_engines_agree(deepspeed_runs: Path, accelerate_runs: Path) -> None:
    """Same data, same init: ZeRO 1/2/3, offload, DDP and FSDP reach the same weights and losses."""
    runs = {case: deepspeed_runs if case.startswith("ds") else accelerate_runs for case in FP32}
    reference = load_file(runs["ds-z1"] / "ds-z1.safetensors")
    ref_losses = [s["loss"] for s in _result(runs["ds-z1"], "ds-z1")["straight"]]
    for case, where in runs.items():
        weights = load_file(where / f"{case}.safetensors")
        assert weights.keys() == reference.keys()
        diff = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        assert diff < 2e-5, (case, diff)
        losses = [s["loss"] for s in _result(where, case)["straight"]]
        assert losses == pytest.approx(ref_losses, abs=1e-5), case


def test_process_group_reforms_after_elastic_restart(tmp_path: Path) -> None:
    """torchrun --max-restarts 1: the group re-forms on the agent's store under a new prefix."""
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--max-restarts", "1", str(Path(worker.__file__).with_name("dist_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(out.read_text()) == {
        "attempt": 1,
        "world_size": 2,
        "backend": "gloo",
        "any_rank": [True, False],
    }


def test_in_place_gloo_collectives_equal_gloos_own_bitwise(tmp_path: Path) -> None:
    """ZeRO-3's and FSDP2's reduce-scatter and all-gather on CPU (pretrain/engines/gloo.py) give gloo's results
    bit for bit, with the output inside the input (DeepSpeed's way) or apart, on 3 ranks (odd chunk counts)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "gloo.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    cmd += [str(Path(worker.__file__).with_name("gloo_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 3
    assert result["all_ranks_equal"], result
    assert all(all(r.values()) for r in result["rank0"].values()), result

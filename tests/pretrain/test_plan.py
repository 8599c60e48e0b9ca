"""`pretrain plan`: the ZeRO-paper arithmetic, the table and its recommendation, and the predictions against
what the engines themselves report holding (2 ranks, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import get_config
from models.build import build_from_config
from pretrain.cli import EXIT_USAGE, main
from pretrain.plan import ENGINES, ModelShape, flat_gradient, model_states, plan
from tests.common import subprocess_env
from tests.pretrain import states_worker

N = 1_000_000


@pytest.mark.parametrize(
    ("engine", "precision", "params", "grads", "optimizer"),
    [
        ("ddp", "fp32", 4 * N, 4 * N, 8 * N),
        ("ddp", "bf16", 4 * N, 4 * N, 8 * N),  # autocast over fp32 weights
        ("fsdp", "fp32", N, N, 2 * N),
        ("zero1", "fp32", 4 * N, 4 * N, 3 * N),  # fp32 partition + moments, sharded 4 ways
        ("zero2", "bf16", 2 * N, 2 * N, 3 * N),  # full-size grads until the step (bench/NOTES.md)
        ("zero3", "fp32", N, N, 2 * N),  # AdamW steps the parameter partitions themselves: no fp32 copy
        ("zero3", "bf16", N / 2, N / 2, 3 * N),  # the ZeRO paper's 16 bytes per parameter / 4
    ],
)  # fmt: skip
def test_model_states_per_gpu(
    engine: str, precision: str, params: float, grads: float, optimizer: float
) -> None:
    states = model_states(engine, N, 4, precision)
    assert (states.params, states.grads, states.optimizer, states.host) == (params, grads, optimizer, 0.0)


def test_offload_keeps_the_states_on_the_host() -> None:
    states = model_states("zero3-offload", N, 4, "bf16")
    assert (states.total, states.host) == (0.0, model_states("zero3", N, 4, "bf16").total)


def test_shape_counts_what_the_model_has() -> None:
    config = get_config("gpt-tiny", vocab_size=500, n_layers=3)
    model = build_from_config(config, init=False)
    shape = ModelShape.of(config)
    assert shape.params == model.num_parameters()
    assert shape.largest_block_params == sum(p.numel() for p in model.blocks[0].parameters())
    assert shape.root_params + 3 * shape.largest_block_params == shape.params


def test_largest_micro_batch_is_the_largest_that_fits() -> None:
    p = plan(
        get_config("gpt2-medium"), world=4, micro_batch=2, seq_len=1024, precision="bf16", gpu_memory_gib=40
    )
    for e in p.engines:
        free = p.gpu_bytes - e.total(checkpointing=False) + e.activations  # what activations may take
        per_sample = e.activations / 2
        assert e.max_micro_batch * per_sample <= free < (e.max_micro_batch + 1) * per_sample, e.engine


def test_plan_command_prints_every_engine_and_a_recommendation(capsys) -> None:
    code = main(["plan", "gpt2-large.yaml", "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("774.1 M parameters, 16 GPUs x 80 GiB, bf16, micro-batch 4 x 1024 tokens")
    assert [line.split()[0] for line in out[2:-1]] == list(ENGINES)
    assert out[-1].startswith("recommended: engine.backend=ddp, without gradient checkpointing")
    code = main(["plan", "gpt2-large.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gib", "16"])
    last = capsys.readouterr().out.splitlines()[-1]
    # one GPU: 11.5 GiB of states under every engine but offload, plus 2.9 GiB of DeepSpeed's fp32 gradient
    # copy (ZeRO) or DDP's buckets; FSDP's few gathered blocks leave room, with checkpointing, before offload
    assert last.startswith("recommended: engine.backend=fsdp, with gradient checkpointing"), last


def test_plan_needs_a_positive_gpu_count(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "gpt2-large.yaml", "--nodes", "0", "--gpus-per-node", "8"])
    assert exit_info.value.code == EXIT_USAGE
    assert capsys.readouterr().err == ("error: pretrain plan: argument --nodes: must be > 0, got 0\n")


ENGINE_CASES = {"ddp": "ddp", "ds-z1": "zero1", "ds-z2": "zero2", "ds-z3": "zero3", "fsdp": "fsdp"}


@pytest.mark.slow
def test_predicted_states_match_what_each_engine_holds(tmp_path: Path) -> None:
    """Params and optimizer tensors per rank, as each engine reports them after a step, and the gradients it
    holds as the AdamW update starts (2 ranks, fp32), are the planner's figures. At that moment DeepSpeed holds
    its flat fp32 gradient partition, and ZeRO 1-2 have already freed their full-size gradients."""
    env = subprocess_env(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(states_worker.__file__)), str(tmp_path), *ENGINE_CASES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for case, engine in ENGINE_CASES.items():
        held = json.loads((tmp_path / f"{case}.json").read_text())
        predicted = model_states(engine, held["n"], held["world"], "fp32")
        assert held["params"] == pytest.approx(predicted.params, rel=0.01), case
        assert held["optimizer"] == pytest.approx(predicted.optimizer, rel=0.01), case
        in_step = 0.0 if engine in ("zero1", "zero2") else predicted.grads
        in_step += flat_gradient(engine, held["n"], held["world"])
        assert held["grads"] == pytest.approx(in_step, rel=0.03), case  # DeepSpeed pads each flat group

"""End to end through the real CLI: train, resume exactly, export to transformers, plot. One tiny run per family."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.cli import main
from pretrain.export import export
from pretrain.logging import read_metrics, read_resumes
from tests.common import REPO
from tests.pretrain.helpers import TINY

pytestmark = pytest.mark.slow

STEPS = 4
CONFIGS = {"gpt": "configs/gpt-tiny.yaml", "bert": "configs/bert-tiny.yaml", "t5": "configs/t5-tiny.yaml"}
_straight: dict[str, Path] = {}


def train(family: str, run_dir: Path, *extra: str, capsys=None) -> str:
    """`pretrain train` on the tiny config as a real subprocess, or in this process given capsys (only for runs
    that build no engine: DeepSpeed keeps process-global state between runs).

    Returns what the run wrote to stderr (its notes)."""
    args = [
        "train",
        CONFIGS[family],
        *TINY,
        f"train.max_steps={STEPS}",
        "checkpoint.every=2",
        "checkpoint.keep=3",
    ]
    args += [f"run.dir={run_dir}", *extra]
    if capsys is not None:
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            assert main(args) == 0
        finally:
            os.chdir(cwd)
        return capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def subprocess_env() -> dict[str, str]:
    """This environment without a W&B key or a launcher's rank variables, W&B off."""
    launcher = {"WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in launcher} | {"WANDB_MODE": "disabled"}


def straight_run(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished uninterrupted run, shared by the tests of one family."""
    if family not in _straight:
        run_dir = tmp_path_factory.mktemp(family) / "straight"
        train(family, run_dir, *(["wandb.mode=offline"] if family == "gpt" else []))
        _straight[family] = run_dir
    return _straight[family]


def by_step(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir)}


def interrupted_copy(run_dir: Path) -> Path:
    """A copy of a finished run as it was when the job died right after the step-2 checkpoint."""
    resumed = run_dir.parent / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_2")
    return resumed


def assert_identical_runs(family: str, straight: Path, resumed: Path) -> None:
    """Every logged number and the final weights are equal, bit for bit."""
    a, b = by_step(straight), by_step(resumed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "lr", "grad_norm", "tokens", "val_loss"):
            assert a[step].get(key) == b[step].get(key), (
                family,
                step,
                key,
                a[step].get(key),
                b[step].get(key),
            )
    assert a[STEPS]["loss"] != a[STEPS - 1]["loss"]  # the numbers compared are real, not constants
    wa = load_file(str(straight / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_resume_is_identical_to_an_uninterrupted_run(family: str, tmp_path_factory, capsys) -> None:
    straight = straight_run(family, tmp_path_factory)
    resumed = interrupted_copy(straight)
    notes = train(family, resumed)
    assert "resuming at step 2" in notes
    assert read_resumes(resumed) == [2] and read_resumes(straight) == []  # `pretrain plot` marks it
    assert_identical_runs(family, straight, resumed)

    again = train(family, resumed, capsys=capsys)  # finished: a re-run stops before building anything
    assert "already trained to step 4" in again
    assert len(read_metrics(resumed)) == STEPS


def test_resume_at_a_world_size_that_cannot_keep_the_batch_is_one_line_before_anything_starts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A run checkpointed by 1 DeepSpeed process (global batch: 2 micro-batches), resumed under torchrun with 3:
    every rank refuses, and the user reads one line (rank 0's) naming the world sizes that work, before a
    tokenizer, model or engine is built; the run directory is left as it was."""
    run_dir = straight_run("gpt", tmp_path_factory).parent / "three-ranks"
    shutil.copytree(straight_run("gpt", tmp_path_factory), run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    cmd += ["-m", "pretrain", "train", CONFIGS["gpt"], *TINY, "train.max_steps=6", f"run.dir={run_dir}"]
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = (
        f"error: {run_dir / 'checkpoints' / f'step_{STEPS}'}: cannot resume at world size 3: the checkpoint's "
        "global batch is 2 micro-batches (world 1 x grad_accum 2), so the world size must divide it: 1, 2"
    )
    assert errors == [expected], proc.stderr[-3000:]
    # torchrun's summary: the first rank to fail exited with the CLI's code (a slower one may be SIGTERMed)
    assert proc.stderr.count("exitcode  : 2 ") >= 1, proc.stderr[-3000:]
    assert "DeepSpeed" not in proc.stderr  # refused before the engine (or anything else) was built
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_round_trip(family: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    straight = straight_run(family, tmp_path_factory)
    out = straight.parent / "hf"
    result = export(straight, out, step=2)
    assert (result.step, result.family) == (2, family)
    assert result.max_logit_diff < 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*export-tmp")), "the staging directory was left behind"
    model_type = json.loads((out / "config.json").read_text())["model_type"]
    assert model_type == {"gpt": "gpt2", "bert": "bert", "t5": "t5"}[family]


def test_metrics_contract_wandb_and_plot(tmp_path_factory: pytest.TempPathFactory) -> None:
    run_dir = straight_run("gpt", tmp_path_factory)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    tokens_per_step = 2 * 2 * 32  # micro_batch_size x grad_accum x seq_len
    for r in records:
        assert {
            "step",
            "loss",
            "lr",
            "tokens",
            "tokens_per_s",
            "grad_norm",
            "mfu",
            "memory_gib",
            "skipped",
        } <= r.keys()
        assert r["tokens"] == r["step"] * tokens_per_step
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["memory_gib"] > 0 and r["skipped"] is False
    assert ("val_loss" in records[1]) and ("val_loss" in records[3]) and ("val_loss" not in records[0])
    assert records[-1]["loss"] < records[0]["loss"] + 0.5
    assert list(run_dir.glob("wandb/offline-run-*")), "offline W&B files belong under the run directory"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_blocks_train_like_eager_and_resume_exactly(tmp_path_factory) -> None:
    """train.compile=true: the numbers of eager up to fp32 rounding (without dropout, whose compiled random
    stream differs), and an exact resume of its own (with dropout, so its random state is restored too)."""
    root = tmp_path_factory.mktemp("compiled")
    one_step = ("train.max_steps=1", "model.dropout=0.0", "model.attention_dropout=0.0")
    train("gpt", root / "eager", *one_step)
    train("gpt", root / "compiled-1", *one_step, "train.compile=true")
    (a,), (c,) = read_metrics(root / "eager"), read_metrics(root / "compiled-1")
    assert c["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    compiled = root / "straight"
    train("gpt", compiled, "train.compile=true")
    resumed = interrupted_copy(compiled)
    assert "resuming at step 2" in train("gpt", resumed, "train.compile=true")
    assert_identical_runs("gpt", compiled, resumed)

"""A user error is one `error:` line, said at once and once per job: a config error answers before torch is
imported, and under a launcher (where every rank meets the same bad input) rank 0 alone says it while every rank
still exits with the error's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import EXIT_USAGE, main
from tests.common import REPO

BAD_CONFIG = ["train", "configs/gpt-tiny.yaml", "train.max_steps=-1"]
EXPECTED = "error: train.max_steps: Input should be greater than or equal to 0 (got -1)"


@pytest.mark.parametrize(
    ("env", "printed"),
    [
        ({}, True),
        ({"RANK": "0"}, True),
        ({"RANK": "1"}, False),
        ({"SLURM_PROCID": "3"}, False),
        ({"RANK": "0", "SLURM_PROCID": "1"}, True),  # torchrun under srun: torchrun's rank wins
    ],
)
def test_only_rank_zero_prints_a_user_error(
    env: dict[str, str], printed: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)
    assert main(BAD_CONFIG) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == ([EXPECTED] if printed else [])


def test_only_rank_zero_prints_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == EXIT_USAGE
    assert capsys.readouterr().err == ""


def test_a_rank_s_own_error_is_said_by_that_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error not agreed across ranks (here: this rank's files) must not be hidden on rank != 0."""
    monkeypatch.setenv("RANK", "1")
    assert main(["plot", str(tmp_path)]) == EXIT_USAGE
    assert (
        capsys.readouterr().err
        == f"error: rank 1: no training records in {tmp_path}/metrics.jsonl; train first\n"
    )


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_said_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pretrain", *BAD_CONFIG, f"run.dir={tmp_path / 'run'}"]
    launcher = {"WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [EXPECTED], proc.stderr
    # torchrun's summary: the first worker to fail exited with the CLI's code (torchrun then SIGTERMs any worker
    # still running, so on a busy machine the other may show -15 instead of 2)
    assert proc.stderr.count(f"exitcode  : {EXIT_USAGE} ") >= 1, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["every rank", "rank 0 alone"])
def test_a_failed_worker_ends_launchs_agent_in_one_line(tmp_path: Path, where: str) -> None:
    """launch's torchrun agent answers a failed worker with one line and its exit code, not torchrun's
    ChildFailedError traceback and summary. A config error meets every rank; an unreadable tokenizer only
    rank 0, which makes it while the others wait: they stop with it, without a traceback of their own."""
    if where == "every rank":
        args, expected = BAD_CONFIG, EXPECTED
    else:
        (tmp_path / "tokenizer").mkdir()
        (tmp_path / "tokenizer" / "tokenizer.json").write_text("{not json")
        args = ["train", "configs/gpt-tiny.yaml", f"data.tokenizer={tmp_path / 'tokenizer'}"]
        expected = (
            f"error: data.tokenizer: cannot load '{tmp_path / 'tokenizer'}': JSONDecodeError: Expecting"
        )
    cmd = [sys.executable, "-m", "launch.agent", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pretrain", *args, f"run.dir={tmp_path / 'run'}"]
    launcher = {"WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        f"launch: the job failed: rank 0 exited with code {EXIT_USAGE} first (its output is above)"
    ), proc.stderr


def test_a_config_error_answers_before_torch_is_imported() -> None:
    """Importing torch costs seconds; validating the config needs none of it."""
    code = (
        "import sys; from pretrain.cli import main; code = main(sys.argv[1:]); "
        "print(code, sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"} | {"WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *BAD_CONFIG],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.stdout.strip(), proc.stderr.strip()) == (f"{EXIT_USAGE} []", EXPECTED)

"""Logging can never cost a checkpoint: a W&B run whose service died, or that hangs, degrades to one warning
(console + metrics.jsonl) and W&B stays off; metrics.jsonl keeps every record."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pretrain import logging as run_logging
from pretrain.config import load_config
from pretrain.logging import RunLogger, read_metrics
from tests.common import REPO, subprocess_env


def test_killed_wandb_service_is_one_warning_and_metrics_continue(tmp_path: Path) -> None:
    env = {k: v for k, v in subprocess_env(WANDB_MODE="offline").items() if k != "WANDB_API_KEY"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tests.pretrain.wandb_worker", str(tmp_path / "run")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "closed"
    warnings = [line for line in done.stderr.splitlines() if "warning: W&B" in line]
    assert len(warnings) == 1, done.stderr
    assert "W&B log failed (ConnectionResetError" in warnings[0]
    assert "Traceback" not in done.stderr  # W&B's own exit hook stays quiet too
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [(r["step"], r["warning"][:15]) for r in records if "warning" in r] == [(2, "W&B log failed ")]
    assert time.monotonic() - started < 60


class HungRun:
    """A W&B run whose service stopped answering: log returns, finish never does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.logged: list[int] = []

    def log(self, data: dict, *, step: int) -> None:
        self.logged.append(step)

    def finish(self) -> None:
        self.release.wait(60)


def test_hung_wandb_finish_is_abandoned_after_its_time_limit(tmp_path, monkeypatch, capsys) -> None:
    hung = HungRun()
    monkeypatch.setattr(run_logging, "_start_wandb", lambda cfg: hung)
    monkeypatch.setattr(run_logging, "_teardown_quietly", lambda: None)
    monkeypatch.setattr(run_logging, "WANDB_FINISH_TIMEOUT_S", 0.5)
    cfg = load_config(REPO / "configs/gpt-tiny.yaml", [f"run.dir={tmp_path}", "log.progress=false"])
    logger = RunLogger(cfg, enabled=True, start_step=0)
    logger.log({"step": 1, "loss": 2.0})
    started = time.monotonic()
    logger.close()
    assert time.monotonic() - started < 5
    hung.release.set()
    assert hung.logged == [1]
    err = capsys.readouterr().err
    assert "warning: W&B finish failed (TimeoutError: no answer after 0 s)" in err  # 0.5 s, rounded
    assert read_metrics(tmp_path)[-1] == {
        "step": 1,
        "warning": pytest.approx(err.split("warning: ")[1].strip()),
    }

"""Safety of a run directory: one trainer at a time (RUN_DIR/.lock), a refused start leaves no trace, a dangling
`latest` is reported, and a full disk during a checkpoint is one line with the previous checkpoint intact."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pretrain import checkpoint as checkpoint_module
from pretrain.checkpoint import CheckpointError, CheckpointManager, TrainerState
from pretrain.engines.base import DistInfo
from pretrain.runlock import RunLock, RunLockedError
from tests.common import REPO, subprocess_env
from tests.pretrain.helpers import TINY
from tests.pretrain.pretrain_fakes import FakeData, FakeEngine


def test_second_lock_is_refused_naming_the_holder_then_taken_once_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunLockedError) as refused:
        RunLock(tmp_path / "run").acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since 20" in message
    assert "--wait-lock SECONDS" in message
    first.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # no stale holder left to read
    RunLock(tmp_path / "run").acquire().release()


def test_wait_lock_waits_for_the_holder_to_let_go(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    threading.Timer(0.6, first.release).start()
    started = time.monotonic()
    second = RunLock(tmp_path).acquire(wait_s=30)
    assert 0.5 < time.monotonic() - started < 10
    assert second.holder()["pid"] == os.getpid()
    second.release()
    with pytest.raises(RunLockedError, match=r"\(waited 0.3 s\)"):
        held = RunLock(tmp_path).acquire()
        try:
            RunLock(tmp_path).acquire(wait_s=0.3)
        finally:
            held.release()


def test_the_os_releases_the_lock_of_a_killed_holder(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from pretrain.runlock import RunLock; "
        "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid},"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        holder.kill()
    RunLock(tmp_path).acquire().release()  # kill -9 left the file but not the lock


def _train(
    run_dir: Path, *overrides: str, steps: int = 4, options: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """`pretrain train [options] gpt-tiny TINY... overrides...` in a subprocess, W&B offline as users run it."""
    cmd = [sys.executable, "-m", "pretrain", "train", *options, "configs/gpt-tiny.yaml", *TINY]
    cmd += [f"train.max_steps={steps}", "train.eval_every=0", "log.progress=false", f"run.dir={run_dir}"]
    cmd += ["wandb.mode=offline"]  # after TINY's wandb.mode=disabled: the last one wins
    env = {k: v for k, v in subprocess_env().items() if k not in ("RANK", "WORLD_SIZE", "WANDB_API_KEY")}
    env["WANDB_MODE"] = "offline"
    return subprocess.Popen(
        [*cmd, *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    err = process.communicate(timeout=300)[1]
    return process.returncode, err


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    code, err = _finish(_train(run_dir, "checkpoint.every=2", "checkpoint.keep=5"))
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    return run_dir


@pytest.mark.slow
def test_a_refused_start_changes_nothing_in_the_run_dir(trained: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for step in (2, 4):  # every checkpoint damaged: the resume must refuse rather than start over
        with open(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors", "ab") as f:
            f.write(b"torn")
    before = _snapshot(run_dir)
    code, err = _finish(_train(run_dir, "checkpoint.every=2", "train.lr=0.5"))  # a changed config, too
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert lines[-1].startswith(f"error: no intact checkpoint under {run_dir / 'checkpoints'} "), err
    print(f"\nrefused start: {lines[-1]}")
    assert (
        _snapshot(run_dir) == before
    )  # config.yaml, metrics.jsonl, checkpoints, tokenizer, .lock: untouched


@pytest.mark.slow
def test_latest_naming_a_missing_checkpoint_is_one_warning_then_falls_back(
    trained: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_4")  # `latest` still says step_4
    code, err = _finish(_train(run_dir, "checkpoint.every=2"))
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"warning: {run_dir / 'checkpoints' / 'latest'} names step_4, which does not exist; "
        "falling back to the newest intact checkpoint"
    ), err
    print(f"\ndangling latest: {warnings[0]}")
    assert "resuming at step 2, training to step 4" in err
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_4"


@pytest.mark.slow
def test_two_trainers_on_one_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _train(run_dir, steps=60)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".lock").is_file() or not (run_dir / ".lock").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = _train(run_dir, steps=60)
        err = second.communicate(timeout=120)[1]
        assert second.returncode == 2, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith(f"error: run directory {run_dir} is in use by another trainer "), err
        assert f"pid {first.pid}, since " in lines[-1]
        print(f"\nsecond trainer: {lines[-1]}")
        waiting = _train(
            run_dir, steps=60, options=("--wait-lock", "300")
        )  # e.g. a requeued job: waits, then resumes
        first_err = first.communicate(timeout=300)[1]
        assert first.returncode == 0, first_err[-3000:]
        waited_err = waiting.communicate(timeout=300)[1]
    finally:
        first.kill()
    assert waiting.returncode == 0, waited_err[-3000:]
    assert "already trained to step 60" in waited_err


class DiskFullEngine(FakeEngine):
    """Writes part of its state, then the disk is full (as on a shared file system another job filled)."""

    def save(self, path: Path) -> None:
        (path / "partial.bin").write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_for_want_of_space_is_one_line_and_keeps_the_previous(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=3, dist=DistInfo())
    manager.save(engine=FakeEngine(), state=TrainerState(step=2), data=FakeData())
    with pytest.raises(CheckpointError) as refused:
        manager.save(engine=DiskFullEngine(), state=TrainerState(step=4), data=FakeData())
    message = str(refused.value)
    assert message.startswith(
        f"no space left on device writing checkpoints/step_4 in {tmp_path} (needs ~0.0 MB, "
    )
    assert message.endswith(
        "MB free); step_2 is intact: free space, then run the same command again to resume"
    )
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]  # the half-written save is gone
    assert (root / "latest").read_text() == "step_2"


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=3, dist=DistInfo())
    manager.save(engine=FakeEngine(), state=TrainerState(step=2), data=FakeData())
    size = checkpoint_module.dir_bytes(root / "step_2")
    monkeypatch.setattr(checkpoint_module, "free_bytes", lambda path: size // 2)
    engine = FakeEngine()
    with pytest.raises(CheckpointError, match=r"writing checkpoints/step_4 .*\(needs ~0.0 MB, 0.0 MB free\)"):
        manager.save(engine=engine, state=TrainerState(step=4), data=FakeData())
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]  # nothing was written
    monkeypatch.setattr(checkpoint_module, "free_bytes", lambda path: size * 2)
    assert manager.save(engine=engine, state=TrainerState(step=4), data=FakeData()).name == "step_4"


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size) -> a tmpfs of `size` (e.g. "1000k") at tmp_path/disk, remounted at that size if mounted."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if mounted else f"size={size}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(size)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_on_a_real_small_disk(small_disk) -> None:
    run_dir = small_disk("1000k") / "run"  # a checkpoint of this model is ~1.3 MB
    code, err = _finish(_train(run_dir, "checkpoint.every=2"))
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert code == 2, err[-3000:]
    assert last.startswith(
        f"error: no space left on device writing checkpoints/step_2 in {run_dir} (needs "
    ), err
    assert last.endswith(
        "no checkpoint was written yet: free space, then run the same command again to resume"
    )
    assert "Traceback" not in err
    print(f"\nwrite failed: {last}")
    assert not list((run_dir / "checkpoints").glob(".tmp-step_*"))

    small_disk("2000k")  # room for one checkpoint, not two
    code, err = _finish(_train(run_dir, "checkpoint.every=2", "checkpoint.keep=5"))
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert code == 2, err[-3000:]
    assert "error: no space left on device writing checkpoints/step_4" in last and "step_2 is intact" in last
    print(f"checked before writing: {last}")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2"

    small_disk("8m")  # space freed: the run resumes from the checkpoint that stayed intact
    code, err = _finish(_train(run_dir, "checkpoint.every=2", "checkpoint.keep=5"))
    assert code == 0, err[-3000:]
    assert "resuming at step 2, training to step 4" in err
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_4"

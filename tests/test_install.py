"""A plain (non-editable) install works from any directory: the wheel carries the run configs and DeepSpeed JSONs.

The wheel is built from this checkout and installed into a fresh virtual environment that sees the already
installed dependencies (no network): its site-packages come first, so `pretrain` is the wheel's, and every
command runs in a temporary directory outside the source tree, as a cluster user's job would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.common import REPO

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the wheel of this checkout."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        cwd=root,
        env=dict(os.environ),
    )
    (wheel,) = wheels.glob("pretrain-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The dependencies come from this environment's site-packages, after the venv's own (a .pth line only
    # appends a path: this environment's editable-install hook is not run, so the wheel's `pretrain` wins).
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        cwd=root,
        env=dict(os.environ),
    )  # fmt: skip
    return venv / "bin"


def test_wheel_carries_configs_and_runs_outside_the_source_tree(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"WANDB_MODE": "offline", "PATH": f"{installed}{os.pathsep}{env['PATH']}", "OMP_NUM_THREADS": "1"}
    where = _run(
        [str(installed / "python"), "-c", "import pretrain, launch; print(pretrain.__file__)"], tmp_path, env
    )
    assert str(installed.parent) in where and str(REPO) not in where, (
        where
    )  # the wheel's code, not the checkout's
    assert "pretrain 0.1.0" in _run([str(installed / "pretrain"), "--version"], tmp_path, env)

    tiny = ["train.max_steps=3", "train.micro_batch_size=2", "data.seq_len=32", "data.vocab_size=512",
            "data.tokenizer_train_chars=50000", "model.n_layers=1", "log.every=1", "checkpoint.every=3"]  # fmt: skip
    assert "ok: gpt-tiny.yaml" in _run(
        [str(installed / "pretrain"), "check", "gpt-tiny.yaml", *tiny], tmp_path, env
    )
    out = _run([str(installed / "pretrain"), "train", "gpt-tiny.yaml", *tiny], tmp_path, env)
    assert "done: step 3" in out, out
    assert (tmp_path / "runs" / "gpt-tiny" / "checkpoints" / "step_3" / "model.safetensors").is_file()
    assert list((tmp_path / "runs" / "gpt-tiny" / "wandb").glob("offline-run-*"))  # W&B on, as users run

    prepared = tmp_path / "prepared"
    _run(
        [str(installed / "pretrain"), "data", "prepare", "gpt-tiny.yaml", str(prepared), *tiny[2:5]],
        tmp_path,
        env,
    )
    assert (prepared / "index.json").is_file()

    dry = _run(
        [str(installed / "launch"), "local", "--nproc", "2", "--dry-run", "t5-tiny.yaml"], tmp_path, env
    )
    assert "-m pretrain train" in dry and "t5-tiny.yaml" in dry
    # the bundled DeepSpeed JSON for each stage resolves from the installed package
    for stage in (1, 2, 3):
        ok = _run(
            [str(installed / "pretrain"), "check", "bert-tiny.yaml", f"engine.deepspeed.zero_stage={stage}"],
            tmp_path,
            env,
        )
        assert "ok:" in ok

"""A run that diverges stops with a clear message after its skip budget, leaving a good checkpoint behind.

No injection hook needed: with train.lr=1e30 the first AdamW update moves every weight by ~1e30, the next forward
overflows (1e30 * 1e30 in the MLP) and every later step is non-finite on every rank.
"""

from __future__ import annotations

import math
import subprocess

import pytest
from safetensors.torch import load_file

from tests.launch.launch_e2e import REPO, Run, launch_cmd, train_env

pytestmark = pytest.mark.slow


def test_divergence_skips_then_stops_with_last_good_checkpoint(write_config, reference_losses):
    config = write_config(
        "diverge",
        train={"lr": 1e30, "warmup_steps": 0, "max_skips": 2, "clip_grad": None},
        checkpoint={"every": 1},
    )
    run = Run(config.parent / "diverge")
    done = subprocess.run(
        launch_cmd("local", "--nproc", "2", str(config)),
        env=train_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "3 steps skipped for a non-finite loss or gradient" in output and "train.max_skips" in output

    steps = run.steps()
    assert math.isfinite(steps[0]["loss"]) and steps[0]["loss"] == reference_losses[1]  # step 1 is still sane
    bad = [s for s in steps if s["step"] > 1]
    assert [s["step"] for s in bad] == [2, 3]  # skipped, counted, logged; step 4 exceeded the budget of 2
    assert all(s["loss"] is None or not math.isfinite(s["loss"]) for s in bad)

    latest = run.latest()
    assert latest is not None and int(latest.removeprefix("step_")) <= 3
    weights = load_file(run.dir / "checkpoints" / latest / "model.safetensors")
    # the update of a skipped step never reached the weights
    assert all(t.isfinite().all() for t in weights.values())

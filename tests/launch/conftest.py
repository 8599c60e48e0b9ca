"""Fixtures for the end-to-end tests (helpers in launch_e2e.py): one tokenizer, configs, the reference run, SLURM."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.launch.launch_e2e import (
    MAX_STEPS,
    WORLD_SIZE,
    Run,
    cluster_up,
    launch_cmd,
    losses_by_step,
    run_to_end,
    tiny_config,
)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """Trained once, shared by every run (tokenizer training would otherwise dominate each run)."""
    from data import DataConfig, build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(DataConfig(vocab_size=512, tokenizer_train_chars=200_000), family="gpt", out_dir=out)
    return out


@pytest.fixture
def write_config(tmp_path, tiny_tokenizer) -> Callable[..., Path]:
    """write_config(name, **sections) -> a YAML file whose run.dir is tmp_path/name."""

    def write(name: str, **sections: dict[str, Any]) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tmp_path / name, tiny_tokenizer, **sections)))
        return path

    return write


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory, tiny_tokenizer) -> dict[int, float]:
    """Loss per step of one uninterrupted `launch local --nproc 2` run."""
    if importlib.util.find_spec("pretrain.loop") is None:
        pytest.skip("the trainer is not there yet: pretrain/loop.py (behind `pretrain train`) is missing")
    root = tmp_path_factory.mktemp("reference")
    config = root / "reference.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root / "run", tiny_tokenizer)))
    run_to_end(launch_cmd("local", "--nproc", str(WORLD_SIZE), str(config)), timeout=300)
    losses = losses_by_step(Run(root / "run").steps())
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local cluster from tests/slurm/local-cluster.sh: skip without one, but FAIL in CI (it must be there)."""
    if cluster_up():
        return
    if os.environ.get("PRETRAIN_REQUIRE_SLURM"):
        log_path = os.environ.get("PRETRAIN_SLURM_UP_LOG")
        log = Path(log_path).read_text()[-2000:] if log_path and Path(log_path).exists() else ""
        pytest.fail(f"PRETRAIN_REQUIRE_SLURM is set but the local SLURM cluster is not up.\n{log}")
    pytest.skip("no local SLURM cluster: run `tests/slurm/local-cluster.sh up` (root) to run these tests")

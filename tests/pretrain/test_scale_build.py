"""Sharded from the first byte: every engine, family and world size starts from the same weights, and the
sharded engines never hold the whole model on a rank while building it (CPU, gloo, torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import build_from_config
from tests.common import subprocess_env
from tests.pretrain import build_memory_worker, init_worker

pytestmark = pytest.mark.slow

ENGINES = ("ds-z3", "fsdp", "ddp")
FAMILIES = ("gpt", "bert", "t5")
SHARDED = {"ds-z3", "fsdp"}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _run(script: Path, out: Path, args: list[str], world: int, **env: str) -> None:
    environ = subprocess_env(OMP_NUM_THREADS="1", WANDB_MODE="offline", **env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(name, None)
    cmd = [sys.executable, str(script), str(out), *args]
    if world > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("init")
    names = [f"{engine}:{family}" for engine in ENGINES for family in FAMILIES]
    for world in (1, 2, 4):
        _run(Path(init_worker.__file__), out, names, world)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_weights_do_not_depend_on_engine_or_world_size(initial_weights: Path, family: str) -> None:
    recipe = init_worker.recipe(family)
    reference = build_from_config(recipe.config, seed=recipe.seed).state_dict()
    for engine in ENGINES:
        for world in (1, 2, 4):
            stem = initial_weights / f"{engine}-{family}-w{world}"
            weights = load_file(f"{stem}.safetensors")
            assert weights.keys() == reference.keys(), (engine, world)
            for name, value in reference.items():
                assert torch.equal(weights[name], value), (engine, world, name)
            held = json.loads(stem.with_suffix(".json").read_text())["local_param_fraction"]
            expected = 1 / world if engine in SHARDED else 1.0
            assert abs(held - expected) < 0.01, (engine, world, held)


@pytest.fixture(scope="module")
def build_memory(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each rank's memory growth while building (seeded, and from each init_from source), 2 ranks."""
    out = tmp_path_factory.mktemp("memory")
    sources = build_memory_worker.make_sources(tmp_path_factory.mktemp("sources"))
    _run(Path(build_memory_worker.__file__), out, [f"{k}={v}" for k, v in sources.items()], 2, **MALLOC_ENV)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("source", ["seeded", "transformers", "run"])
def test_sharded_engines_never_hold_the_whole_model_while_building(
    build_memory: list[dict], source: str
) -> None:
    """Two ranks: building under ZeRO-3 / FSDP, also from a transformers directory or one of our checkpoints
    (`model.init_from`), allocates a rank's half of the model plus a few parameters in flight (the one being
    filled, its source tensor, the transposed copy of a GPT-2 Conv1D weight); the DDP build, measured the same
    way, allocates the whole model (the measure can fail)."""
    for rank, grew in enumerate(build_memory):
        full = grew["full_model_bytes"]
        bound = full / 2 + 3 * grew["largest_parameter_bytes"]
        assert bound < 0.7 * full, grew  # the model is large enough for the bound to tell
        assert grew[source]["ddp"] >= full, (rank, grew)
        for engine in SHARDED:
            assert grew[source][engine] < bound, (rank, engine, grew)

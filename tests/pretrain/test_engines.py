"""Single-process engine tests: optimizer groups, LR schedule, DeepSpeed JSON, and each engine end to end."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from models import build_model
from pretrain.config import DeepSpeedConfig, OptimizerConfig, TrainConfig
from pretrain.engines import any_rank, barrier, init_distributed
from pretrain.engines.ds_config import (
    default_config_path,
    fill_device_fields,
    fill_model_fields,
    resolve_config,
)
from pretrain.engines.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from pretrain.errors import ConfigError, LaunchEnvironmentError
from tests.pretrain import engines_worker as worker

CONFIG_DIR = default_config_path(DeepSpeedConfig()).parent


def optimizer_config(**fields: object) -> OptimizerConfig:
    """The optimizer config a train section with these fields resolves to."""
    return TrainConfig(**fields).optimizer


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_param_groups_exempt_norms_biases_embeddings() -> None:
    model = build_model("gpt-tiny", **worker.MODEL_OVERRIDES)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    exempt = sorted(names[id(p)] for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in decayed)
    assert {"embed.tokens.weight", "embed.positions.weight", "norm.weight", "norm.bias"} <= set(exempt)
    # 2 blocks x (qkv, out, up, down) matrices are decayed; every parameter is in exactly one group
    assert len(decayed) == 8
    assert len(decayed) + len(exempt) == len(names)


def test_lr_schedules() -> None:
    spec = optimizer_config(lr=1.0, max_steps=11, warmup_steps=1, min_lr_ratio=0.1)
    assert lr_factor(0, spec=spec) == 0.5  # warmup never starts at 0
    assert lr_factor(1, spec=spec) == 1.0
    assert math.isclose(lr_factor(6, spec=spec), 0.55)  # cosine half-way: (1 + 0.1) / 2
    assert math.isclose(lr_factor(11, spec=spec), 0.1)
    assert math.isclose(lr_factor(50, spec=spec), 0.1)
    linear = optimizer_config(lr=1.0, max_steps=11, warmup_steps=1, schedule="linear", min_lr_ratio=0.0)
    assert math.isclose(lr_factor(6, spec=linear), 0.5)
    constant = optimizer_config(lr=1.0, max_steps=11, schedule="constant")
    assert lr_factor(10, spec=constant) == 1.0


def test_scheduler_state_is_plain_json() -> None:
    model = torch.nn.Linear(2, 2)
    spec = optimizer_config(lr=0.5, max_steps=4, warmup_steps=2)
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))
    fresh = build_scheduler(build_optimizer(model, spec), spec)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == scheduler.get_last_lr() == [0.5 * lr_factor(3, spec=spec)] * 2  # 2 groups


def test_deepspeed_json_auto_fields_are_filled() -> None:
    ds = DeepSpeedConfig(zero_stage=3, offload="params")
    train = TrainConfig(
        precision="bf16", micro_batch_size=4, grad_accum=8, lr=1e-3, max_steps=10, clip_grad=0.5
    )
    config = fill_model_fields(fill_device_fields(resolve_config(ds, train), cuda=False), hidden_size=64)
    assert default_config_path(ds) == CONFIG_DIR / "zero3-offload.json"
    # DeepSpeed computes train_batch_size (micro x accum x world) itself: the world size is not known yet
    assert "train_batch_size" not in config and config["gradient_accumulation_steps"] == 8
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert "optimizer" not in config  # checked, then replaced by the engine's own AdamW
    assert "auto" not in json.dumps(config)


@pytest.mark.parametrize(
    ("stage", "sizes"),
    [
        (1, {"reduce_bucket_size": 10_000, "allgather_bucket_size": 10_000}),
        (2, {"reduce_bucket_size": 10_000, "allgather_bucket_size": 10_000}),
        (3, {"reduce_bucket_size": 10_000, "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0,
             "stage3_param_persistence_threshold": 1_000}),
    ],
)  # fmt: skip
def test_deepspeed_bucket_sizes_follow_the_model_unless_given(tmp_path, stage: int, sizes: dict) -> None:
    """'auto' sizes come from the hidden size h (h^2, 10 h; ZeRO-3 prefetches nothing and keeps no gathered
    parameter for reuse); a number in the JSON is kept."""
    resolved = resolve_config(DeepSpeedConfig(zero_stage=stage), TrainConfig())
    zero = fill_model_fields(resolved, hidden_size=100)["zero_optimization"]
    assert {key: zero[key] for key in sizes} == sizes
    given = json.loads((CONFIG_DIR / f"zero{stage}.json").read_text())
    given["zero_optimization"]["reduce_bucket_size"] = 12345
    (tmp_path / "ds.json").write_text(json.dumps(given))
    resolved = resolve_config(DeepSpeedConfig(zero_stage=stage, config=tmp_path / "ds.json"), TrainConfig())
    zero = fill_model_fields(resolved, hidden_size=100)["zero_optimization"]
    assert {key: zero[key] for key in sizes} == {**sizes, "reduce_bucket_size": 12345}


def test_every_shipped_deepspeed_json_resolves() -> None:
    files = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    assert sorted(files) == sorted(
        [f"zero{s}.json" for s in range(4)] + ["zero2-offload.json", "zero3-offload.json"]
    )
    for name in files:
        stage = int(name[4])
        offload = ("params" if stage == 3 else "optimizer") if "offload" in name else "none"
        ds = DeepSpeedConfig(zero_stage=stage, offload=offload, config=CONFIG_DIR / name)
        assert resolve_config(ds, TrainConfig())["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            r"train_micro_batch_size_per_gpu=8 conflicts with train.micro_batch_size",
        ),
        (
            {"zero_optimization": {"stage": 2}},
            r"zero_optimization.stage=2 conflicts with engine.deepspeed.zero_stage",
        ),
        ({"train_batch_size": 64}, r"train_batch_size=64; set it to \"auto\""),
        ({"bf16": {"enabled": True}}, r"bf16.enabled=True conflicts with train.precision"),
        ({"optimizer": {"type": "Lamb"}}, r"only AdamW"),
        ({"scheduler": {"type": "WarmupLR"}}, r"remove the 'scheduler' section"),
    ],
)
def test_deepspeed_json_conflicts_name_the_key(tmp_path, content: dict, match: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match):
        resolve_config(DeepSpeedConfig(zero_stage=1, config=path), TrainConfig(micro_batch_size=2))


def test_deepspeed_offload_needs_a_sharded_stage() -> None:
    with pytest.raises(ConfigError, match="offload=params needs engine.deepspeed.zero_stage=3"):
        default_config_path(DeepSpeedConfig(zero_stage=2, offload="params"))
    with pytest.raises(ConfigError, match="offload=optimizer needs engine.deepspeed.zero_stage 2 or 3"):
        default_config_path(DeepSpeedConfig(zero_stage=0, offload="optimizer"))


def test_single_process_helpers() -> None:
    info = init_distributed(timeout_s=10)
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert any_rank(True) and not any_rank(False)
    barrier()


@pytest.mark.parametrize("case", ["ds-z2", "fsdp"])
def test_engine_single_process(tmp_path, case: str) -> None:
    result, final = worker.check_engine(case, tmp_path, init_distributed(timeout_s=60))
    worker.assert_result(result, sharded=False)
    assert final is not None and final.keys() == worker.make_model("gpt", seed=0).state_dict().keys()
    # a later run in this process (e.g. an in-process resume) must still see a lone process
    assert (init_distributed(timeout_s=60).world_size, os.environ.get("RANK")) == (1, None)


def test_launcher_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from pretrain.engines.dist import _launch_env

    assert _launch_env() is None  # no launcher: one process
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(LaunchEnvironmentError, match="rank 3 of 8: MASTER_ADDR and MASTER_PORT must be set"):
        _launch_env()
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    env = _launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3,
        8,
        1,
        "node1",
        29400,
    )
    assert not env.agent_store  # srun alone: rank 0 hosts the store
    monkeypatch.setenv("RANK", "5")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    env = _launch_env()
    assert (env.rank, env.world_size, env.agent_store, env.restart_count) == (5, 16, True, 2)

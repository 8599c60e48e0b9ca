"""Engine state across a world-size change: save at one world size, resume at another, same global batches.

The data is numbered as data/layout.py numbers it: global micro-batch k is a fixed function of k, and rank r
takes k = t x B + r x A + a at step t (A = B / world). Dropout is on and seeded per global micro-batch (as
the loop does), so a step's numbers depend on the world size only through floating-point reduction order.

Under torchrun: `python elastic_worker.py OUT_DIR straight CASE ...` trains STEPS steps and saves the engine
at SAVE_AT (into OUT_DIR/CASE-ckpt); `python elastic_worker.py OUT_DIR resumed CASE ...` loads that
checkpoint into a fresh engine with another initialisation and trains from SAVE_AT to STEPS. Rank 0 writes
OUT_DIR/CASE.{phase}-{world}.json: the loss and grad norm of each step and the final weights' checksum.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from models import build_model
from pretrain.config import DeepSpeedConfig, EngineConfig, EngineSpec, FSDPConfig, TrainConfig, engine_spec
from pretrain.engines import DistInfo, Engine, barrier, build_engine, end_process, init_distributed, shutdown
from pretrain.engines.base import dropout_seed
from tests.pretrain.engines_worker import MODEL_OVERRIDES, SEQ, _batch

GLOBAL_BATCH = 4  # micro-batches per step, over all ranks: world sizes 1, 2 and 4 keep it
STEPS = 4
SAVE_AT = 2
SEED = 0
ENGINES: dict[str, dict] = {
    "ds-z0": dict(backend="deepspeed", zero_stage=0),
    "ds-z2": dict(backend="deepspeed", zero_stage=2),
    "ds-z3": dict(backend="deepspeed", zero_stage=3),
    "ddp": dict(backend="ddp"),
    "fsdp": dict(backend="fsdp"),
}
FAMILIES = ("gpt", "bert", "t5")
# ZeRO-0 (the tiny configs' default; DeepSpeed's own checkpoint is whole there) with one family
CASES = [f"{engine}-{family}" for engine in ENGINES if engine != "ds-z0" for family in FAMILIES] + [
    "ds-z0-gpt"
]


def global_micro_batch(family: str, k: int) -> dict[str, Tensor]:
    """Global micro-batch k: the same tensors whichever rank draws it."""
    pool = torch.randint(0, 16, (32, SEQ), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(k)
    return _batch(family, pool[torch.randint(0, len(pool), (4,), generator=g)], g)


def spec_for(engine_case: str, world_size: int) -> EngineSpec:
    """The engine's inputs at `world_size`: grad_accum keeps the global batch."""
    options = dict(ENGINES[engine_case])
    backend = options.pop("backend")
    precision = options.pop("precision", "fp32")
    engine = EngineConfig(
        backend=backend,
        deepspeed=DeepSpeedConfig(**options) if backend == "deepspeed" else None,
        fsdp=FSDPConfig() if backend == "fsdp" else None,
    )
    train = TrainConfig(
        micro_batch_size=4, grad_accum=GLOBAL_BATCH // world_size, precision=precision, lr=3e-3, max_steps=STEPS, warmup_steps=1,
        clip_grad=1.0,
    )  # fmt: skip
    return engine_spec(engine, train)


def build(case: str, dist: DistInfo, init_seed: int) -> tuple[Engine, str]:
    engine_case, family = case.rsplit("-", 1)
    torch.manual_seed(init_seed)
    overrides = {**MODEL_OVERRIDES, "n_layers": 1, "dropout": 0.1, "attention_dropout": 0.1}
    if family != "t5":
        overrides["max_seq_len"] = SEQ
    model = build_model(f"{family}-tiny", **overrides)
    return build_engine(spec_for(engine_case, dist.world_size), model, dist), family


def step(engine: Engine, family: str, t: int) -> dict[str, float]:
    dist = engine.dist
    A = GLOBAL_BATCH // dist.world_size
    ks = [t * GLOBAL_BATCH + dist.rank * A + a for a in range(A)]
    out = engine.train_step(
        [global_micro_batch(family, k) for k in ks], seeds=[dropout_seed(SEED, k) for k in ks]
    )
    return {"step": t + 1, "loss": out.loss, "grad_norm": out.grad_norm}


def run_case(case: str, phase: str, out_dir: Path, dist: DistInfo) -> None:
    ckpt = out_dir / f"{case}-ckpt"
    if phase == "straight":
        if dist.is_main:
            ckpt.mkdir(parents=True, exist_ok=True)
        barrier()
        engine, family = build(case, dist, init_seed=0)
        records = []
        for t in range(STEPS):
            if t == SAVE_AT:
                engine.save(ckpt)
            records.append(step(engine, family, t))
    else:
        saved = json.loads((out_dir / f"{case}.world.json").read_text())["world_size"]
        engine, family = build(case, dist, init_seed=1)
        engine.load(ckpt, saved_world_size=saved)
        records = [step(engine, family, t) for t in range(SAVE_AT, STEPS)]
    weights = engine.full_state_dict()
    if dist.is_main:
        assert weights is not None
        result = {"records": records, "weights_sum": sum(float(w.double().sum()) for w in weights.values())}
        (out_dir / f"{case}.{phase}-{dist.world_size}.json").write_text(json.dumps(result))
        if phase == "straight":
            (out_dir / f"{case}.world.json").write_text(json.dumps({"world_size": dist.world_size}))
    del engine
    barrier()


def main(out_dir: Path, phase: str, cases: list[str]) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    dist = init_distributed(timeout_s=120)
    try:
        for case in cases:
            run_case(case, phase, out_dir, dist)
    finally:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    end_process()

"""Engine checks shared by the single-process tests and the 2-process torchrun tests.

One `check_engine` run trains a tiny GPT for STEPS steps (saving the engine half-way), resumes a fresh engine
with a different init from that checkpoint, injects a NaN loss on the last rank, and records numbers for
the test to assert. Under torchrun: `python engines_worker.py OUT_DIR CASE [CASE ...]`; rank 0 writes
OUT_DIR/CASE.json and OUT_DIR/CASE.safetensors (the final full state dict).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models import build_model
from pretrain.config import DeepSpeedConfig, EngineConfig, EngineSpec, FSDPConfig, TrainConfig, engine_spec
from pretrain.engines import DistInfo, Engine, barrier, build_engine, end_process, init_distributed, shutdown

STEPS = 6
MICRO_BATCH = 4
GRAD_ACCUM = 2
SEQ = 16
VOCAB = 64
MODEL_OVERRIDES = dict(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=2, d_ff=128)

CASES: dict[str, dict] = {
    "ds-z0": dict(backend="deepspeed", zero_stage=0),
    "ds-z1": dict(backend="deepspeed", zero_stage=1),
    "ds-z2": dict(backend="deepspeed", zero_stage=2),
    "ds-z3": dict(backend="deepspeed", zero_stage=3),
    "ds-z3-bf16": dict(backend="deepspeed", zero_stage=3, precision="bf16"),
    "ds-z2-offload": dict(backend="deepspeed", zero_stage=2, offload="optimizer"),
    "ddp": dict(backend="ddp"),
    "fsdp": dict(backend="fsdp"),
    "fsdp-bf16": dict(backend="fsdp", precision="bf16"),
    # the other families: an encoder-decoder (two block stacks) and a masked LM (logits only at masks)
    "ds-z3-t5": dict(backend="deepspeed", zero_stage=3, family="t5"),
    "fsdp-bert": dict(backend="fsdp", family="bert"),
}


def case_spec(case: str) -> tuple[EngineSpec, str]:
    """The engine inputs and model family of a case (the sections a run config would hold)."""
    options = dict(CASES[case])
    family = options.pop("family", "gpt")
    precision = options.pop("precision", "fp32")
    backend = options.pop("backend")
    engine = EngineConfig(
        backend=backend,
        deepspeed=DeepSpeedConfig(**options) if backend == "deepspeed" else None,
        fsdp=FSDPConfig() if backend == "fsdp" else None,
    )
    train = TrainConfig(
        micro_batch_size=MICRO_BATCH, grad_accum=GRAD_ACCUM, precision=precision, lr=3e-3, max_steps=STEPS,
        warmup_steps=1, schedule="cosine", clip_grad=1.0,
    )  # fmt: skip
    return engine_spec(engine, train), family


def make_model(family: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    overrides = MODEL_OVERRIDES if family == "t5" else {**MODEL_OVERRIDES, "max_seq_len": SEQ}
    return build_model(f"{family}-tiny", **overrides)


def _batch(family: str, ids: Tensor, g: torch.Generator) -> dict[str, Tensor]:
    """A learnable task per objective: copy (clm), fill in the masks (mlm), reverse the first half (span)."""
    if family == "gpt":
        return {"input_ids": ids, "labels": ids.clone()}
    if family == "t5":
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids[:, : SEQ // 2].flip(1),
        }
    masked = torch.rand(ids.shape, generator=g) < 0.3
    return {
        "input_ids": ids.masked_fill(masked, 3),
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(~masked, -100),
    }


def micro_batches(family: str, step: int, rank: int, *, poison: bool = False) -> list[dict[str, Tensor]]:
    """From a fixed pool of 32 sequences over 16 tokens; poison -> every label ignored (CE over none is NaN)."""
    pool = torch.randint(0, 16, (32, SEQ), generator=torch.Generator().manual_seed(1234))
    out = []
    for i in range(GRAD_ACCUM):
        g = torch.Generator().manual_seed(step * 1000 + rank * 10 + i)
        batch = _batch(family, pool[torch.randint(0, len(pool), (MICRO_BATCH,), generator=g)], g)
        if poison:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        out.append(batch)
    return out


def train(engine: Engine, family: str, start: int, stop: int) -> list[dict]:
    outs = []
    for step in range(start, stop):
        torch.manual_seed(10_000 + step)  # the loop restores RNG per step; dropout is 0 here anyway
        out = engine.train_step(micro_batches(family, step, engine.dist.rank))
        outs.append({"loss": out.loss, "grad_norm": out.grad_norm, "lr": out.lr, "skipped": out.skipped})
    return outs


def local_param_fraction(model: nn.Module) -> float:
    """Share of the model's parameter elements this rank stores (ZeRO-3 / FSDP shard; 1.0 if replicated)."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3
            local, total = local + p.ds_tensor.numel(), total + p.ds_numel
        elif hasattr(p, "to_local"):  # DTensor (FSDP2)
            local, total = local + p.to_local().numel(), total + p.numel()
        else:
            local, total = local + p.numel(), total + p.numel()
    return local / total


def check_engine(case: str, work_dir: Path, dist: DistInfo) -> tuple[dict, dict[str, Tensor] | None]:
    spec, family = case_spec(case)
    ckpt = work_dir / f"{case}-ckpt"
    if dist.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    barrier()

    engine = build_engine(spec, make_model(family, seed=0), dist)
    fraction = local_param_fraction(engine.model)
    straight = train(engine, family, 0, STEPS // 2)
    engine.save(ckpt)
    straight += train(engine, family, STEPS // 2, STEPS)
    final = engine.full_state_dict()

    # NaN loss on the last rank only: every rank must skip, weights and schedule must not move.
    torch.manual_seed(0)
    poisoned = engine.train_step(
        micro_batches(family, STEPS, dist.rank, poison=dist.rank == dist.world_size - 1)
    )
    after_skip = engine.full_state_dict()
    next_ok = train(engine, family, STEPS, STEPS + 1)[0]
    eval_loss = engine.eval_loss(micro_batches(family, 0, dist.rank)[0])
    del engine

    barrier()
    resumed_engine = build_engine(spec, make_model(family, seed=1), dist)
    resumed_engine.load(ckpt)
    resumed = train(resumed_engine, family, STEPS // 2, STEPS)
    resumed_final = resumed_engine.full_state_dict()

    result = {
        "case": case,
        "world_size": dist.world_size,
        "local_param_fraction": fraction,
        "straight": straight,
        "resumed": resumed,
        "poisoned": {"loss": poisoned.loss, "grad_norm": poisoned.grad_norm, "skipped": poisoned.skipped},
        "poisoned_lr": poisoned.lr,
        "next_after_skip": next_ok,
        "eval_loss": eval_loss,
    }
    if dist.is_main:
        reference = make_model(family, seed=0).state_dict()
        result["keys_match"] = list(final) == list(reference)
        result["shapes_match"] = all(final[k].shape == v.shape for k, v in reference.items())
        result["dtypes"] = sorted({str(t.dtype) for t in final.values()})
        result["weights_unchanged_by_skip"] = all(torch.equal(final[k], after_skip[k]) for k in final)
        result["resumed_weights_equal"] = all(torch.equal(final[k], resumed_final[k]) for k in final)
    return result, final


def main(out_dir: Path, cases: list[str]) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    dist = init_distributed(timeout_s=120)
    try:
        for case in cases:
            result, final = check_engine(case, out_dir, dist)
            if dist.is_main:
                (out_dir / f"{case}.json").write_text(json.dumps(result, allow_nan=True))
                save_file({k: v.clone() for k, v in final.items()}, out_dir / f"{case}.safetensors")
    finally:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    end_process()


def assert_result(result: dict, *, sharded: bool) -> None:
    """What every engine must show, in one process or several (called by the tests)."""
    straight, resumed, half = result["straight"], result["resumed"], STEPS // 2
    assert straight[-1]["loss"] < straight[0]["loss"] - 0.3, [s["loss"] for s in straight]
    assert not any(s["skipped"] for s in straight)
    assert resumed == straight[half:], "resume is not bitwise identical"
    assert result["resumed_weights_equal"]
    assert result["keys_match"] and result["shapes_match"] and result["dtypes"] == ["torch.float32"]
    poisoned = result["poisoned"]
    assert poisoned["skipped"] and poisoned["loss"] != poisoned["loss"]  # NaN
    assert result["weights_unchanged_by_skip"]
    after = result["next_after_skip"]
    assert not after["skipped"] and after["lr"] == result["poisoned_lr"]  # the schedule did not advance
    assert after["loss"] < straight[-1]["loss"] + 0.1
    assert result["eval_loss"] < straight[0]["loss"] - 0.3
    expected_fraction = 1 / result["world_size"] if sharded else 1.0
    assert abs(result["local_param_fraction"] - expected_fraction) < 0.05, result["local_param_fraction"]

"""Peak memory of a training step with and without gradient checkpointing, and per-rank model-state
memory under ZeRO 0/1/2/3 at world size 2 (torchrun, gloo, through pretrain.engines' DeepSpeed engine).

How it is measured on a CPU, where PyTorch keeps no allocator statistics: every configuration runs in a
fresh process with glibc told to serve every allocation of 64 KiB or more from mmap and to return freed
memory at once (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the resident set follows the live
tensors instead of the allocator's cache. The process first builds the model and runs one step (so the
optimizer states exist), then resets the kernel's high-water mark (/proc/self/clear_refs = 5), reads its
resident set (model states), runs one more step and reads the high-water mark: peak - states is what the
step itself needed (activations, gradients, temporaries).

For ZeRO, each rank reports, at the moment its second AdamW update starts (an optimizer step pre-hook),
(a) the bytes of the distinct tensor storages it holds (params, their .grad, DeepSpeed's partitions and
buffers, optimizer states), found by walking live objects, and (b) its resident-set growth since before
the model was built (also counts gloo and allocator overheads); next to them the analytic figure for
fp32 AdamW (params 4, grads 4, two moments 8 bytes per parameter, divided by the world size as the stage
says) so one can see what DeepSpeed adds (fp32 master partitions, bucket buffers).

Engines (`--part engines`): per engine (DDP, ZeRO-1, 2, 3, 3+offload, FSDP) and world size (1, 2, 4), one
torchrun job builds a GPT from a recipe (ZeRO-3 / FSDP: sharded from the first byte) and trains 4 steps
(seq 64, micro-batch 2, fp32). Each rank reads its resident set before the build (the per-process
baseline: torch, gloo, the engine's library, the model's code), its high-water mark over the build, and over the steps
(DDP's reaches its steady value only at the third step: bench/NOTES.md, "Steady-state peaks");
next to them `pretrain.plan`'s model states and activations, the ratio step peak / (baseline + predicted
states + activations), and the planner's whole prediction (baseline + states + buffers + activations) with
measured / predicted.

    .venv/bin/python -m bench.memory                 # checkpointing and ZeRO tables
    .venv/bin/python -m bench.memory --part checkpointing --quick
    .venv/bin/python -m bench.memory --part zero
    .venv/bin/python -m bench.memory --part engines --model gpt2-small --worlds 1,2,4
    .venv/bin/python -m bench.memory --part engines --model gpt2-medium --engines zero3,zero3-offload,fsdp --worlds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench._common import FAMILIES, QUICK, ROOT, SMALL, Shape, adamw, make_batch, print_table, train_step_fn
from pretrain.engines.base import storage_bytes
from pretrain.engines.dist import end_process

MIB = 2**20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model(family: str, shape: Shape, **overrides) -> torch.nn.Module:
    from models import build_model

    torch.manual_seed(0)
    sizes = dict(vocab_size=shape.vocab_size, n_layers=shape.n_layers, d_model=shape.d_model,
                 n_heads=shape.n_heads, d_ff=shape.d_ff)  # fmt: skip
    if family == "t5":
        sizes["d_kv"] = shape.d_kv
    else:
        sizes["max_seq_len"] = shape.seq_len
    return build_model(f"{family}-tiny", **sizes, **overrides)


def step_worker(family: str, shape: Shape, checkpointing: bool) -> dict:
    """In a fresh process: model-state bytes and the peak of one training step (resident set, bytes)."""
    model = _model(family, shape, gradient_checkpointing=checkpointing).train()
    batch = make_batch(family, shape)
    step = train_step_fn(model, batch, "fp32", adamw(model))
    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
    states = _status_kib("VmRSS") * 1024
    step()
    peak = _status_kib("VmHWM") * 1024
    return {"states": states, "peak": peak}


def run_checkpointing(shape: Shape, families: list[str]) -> None:
    rows = []
    for family in families:
        result = {}
        for ckpt in (False, True):
            cmd = [
                sys.executable,
                "-m",
                "bench.memory",
                "--step-worker",
                family,
                "--shape-json",
                json.dumps(shape.__dict__),
            ]
            cmd += ["--checkpointing"] if ckpt else []
            out = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}, cwd=ROOT
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{family} checkpointing={ckpt} failed:\n{out.stderr[-2000:]}")
            result[ckpt] = json.loads(line[7:])
        act = {c: (r["peak"] - r["states"]) / MIB for c, r in result.items()}
        rows.append([
            family, f"{result[False]['states'] / MIB:.0f}", f"{result[False]['peak'] / MIB:.0f}",
            f"{act[False]:.0f}", f"{result[True]['peak'] / MIB:.0f}", f"{act[True]:.0f}",
            f"{act[False] / act[True]:.1f}x",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    print(f"\nfp32, {shape}; resident MiB (process incl. torch runtime)")
    print_table(
        ["family", "before step", "peak", "step needs", "peak (ckpt)", "step needs (ckpt)", "saved"], rows
    )


# --- ZeRO -----------------------------------------------------------------------------------------


def model_state_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, seen: set[int]
) -> dict[str, int]:
    """This rank's params (a ZeRO-3 rank holds `ds_tensor`, its partition), gradients, the optimizer's own
    fp32 copies of the params (DeepSpeed's partitions, when they are not the model's tensors), and AdamW's
    moments; storages in `seen` are skipped (DeepSpeed steps its param groups one at a time)."""
    model_params = list(model.parameters())
    params = storage_bytes([getattr(p, "ds_tensor", p) for p in model_params], seen)
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    master = storage_bytes(optimized, seen)
    grads = storage_bytes([p.grad for p in optimized + model_params if p.grad is not None], seen)
    moments = storage_bytes([v for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor)], seen)  # fmt: skip
    return {"params": params, "master": master, "grads": grads, "moments": moments}


def zero_worker(stage: int, shape: Shape, out: Path) -> None:
    """One rank under torchrun: build the engine at `stage`, run two steps, and at the moment the second
    AdamW update starts (gradients, parameters and both moments all exist then) record what it holds."""
    from pretrain.config import DeepSpeedConfig, EngineConfig, TrainConfig, engine_spec
    from pretrain.engines import build_engine, init_distributed, shutdown

    dist = init_distributed(timeout_s=300)
    gc.collect()
    before_rss = _status_kib("VmRSS") * 1024
    model = _model("gpt", shape)
    n_params = sum(p.numel() for p in model.parameters())
    spec = engine_spec(
        EngineConfig(backend="deepspeed", deepspeed=DeepSpeedConfig(zero_stage=stage)),
        TrainConfig(micro_batch_size=shape.batch_size, lr=1e-4, max_steps=10),
    )
    engine = build_engine(spec, model, dist)
    held: dict[str, int] = {}
    seen: set[int] = set()

    def measure(optimizer: torch.optim.Optimizer, *_: object) -> None:  # inside DeepSpeed's step
        for key, value in model_state_bytes(engine.model, optimizer, seen).items():
            held[key] = held.get(key, 0) + value
        held["rss"] = _status_kib("VmRSS") * 1024 - before_rss

    engine.train_step([make_batch("gpt", shape, seed=dist.rank)])
    hook = register_optimizer_step_pre_hook(measure)
    engine.train_step([make_batch("gpt", shape, seed=10 + dist.rank)])
    hook.remove()
    (out / f"rank{dist.rank}.json").write_text(json.dumps({"n": n_params, **held}))
    shutdown()


def analytic(stage: int, n: int, world: int) -> float:
    """fp32 AdamW model states per rank (bytes): params 4, grads 4, moments 8 per parameter (ZeRO paper)."""
    p, g, o = 4.0 * n, 4.0 * n, 8.0 * n
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        p /= world
    return p + g + o


def run_zero(shape: Shape, world: int = 2) -> None:
    rows = []
    for stage in (0, 1, 2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(name, None)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "bench.memory", "--zero-worker", str(stage), "--out", tmp, "--shape-json", json.dumps(shape.__dict__)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
            results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            if proc.returncode != 0 or len(results) != world:
                lines = proc.stderr.splitlines()
                errors = [x for x in lines if x.startswith("[rank") and "Error" in x] or ["no result files"]
                rows.append([str(stage), "failed", errors[-1][-100:], "", "", ""])
                print(
                    f"ZeRO-{stage} failed (exit {proc.returncode}); its output ends:",
                    *lines[-60:],
                    sep="\n",
                    flush=True,
                )
                continue
        n, r0 = results[0]["n"], results[0]
        states = r0["params"] + r0["master"] + r0["grads"] + r0["moments"]
        rows.append([
            str(stage), f"{n / 1e6:.2f} M", f"{analytic(stage, n, world) / MIB:.1f}", f"{states / MIB:.1f}",
            " / ".join(f"{r0[k] / MIB:.1f}" for k in ("params", "master", "grads", "moments")),
            " / ".join(f"{r['rss'] / MIB:.0f}" for r in results),
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    print(f"\nGPT {shape}, fp32, DeepSpeed through pretrain.engines, world size {world} (gloo); MiB per rank")
    print_table(
        ["ZeRO", "params", "analytic states", "measured states (rank 0)",
         "params / fp32 copy / grads / moments", "RSS growth (r0 / r1)"],
        rows,
    )  # fmt: skip


# --- engines, built sharded ----------------------------------------------------------------------

ENGINE_KEYS = {  # pretrain.plan's engine names -> the engine sections that select them
    "ddp": dict(backend="ddp"),
    "zero1": dict(backend="deepspeed", zero_stage=1),
    "zero2": dict(backend="deepspeed", zero_stage=2),
    "zero3": dict(backend="deepspeed", zero_stage=3),
    "zero3-offload": dict(backend="deepspeed", zero_stage=3, offload="params"),
    "fsdp": dict(backend="fsdp"),
}
ENGINE_SEQ, ENGINE_BATCH, ENGINE_STEPS = 64, 2, 4


def engine_worker(engine: str, preset: str, out: Path) -> None:
    """One rank under torchrun: baseline, build peak and step peak of `engine` on `preset` (bytes)."""
    from models import get_config
    from pretrain.config import DeepSpeedConfig, EngineConfig, FSDPConfig, TrainConfig, engine_spec
    from pretrain.engines import ModelRecipe, build_engine, init_distributed, shutdown

    dist = init_distributed(timeout_s=900)
    keys = dict(ENGINE_KEYS[engine])
    backend = keys.pop("backend")
    section = EngineConfig(
        backend=backend,
        deepspeed=DeepSpeedConfig(**keys) if backend == "deepspeed" else None,
        fsdp=FSDPConfig() if backend == "fsdp" else None,
        dist_timeout_s=900,
    )
    spec = engine_spec(section, TrainConfig(micro_batch_size=ENGINE_BATCH, lr=1e-4, max_steps=10))
    if backend == "deepspeed":
        import deepspeed  # noqa: F401  (its import is part of the baseline, not of the build)
    else:
        import accelerate  # noqa: F401
    config = get_config(preset, max_seq_len=max(ENGINE_SEQ, 64))
    recipe = ModelRecipe(config=config, seed=0)
    recipe.model_class()  # the model code's import (torch._dynamo, through the kernels: ~80 MiB) is baseline too
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS") * 1024
    engine_ = build_engine(spec, recipe, dist)
    build = _status_kib("VmHWM") * 1024
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    g = torch.Generator().manual_seed(dist.rank)
    for _ in range(ENGINE_STEPS):
        ids = torch.randint(0, config.vocab_size, (ENGINE_BATCH, ENGINE_SEQ), generator=g)
        engine_.train_step([{"input_ids": ids, "labels": ids.clone()}])
    step = _status_kib("VmHWM") * 1024
    n = sum(getattr(p, "ds_numel", p.numel()) for p in engine_.model.parameters())
    result = {"n": n, "baseline": baseline, "build": build, "step": step}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    shutdown()


def run_engines(preset: str, engines: list[str], worlds: list[int]) -> None:
    from models import get_config
    from pretrain.plan import ModelShape, activations_per_sample, buffers, model_states, peak

    shape = ModelShape.of(get_config(preset, max_seq_len=64))
    acts = ENGINE_BATCH * activations_per_sample(shape, ENGINE_SEQ, "fp32", checkpointing=False)
    rows = []
    for engine in engines:
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
                for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(name, None)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       "-m", "bench.memory", "--engine-worker", engine, "--model", preset, "--out", tmp]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
                results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            if proc.returncode != 0 or len(results) != world:
                lines = [
                    x for x in proc.stderr.splitlines() if "Error" in x or "Killed" in x or "exitcode" in x
                ]
                rows.append(
                    [engine, str(world), "failed", (lines or ["no result"])[-1][-90:], "", "", "", "", "", ""]
                )
                print(" | ".join(rows[-1]), flush=True)
                continue
            states = model_states(engine, results[0]["n"], world, "fp32")
            base = max(r["baseline"] for r in results)
            build, step = max(r["build"] for r in results), max(r["step"] for r in results)
            predicted = base + states.total + acts
            planner = base + peak(
                engine, states, buffers(engine, shape, "fp32", world), acts, n=results[0]["n"], world=world
            )
            rows.append([
                engine, str(world), f"{states.total / MIB:.0f}", f"{base / MIB:.0f}", f"{acts / MIB:.0f}",
                f"{build / MIB:.0f}", f"{step / MIB:.0f}", f"{step / predicted:.2f}", f"{planner / MIB:.0f}",
                f"{step / planner:.2f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    print(f"\n{preset} ({shape.params / 1e6:.0f} M), fp32, seq {ENGINE_SEQ}, micro-batch {ENGINE_BATCH}, {ENGINE_STEPS} steps; "
          "MiB per rank (max over ranks)")  # fmt: skip
    print_table(
        ["engine", "ranks", "predicted states", "baseline", "predicted activations", "peak at build",
         "peak at step", "step / (baseline + states + activations)", "planner + baseline",
         "measured / planner"],
        rows,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "checkpointing", "zero", "engines"), default="all")
    parser.add_argument("--model", default="gpt2-small", help="engines: the preset")
    parser.add_argument("--engines", default=",".join(ENGINE_KEYS), help="engines: which")
    parser.add_argument("--worlds", default="1,2,4", help="engines: world sizes")
    parser.add_argument("--engine-worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the small bench shape at 2 layers / width 128")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--step-worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = Shape(**json.loads(args.shape_json)) if args.shape_json else (QUICK if args.quick else SMALL)
    if args.step_worker:
        print("RESULT " + json.dumps(step_worker(args.step_worker, shape, args.checkpointing)), flush=True)
    elif args.zero_worker is not None:
        zero_worker(args.zero_worker, shape, args.out)
        end_process()
    elif args.engine_worker:
        engine_worker(args.engine_worker, args.model, args.out)
        end_process()
    elif args.part == "engines":
        run_engines(args.model, args.engines.split(","), [int(w) for w in args.worlds.split(",")])
    else:
        if args.part in ("all", "checkpointing"):
            run_checkpointing(shape, args.families.split(","))
        if args.part in ("all", "zero"):
            # Model states do not depend on the batch: a short one keeps the 2-rank steps cheap.
            run_zero(dataclasses.replace(shape, batch_size=2, seq_len=64))


if __name__ == "__main__":
    main()

"""GPU MFU of gpt2-small .. gpt2-large: bf16, DeepSpeed ZeRO-1 through our engine, one GPU, one call.

Each preset runs in its own subprocess (a clean CUDA context, and one out-of-memory does not end the
table); the parent prints the table. Without DeepSpeed on the machine it falls back to a plain loop
(bf16 autocast, fused AdamW) and says so in the table. Run it with bench/gpu_mfu.sh, which picks the
Python and keeps the whole call under its time budget (default 420 s).

    python -m bench.gpu_mfu                          # gpt2-small, gpt2-medium, gpt2-large
    python -m bench.gpu_mfu --dry-run                # CPU, gpt-tiny: checks the logic end to end
    python -m bench.gpu_mfu --engine plain --presets gpt2-large --micro-batch 16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

from bench._common import ROOT, adamw, median, print_table, step_flops, sync, train_step_fn
from bench.mfu import datasheet_peak, matmul_peak
from models import build_model

# Micro-batches (sequences of 1024) that fit an 80 GB H100 without checkpointing, with headroom.
MICRO_BATCH = {"gpt2-small": 16, "gpt2-medium": 16, "gpt2-large": 8, "gpt-tiny": 2}


def _engine(model: torch.nn.Module, micro_batch: int, precision: str):
    from pretrain.config import DeepSpeedConfig, EngineConfig, TrainConfig, engine_spec
    from pretrain.engines import build_engine, init_distributed

    engine = EngineConfig(backend="deepspeed", deepspeed=DeepSpeedConfig(zero_stage=1))
    train = TrainConfig(precision=precision, micro_batch_size=micro_batch, grad_accum=1, lr=1e-4)
    return build_engine(engine_spec(engine, train), model, init_distributed())


def worker(args: argparse.Namespace) -> dict:
    """Time one preset; returns the row as a dict (printed as one JSON line for the parent)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    overrides = {"max_seq_len": args.seq_len}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    model = build_model(args.worker, dropout=0.0, attention_dropout=0.0, **overrides)
    mb = args.micro_batch or MICRO_BATCH.get(args.worker, 8)
    ids = torch.randint(0, model.config.vocab_size, (mb, args.seq_len))
    batch = {"input_ids": ids, "labels": ids.clone()}
    flops = step_flops(model, batch)
    if args.engine == "deepspeed":
        engine = _engine(model, mb, args.precision)
        step = lambda: engine.train_step([batch])  # noqa: E731
    else:
        model.to(dev).train()
        on_dev = {k: v.to(dev) for k, v in batch.items()}
        step = train_step_fn(model, on_dev, args.precision, adamw(model))
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = median(times)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return {"preset": args.worker, "micro_batch": mb, "seconds": seconds, "flops": flops, "mem_gib": peak_mem}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="gpt2-small,gpt2-medium,gpt2-large")
    parser.add_argument("--engine", choices=("auto", "deepspeed", "plain"), default="auto")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, help="default: per preset (MICRO_BATCH)")
    parser.add_argument("--vocab", type=int, help="e.g. 50304: GPT-2's vocabulary padded to a multiple of 64")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip presets once this is spent")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU check: gpt-tiny, vocab 512, seq 64, 1 + 2 steps"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine == "auto":
        args.engine = "deepspeed" if importlib.util.find_spec("deepspeed") else "plain"
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.dry_run:
        args.presets, args.seq_len, args.vocab, args.warmup, args.steps = "gpt-tiny", 64, 512, 1, 2

    gpu = torch.cuda.is_available()
    peak = matmul_peak(args.precision, repeats=3)
    sheet = datasheet_peak(args.precision)
    name = torch.cuda.get_device_name() if gpu else "CPU (dry run)"
    print(f"device: {name}; {args.precision} matmul peak measured {peak / 1e12:.1f} TFLOP/s, "
          f"datasheet {sheet / 1e12 if sheet else float('nan'):.0f}; engine: {args.engine}", flush=True)  # fmt: skip
    started, rows = time.monotonic(), []
    for preset in args.presets.split(","):
        left = args.budget_s - (time.monotonic() - started)
        if left < 30:
            rows.append([preset, "-", "-", "-", "-", "-", "-", "skipped: time budget spent"])
            continue
        cmd = [sys.executable, "-m", "bench.gpu_mfu", "--worker", preset, *_forward(args)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT, env=os.environ)
        except subprocess.TimeoutExpired:
            rows.append([preset, "-", "-", "-", "-", "-", "-", f"timed out after {left:.0f} s"])
            continue
        result = next((line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append([preset, "-", "-", "-", "-", "-", "-", f"failed: {last[:100]}"])
            continue
        r = json.loads(result)
        achieved = r["flops"] / r["seconds"]
        tokens = r["micro_batch"] * args.seq_len / r["seconds"]
        rows.append([
            preset, str(r["micro_batch"]), f"{r['seconds'] * 1e3:.0f}", f"{tokens:,.0f}",
            f"{achieved / 1e12:.1f}", f"{100 * achieved / sheet:.1f}%" if sheet else "-",
            f"{100 * achieved / peak:.1f}%", f"{r['mem_gib']:.1f} GiB" if gpu else "-",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
        gc.collect()
    print()
    print_table(
        [
            "preset",
            "micro-batch",
            "step ms",
            "tokens/s",
            "TFLOP/s",
            "MFU (datasheet)",
            "MFU (measured)",
            "peak mem",
        ],
        rows,
    )


def _forward(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, as command-line arguments."""
    out = ["--engine", args.engine, "--precision", args.precision, "--seq-len", str(args.seq_len)]
    out += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.micro_batch:
        out += ["--micro-batch", str(args.micro_batch)]
    if args.vocab:
        out += ["--vocab", str(args.vocab)]
    return out


if __name__ == "__main__":
    main()

"""Model FLOPs utilisation: measured matmul peak of this device, then MFU of training steps of presets.

MFU = step FLOPs (the model's own matmul count, `flops_per_token`, through `bench._common.step_flops`) /
step time / peak. The peak is *measured* here (best of several large square matmuls in the same dtype), so
on a CPU the figure says how close a step gets to what this machine's matrix units actually deliver;
on a GPU the datasheet peak is shown too, since that is what published MFU numbers divide by.
The step is the one `pretrain train` runs (forward, backward, clipping, fused AdamW), plain PyTorch in
one process; bench/gpu_mfu.py measures through the DeepSpeed engine.

    .venv/bin/python -m bench.mfu                 # tiny + small presets, fp32 and bf16 (CPU)
    .venv/bin/python -m bench.mfu --quick         # tiny presets only, fewer steps
    .venv/bin/python -m bench.mfu --presets gpt2-small --precisions bf16 --seq-len 1024   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from bench._common import (
    adamw,
    interleaved,
    median,
    print_table,
    step_flops,
    sync,
    t5_target_len,
    train_step_fn,
)
from models import build_model

TINY = ("gpt-tiny", "bert-tiny", "t5-tiny")
SMALL = ("gpt2-small", "bert-base", "t5-small")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense (no sparsity) datasheet peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
DATASHEET = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12},
             "A100": {"bf16": 312e12, "fp32": 19.5e12}}  # fmt: skip


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak(precision: str, *, n: int | None = None, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul in `precision` on this device (TF32 off for fp32 on GPU)."""
    dev = device()
    if n is None:  # big enough to saturate the device, small enough for a CPU's slow bf16 path
        n = 8192 if dev.type == "cuda" else (1024 if precision == "fp32" else 384)
    a = torch.randn(n, n, device=dev, dtype=DTYPES[precision])
    b = torch.randn(n, n, device=dev, dtype=DTYPES[precision])
    calls = 10 if dev.type == "cuda" else 1
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2.0 * n**3 / best


def datasheet_peak(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[precision] for key, peaks in DATASHEET.items() if key in name), None)


def preset_batch(model: torch.nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A batch shaped like the data layer's for the model's objective, on the device."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (batch_size, seq_len), generator=g)
    if cfg.family == "gpt":
        batch = {"input_ids": ids, "labels": ids.clone()}
    elif cfg.family == "bert":
        masked = torch.rand(ids.shape, generator=g) < 0.15
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "labels": torch.where(masked, ids, -100),
        }
    else:
        labels = torch.randint(4, cfg.vocab_size, (batch_size, t5_target_len(seq_len)), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device()) for k, v in batch.items()}


def measure(
    preset: str, precision: str, *, batch_size: int, seq_len: int, warmup: int, steps: int
) -> tuple[float, float]:
    """(median seconds per training step, FLOPs per step) for `preset` as configured (its dropout kept)."""
    torch.manual_seed(0)
    model = build_model(preset).to(device()).train()
    batch = preset_batch(model, batch_size, seq_len)
    step = train_step_fn(model, batch, precision, adamw(model))
    times = interleaved({"step": step}, warmup=warmup, steps=steps)["step"]
    return median(times), step_flops(model, batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny presets, 1 + 3 steps")
    parser.add_argument("--presets", help=f"comma-separated (default: {','.join(TINY + SMALL)})")
    parser.add_argument("--precisions", help="default: fp32,bf16 on CPU, bf16 on GPU")
    parser.add_argument("--batch-size", type=int, help="default: 8 on a GPU, 2 on a CPU")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)
    presets = args.presets.split(",") if args.presets else list(TINY if args.quick else TINY + SMALL)
    gpu = device().type == "cuda"
    precisions = (args.precisions or ("bf16" if gpu else "fp32,bf16")).split(",")
    batch_size = args.batch_size or (8 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (3 if args.quick else 5)
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"

    scale, unit = (1e12, "TFLOP/s") if gpu else (1e9, "GFLOP/s")
    peaks = {p: matmul_peak(p) for p in precisions}
    print(f"device: {name}")
    print_table(
        ["precision", f"measured matmul peak {unit}", f"datasheet {unit}"],
        [
            [p, f"{peaks[p] / scale:.2f}", f"{(datasheet_peak(p) or 0) / scale:.0f}" if gpu else "-"]
            for p in peaks
        ],
    )
    print(f"\nbatch {batch_size} x seq {args.seq_len} (T5 targets {t5_target_len(args.seq_len)}), "
          f"{warmup} warmup + {steps} timed steps")  # fmt: skip
    rows = []
    for preset in presets:
        for precision in precisions:
            if precision == "bf16" and not gpu and not args.presets and preset not in TINY:
                continue  # without bf16 matrix units a CPU runs these for many minutes per step
            seconds, flops = measure(
                preset,
                precision,
                batch_size=batch_size,
                seq_len=args.seq_len,
                warmup=warmup,
                steps=steps,
            )
            achieved = flops / seconds
            sheet = datasheet_peak(precision)
            rows.append([
                preset, precision, f"{seconds * 1e3:.0f}", f"{flops / 1e9:.1f}", f"{achieved / scale:.2f}",
                f"{100 * achieved / peaks[precision]:.1f}%", f"{100 * achieved / sheet:.1f}%" if sheet else "-",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(
        ["preset", "precision", "step ms", "GFLOP/step", unit, "MFU (measured peak)", "MFU (datasheet)"],
        rows,
    )


if __name__ == "__main__":
    main()

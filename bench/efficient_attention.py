"""Approximate attention (sparse, linformer, lsh) against exact attention: quality at equal steps, then cost.

Tables printed:
1. quality (issue 16's goals at L=1024): the same small model trained for the same steps on the same batches
   of the embedded corpus (the Python standard library, `data.source=builtin`) with each backend: BERT MLM
   (exact, sparse, linformer, lsh) and GPT causal LM (exact, sparse, lsh). Validation loss after the run
   (fixed held-out batches, eval mode), its ratio to exact, training tokens/s (median step), the activation
   memory of one step (bytes autograd saves for backward, parameters excluded: deterministic) and the peak
   RSS growth from the second step on (noisy: glibc's heap grows over hundreds of steps with any backend).
   "exact" is `auto` (SDPA's fused kernel: what a user gets without an approximate backend).
2. long sequences: one forward + backward of `attend` (B=1, H=8, D=64, fp32) at L = 4k ... 32k, each
   backend against the exact chunked kernel, bidirectional (BERT) and causal (GPT; linformer has no causal
   form). Goal at 16k: each approximate backend >= 2x faster than chunked, with at most its peak memory.

Backend settings (both tables): sparse window 128 + 16 global tokens + 1 random block of 128 keys (tiles of
128); linformer k = 256; lsh 4 hashes, chunks of 64 keys (buckets ~ 2 L / 64).

Memory is the peak growth of resident memory (VmHWM - VmRSS, reset with /proc/self/clear_refs) during the
measured work (training: from the second step on), each configuration in a fresh process, as in
bench/attention.py; times are wall seconds (and
CPU seconds, all threads). Configurations run one after the other, so each row's ratio compares neighbours
in time; on a shared machine compare ratios, not absolute seconds (the load average is printed), and run
with `--passive` (OpenMP threads sleep instead of spinning at barriers, as in bench/attention.py).

    .venv/bin/python bench/efficient_attention.py                 # both tables (~15-25 min on 2 cores)
    .venv/bin/python bench/efficient_attention.py --long-only     # table 2 only
    .venv/bin/python bench/efficient_attention.py --quick         # L=256 quality, L = 2k, 4k: minutes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if "--passive" in sys.argv:  # before torch starts OpenMP (workers inherit it); see bench/attention.py
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import Table, load  # noqa: E402
from models.attention import attend  # noqa: E402
from models.kernels.linformer import LinformerProjections  # noqa: E402
from models.kernels.lsh import LSHSettings  # noqa: E402
from models.kernels.sparse import SparsePattern  # noqa: E402

HEADS, HEAD_DIM = 8, 64
SPARSE = dict(window=128, global_tokens=16, random_blocks=1, block=128)
LINFORMER_K = 256
LSH = dict(n_hashes=4, bucket_size=64)
# Model-config overrides per backend for the quality runs (same settings as the kernels').
MODEL_BACKENDS: dict[str, dict] = {
    "exact": dict(attention="auto"),
    "sparse": dict(
        attention="sparse", attention_window=SPARSE["window"], attention_global=SPARSE["global_tokens"],
        attention_random=SPARSE["random_blocks"], attention_block=SPARSE["block"],
    ),
    "linformer": dict(attention="linformer", linformer_k=LINFORMER_K),
    "lsh": dict(attention="lsh", lsh_n_hashes=LSH["n_hashes"], lsh_bucket_size=LSH["bucket_size"]),
}  # fmt: skip
FAMILY_BACKENDS = {"bert": ("exact", "sparse", "linformer", "lsh"), "gpt": ("exact", "sparse", "lsh")}
GOAL_LOSS = {"sparse": 1.03, "lsh": 1.03, "linformer": 1.05}


@dataclass(frozen=True, kw_only=True)
class Job:
    """One measured configuration, run in its own process."""

    kind: str  # "kernel" | "train"
    backend: str
    length: int
    causal: bool = False
    reps: int = 0  # kernel: timed calls after the measured one
    family: str = "bert"  # train
    data: str = ""  # train: the .pt file of batches
    model: dict = field(default_factory=dict)  # train: model shape
    steps: int = 0


# ---------------------------------------------------------------- worker side


def rss_mib(name: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{name}:\s+(\d+) kB", f.read()).group(1)) / 1024


def reset_peak() -> float:
    """Reset the peak-RSS counter to the current RSS, and return that RSS (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mib("VmRSS")


def kernel_step(backend: str, length: int, causal: bool) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=g).requires_grad_() for _ in range(3))
    kwargs: dict = dict(causal=causal, backend=backend)
    if backend == "sparse":
        pattern = SparsePattern(global_tokens=SPARSE["global_tokens"], random_blocks=SPARSE["random_blocks"])
        kwargs.update(window=SPARSE["window"], block_size=SPARSE["block"], options=pattern)
    elif backend == "linformer":
        e, f = (
            (torch.randn(LINFORMER_K, length, generator=g) * length**-0.5).requires_grad_() for _ in range(2)
        )
        kwargs.update(options=LinformerProjections(keys=e, values=f))
    elif backend == "lsh":
        k = q
        kwargs.update(options=LSHSettings(**LSH))
    grad = torch.randn(1, HEADS, length, HEAD_DIM, generator=g)

    def step() -> None:
        attend(q, k, v, **kwargs).backward(grad)

    return step


def run_kernel(job: Job) -> dict:
    kernel_step(job.backend, 256, job.causal)()  # load libraries and kernels on a small problem
    step = kernel_step(job.backend, job.length, job.causal)
    rss = reset_peak()
    wall, cpu = [], []
    for i in range(1 + job.reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if i == 0:
            peak = rss_mib("VmHWM") - rss
    if job.reps:  # the first call also paid for first-touching its memory
        wall, cpu = wall[1:], cpu[1:]
    return {"peak_mib": peak, "seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu)}


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during `forward()` (activation memory)."""
    total, seen = 0, set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return total


def run_training(job: Job) -> dict:
    import models

    data = torch.load(job.data, weights_only=True)
    overrides = {**job.model, **MODEL_BACKENDS[job.backend], "max_seq_len": job.length}
    torch.manual_seed(0)
    model = models.build_model(f"{job.family}-tiny", **overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    times, losses = [], []
    model.train()
    for i, batch in enumerate(data["train"][: job.steps]):
        if i == 1:  # the steady state: after the first step's one-time allocations (optimizer state, ...)
            rss = reset_peak()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = rss_mib("VmHWM") - rss
    saved = saved_bytes(lambda: model(**data["train"][0]).loss)
    model.eval()
    with torch.no_grad():
        val = [model(**batch).loss.item() for batch in data["validation"]]
    tokens = data["train"][0]["input_ids"].numel()
    return {
        "val_loss": statistics.mean(val),
        "train_loss": statistics.mean(losses[-10:]),
        "tokens_per_s": tokens / statistics.median(times[3:] or times),
        "peak_mib": peak,
        "saved_mib": saved / 2**20,
    }


# ---------------------------------------------------------------- parent side


def measure(job: Job) -> dict | str:
    """The worker's result, or a string saying why the configuration failed."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {tail[:80]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_batches(family: str, length: int, steps: int, batch_size: int, val_batches: int, out: Path) -> int:
    """Train and validation batches of the embedded corpus, saved once so every backend sees the same ones.
    Returns the vocabulary size."""
    from data import DataConfig, build_loader, build_tokenizer

    cfg = DataConfig(source="builtin", seq_len=length, vocab_size=2048, num_workers=0)
    tokenizer = build_tokenizer(cfg, family=family, out_dir=out.parent / f"tokenizer-{family}")
    objective = "mlm" if family == "bert" else "clm"
    common = dict(
        objective=objective, tokenizer=tokenizer, batch_size=batch_size, rank=0, world_size=1, seed=0
    )
    keep = ("input_ids", "labels", "token_type_ids")
    train = iter(build_loader(cfg, **common))
    batches = {"train": [], "validation": []}
    for _ in range(steps):
        batches["train"].append({k: v for k, v in next(train).items() if k in keep})
    for batch in build_loader(cfg, split="validation", **common):
        if len(batches["validation"]) == val_batches:
            break
        if batch["input_ids"].shape[0] == batch_size:
            batches["validation"].append({k: v for k, v in batch.items() if k in keep})
    torch.save(batches, out)
    return len(tokenizer)


def fmt_mib(result: dict | str) -> str:
    return result if isinstance(result, str) else f"{result['peak_mib']:.0f}"


def quality_table(length: int, steps: int, batch_size: int, model: dict, val_batches: int) -> None:
    print(f"## Quality at L={length}: {steps} steps x batch {batch_size}, same batches for every backend")
    print(
        f"Model: {model['n_layers']} layers, width {model['d_model']}, {model['n_heads']} heads, AdamW 2e-3 "
        f"(20 warm-up steps), clip 1.0; validation = {val_batches} held-out batches. {load()} at start.\n"
    )
    table = Table(
        [
            "model",
            "backend",
            "val loss",
            "/ exact",
            "goal",
            "train loss",
            "tokens/s",
            "/ exact",
            "saved MiB",
            "peak MiB",
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family, backends in FAMILY_BACKENDS.items():
            data = Path(tmp) / f"{family}.pt"
            vocab = make_batches(family, length, steps, batch_size, val_batches, data)
            shape = {**model, "vocab_size": vocab}
            results = {}
            for backend in backends:
                job = Job(
                    kind="train", backend=backend, length=length, family=family, data=str(data),
                    model=shape, steps=steps,
                )  # fmt: skip
                results[backend] = r = measure(job)
                if isinstance(r, str):
                    table.row([family, backend, r, "-", "-", "-", "-", "-", "-", "-"])
                    continue
                exact = results["exact"]
                ratio = r["val_loss"] / exact["val_loss"] if isinstance(exact, dict) else float("nan")
                goal = GOAL_LOSS.get(backend)
                verdict = "-" if goal is None else ("ok" if ratio <= goal else f"MISSED (<= {goal:.2f})")
                speed = r["tokens_per_s"] / exact["tokens_per_s"] if isinstance(exact, dict) else float("nan")
                table.row(
                    [
                        family, backend, f"{r['val_loss']:.3f}", f"{ratio:.3f}", verdict,
                        f"{r['train_loss']:.3f}", f"{r['tokens_per_s']:.0f}", f"{speed:.2f}",
                        f"{r['saved_mib']:.0f}", fmt_mib(r),
                    ]
                )  # fmt: skip
    print(f"({load()} at end)\n")


def long_table(lengths: list[int]) -> None:
    print(f"## Long sequences: attend forward + backward, B=1 H={HEADS} D={HEAD_DIM} fp32, vs exact chunked")
    print(
        f"(s = wall / CPU seconds, median of the repeats; MiB = peak RSS growth in one call; {load()} at start)\n"
    )
    table = Table(["L", "mask", "backend", "s", "MiB", "speed-up wall / CPU", "MiB / chunked", "goal (16k)"])
    for length in lengths:
        for causal in (False, True):
            results: dict[str, dict | str] = {}
            for backend in ("chunked", "sparse", "linformer", "lsh"):
                if causal and backend == "linformer":
                    continue
                reps = 0 if backend == "chunked" and length >= 16384 else 2
                results[backend] = r = measure(
                    Job(kind="kernel", backend=backend, length=length, causal=causal, reps=reps)
                )
                base = results["chunked"]
                cells = [str(length), "causal" if causal else "bidirectional", backend]
                if isinstance(r, str) or isinstance(base, str):
                    table.row(cells + [str(r), "-", "-", "-", "-"])
                    continue
                speed, mem = base["seconds"] / r["seconds"], r["peak_mib"] / base["peak_mib"]
                speed_cpu = base["cpu_seconds"] / r["cpu_seconds"]
                goal = "-"
                if length == 16384 and backend != "chunked":
                    goal = "ok" if speed >= 2 and mem <= 1 else "MISSED"
                table.row(
                    cells
                    + [
                        f"{r['seconds']:.2f} / {r['cpu_seconds']:.2f}",
                        fmt_mib(r),
                        f"{speed:.1f}x / {speed_cpu:.1f}x",
                        f"{mem:.2f}",
                        goal,
                    ]
                )
    print(f"({load()} at end)\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="L=256 quality for 20 steps; L = 2k, 4k")
    parser.add_argument("--long-only", action="store_true", help="only the long-sequence table")
    parser.add_argument("--quality-only", action="store_true", help="only the quality table")
    parser.add_argument("--steps", type=int, default=150, help="training steps per backend")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (a busy machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = Job(**json.loads(args.worker))
        print(json.dumps(run_kernel(job) if job.kind == "kernel" else run_training(job)))
        return
    model = dict(n_layers=2, d_model=128, n_heads=4, d_ff=512)
    if not args.long_only:
        if args.quick:
            quality_table(256, 20, 2, model, val_batches=2)
        else:
            quality_table(1024, args.steps, args.batch_size, model, val_batches=8)
    if not args.quality_only:
        long_table([2048, 4096] if args.quick else [4096, 8192, 16384, 32768])
    print(f"(torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

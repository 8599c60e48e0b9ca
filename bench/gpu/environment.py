"""Stage a, environment: what the machine and its software are, and the ceilings the other stages divide by.

The bf16 8192^3 matmul rate (random operands: zeros run faster than real data) is the measured ceiling
for MFU; fp32 with and without TF32, and a device-to-device copy, say what the chunked kernel's fp32 tiles
and memory-bound work can reach. The clocks are read as found and never changed.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess

import torch

from bench.gpu.common import Report, cuda, median, run_stage, time_calls

PACKAGES = (
    "deepspeed", "accelerate", "transformers", "tokenizers", "safetensors", "pydantic", "pydantic-core",
    "datasets", "zstandard", "triton", "numpy", "wandb",
)  # fmt: skip


def versions(report: Report) -> None:
    report.table("versions", ["what", "value"], title="software and device")
    report.row("versions", what="python", value=platform.python_version())
    report.row("versions", what="torch", value=torch.__version__)
    report.row("versions", what="CUDA (torch built with)", value=torch.version.cuda)
    if cuda():
        props = torch.cuda.get_device_properties(0)
        report.row("versions", what="GPU", value=props.name)
        report.row("versions", what="compute capability", value=f"{props.major}.{props.minor}")
        report.row("versions", what="GPU memory GiB", value=round(props.total_memory / 2**30, 1))
        report.row("versions", what="multiprocessors", value=props.multi_processor_count)
        report.row("versions", what="cuDNN", value=torch.backends.cudnn.version())
        nccl = torch.cuda.nccl.version()
        report.row(
            "versions", what="NCCL", value=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        )
        report.row("versions", what="nvidia-smi", value=_nvidia_smi())
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        report.row("versions", what=name, value=version)


def _nvidia_smi() -> str:
    query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    return f"{query}: {out.stdout.strip()}" if out.returncode == 0 else "failed"


def matmul_rate(n: int, dtype: torch.dtype, *, reps: int) -> tuple[float, float]:
    """(median, best) FLOP/s of an n x n x n matmul on random operands."""
    dev = "cuda" if cuda() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    times = time_calls(lambda: a @ b, warmup=2, reps=reps)
    return 2.0 * n**3 / median(times), 2.0 * n**3 / min(times)


def copy_rate(n_bytes: int, *, reps: int) -> tuple[float, float]:
    """(median, best) bytes/s of a device copy, counting bytes read plus bytes written."""
    dev = "cuda" if cuda() else "cpu"
    src = torch.randn(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), warmup=2, reps=reps)
    return 2.0 * n_bytes / median(times), 2.0 * n_bytes / min(times)


def ceilings(report: Report) -> None:
    gpu = cuda()
    report.table(
        "ceilings",
        ["measure", "size", "median", "best", "unit"],
        title="measured ceilings (median is what MFU divides by)",
    )
    cases = [("matmul bf16", 8192 if gpu else 256, torch.bfloat16, False, 20 if gpu else 2)]
    cases += [("matmul fp32 (TF32 off)", 8192 if gpu else 512, torch.float32, False, 5 if gpu else 2)]
    if gpu:
        cases += [("matmul fp32 (TF32 on)", 8192, torch.float32, True, 10)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, n, dtype, allow_tf32, reps in cases:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            mid, best = matmul_rate(n, dtype, reps=reps)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        report.row(
            "ceilings", measure=name, size=f"{n}^3", median=mid / 1e12, best=best / 1e12, unit="TFLOP/s"
        )
        if dtype == torch.bfloat16:
            report.set("bf16_ceiling_flops", mid)
    n_bytes = 2**32 if gpu else 2**26
    mid, best = copy_rate(n_bytes, reps=10 if gpu else 3)
    report.row("ceilings", measure="device copy (read + write)", size=f"{n_bytes >> 20} MiB",
               median=mid / 1e12, best=best / 1e12, unit="TB/s")  # fmt: skip
    report.set("datasheet_bf16_flops", 989e12)
    if not gpu:
        report.note("CPU dry run: the rates are this CPU's, at toy sizes; they only exercise the code.")


def body(report: Report) -> None:
    versions(report)
    ceilings(report)


if __name__ == "__main__":
    run_stage("environment", __doc__.splitlines()[0], body)

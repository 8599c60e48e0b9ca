"""Throughput, model FLOPs utilisation and memory: the numbers that say whether a run uses its hardware.

MFU = model FLOPs per token x tokens/s / peak FLOP/s of the devices. GPU peaks come from a table of dense
tensor-core numbers (per precision); a CPU has no datasheet number that means anything, so its "peak" is a
short matmul measured once. `log.peak_flops` overrides both.
"""

from __future__ import annotations

import functools
import resource
import sys
import time

import torch

# (name fragment, {precision: dense peak FLOP/s}); the first fragment found in the device name wins.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("V100", {"bf16": 15.7e12, "fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"bf16": 8.1e12, "fp16": 65e12, "fp32": 8.1e12}),
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache
def measured_cpu_peak(precision: str = "fp32", size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul on this CPU (~0.1 s, once per process)."""
    dtype = _DTYPES[precision] if precision != "fp16" else torch.float32  # fp16 matmul is emulated on CPU
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str, configured: float | None = None) -> float | None:
    """Per-device peak FLOP/s for MFU: the configured value, the GPU table, or a measured CPU matmul."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAK_FLOPS:
            if fragment in name:
                return peaks[precision]
        return None  # unknown GPU: no MFU rather than a wrong one (set log.peak_flops)
    return measured_cpu_peak(precision)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class Throughput:
    """Tokens/s and MFU over the training time since the last `rate()` (evaluation and saving excluded)."""

    def __init__(self, *, flops_per_token: float, peak_flops_total: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self._tokens = 0
        self._seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self._tokens += tokens
        self._seconds += seconds

    def rate(self) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) for the window, and start a new one."""
        tokens_per_s = self._tokens / max(self._seconds, 1e-9)
        self._tokens, self._seconds = 0, 0.0
        mfu = None
        if self.peak_flops_total:
            mfu = self.flops_per_token * tokens_per_s / self.peak_flops_total
        return tokens_per_s, mfu

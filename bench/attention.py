"""Attention backends: time and peak memory of forward + backward, and the model-level memory goals.

Tables printed:
1. kernels: eager / sdpa / chunked through `models.attention.attend`, B=1, H=8, D=64, fp32, L = 1k ... 16k,
   "causal" (GPT-like, no bias) and "t5" (bidirectional, learned `RelativeBias` whose table needs grad,
   which forces SDPA onto its math path).
2. chunked vs SDPA time where SDPA's fused kernel applies (no bias), interleaved in one process.
3. models: one training step (forward, backward, AdamW) of a GPT at L=8192 and a T5 at encoder L=4096.
4. `--relpos`: the Conformer's Transformer-XL position term (`PositionScores`, query and positions needing
   grad), bidirectional, L = 2k ... 16k frames: the chunked kernel building it per tile against the dense
   (B, H, L, L) bias (eager, SDPA, and the chunked kernel handed the dense bias, the Conformer's old path).

Peak memory is measured honestly, from the operating system: every configuration runs in a fresh
subprocess that builds its inputs, warms the libraries up on a tiny problem, resets the kernel's peak-RSS
counter (`echo 5 > /proc/self/clear_refs`), runs once and reports VmHWM - VmRSS (the peak growth of resident
memory during the run). That counts every byte touched (torch's CPU allocator, oneDNN/MKL workspaces,
malloc overhead), which tracemalloc cannot see. Times are of that call (wall and CPU, all threads), or
the median of `--reps N` further calls.
Configurations whose score matrices would not fit (about 16 GB, or 80% of MemAvailable) are skipped and
listed.

OpenMP wait policy: libgomp's default (active: idle threads spin briefly before sleeping) is what a
training run uses and what the time goal is judged with, on a quiet machine. On a machine shared with
other jobs, spinning threads lose most of their time at barriers while the other thread is descheduled
(a kernel of many short parallel regions, like the chunked one's tiles, measured 10x slower than 1
thread at load 16); `--passive` sets OMP_WAIT_POLICY=PASSIVE for every backend alike, which makes such
runs comparable but penalises many-region kernels on a quiet machine (each region pays a wake-up). The
tables print the load average and the policy; the verdict uses wall time, CPU seconds are shown next to it.

    .venv/bin/python -m bench.attention            # model goals at 8192 / 4096, then L up to 16k (long)
    .venv/bin/python -m bench.attention --quick    # model rows at 2048 / 1024, L = 1k, 2k (minutes)
    .venv/bin/python -m bench.attention --ratio-only --passive   # just the time goal, on a busy machine
    .venv/bin/python -m bench.attention --relpos    # the position term per tile vs dense, 4k-16k frames
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

if "--passive" in sys.argv:  # before torch starts OpenMP (workers inherit it); see the docstring
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch

from bench._common import ROOT
from models.attention import attend
from models.kernels.bias import PositionScores, RelativeBias

BACKENDS = ("eager", "sdpa", "chunked")
HEADS, HEAD_DIM = 8, 64
MEMORY_CAP_BYTES = 16e9
GOAL_GPT_LEN, GOAL_T5_LEN = 8192, 4096


@dataclass(frozen=True, kw_only=True)
class Job:
    """One measured configuration, run in its own process."""

    kind: str  # "kernel" | "gpt" | "t5"
    backend: str
    length: int
    bias: str = "causal"  # kernel only: "causal" | "t5" | "relpos" | "relpos-dense"
    reps: int = 1


# ---------------------------------------------------------------- worker side (fresh process per Job)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _kernel_step(length: int, backend: str, bias_kind: str) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=g).requires_grad_() for _ in range(3))
    kwargs: dict = {"causal": True}
    if bias_kind == "t5":
        table = torch.randn(32, HEADS, generator=g).requires_grad_()
        bias = RelativeBias(table=table, bidirectional=True, num_buckets=32, max_distance=128)
        kwargs = {"bias": bias, "scale": 1.0}
    if bias_kind.startswith("relpos"):
        query = torch.randn(1, HEADS, length, HEAD_DIM, generator=g).requires_grad_()
        positions = torch.randn(HEADS, 2 * length - 1, HEAD_DIM, generator=g).requires_grad_()
    grad = torch.randn(1, HEADS, length, HEAD_DIM, generator=g)

    def step() -> None:
        if bias_kind.startswith("relpos"):  # built inside the step: the dense form's cost is part of it
            terms = PositionScores(query=query, positions=positions, scale=HEAD_DIM**-0.5)
            kwargs["bias"] = terms.dense(length, length) if bias_kind == "relpos-dense" else terms
            kwargs["causal"] = False
        attend(q, k, v, backend=backend, **kwargs).backward(grad)

    return step


def _model_step(kind: str, length: int, backend: str) -> Callable[[], None]:
    import models

    torch.manual_seed(0)
    if kind == "gpt":
        # Small vocab and 2 layers, so attention (not the logits) is what the step's memory is about.
        model = models.build_model(
            "gpt-tiny", attention=backend, max_seq_len=length, vocab_size=2048, n_layers=2
        )
        ids = torch.randint(4, 2048, (1, length))
        batch = {"input_ids": ids, "labels": ids}
    else:
        model = models.build_model("t5-tiny", attention=backend, vocab_size=2048)
        ids = torch.randint(4, 2048, (1, length))
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(4, 2048, (1, 128)),
        }
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def _make_step(job: Job, length: int) -> Callable[[], None]:
    if job.kind == "kernel":
        return _kernel_step(length, job.backend, job.bias)
    return _model_step(job.kind, length, job.backend)


def run_worker(job: Job) -> dict:
    _make_step(job, 128)()  # load libraries and kernels on a tiny problem
    step = _make_step(job, job.length)
    rss = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    wall, cpu = [], []
    for i in range(1 + job.reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if i == 0:
            peak = _status_mib("VmHWM") - rss
    if job.reps:  # time the repeats only; the measured call also paid for first-touching its memory
        wall, cpu = wall[1:], cpu[1:]
    return {"peak_mib": peak, "seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu)}


# ---------------------------------------------------------------- parent side


def quadratic_bytes(job: Job) -> float:
    """Rough resident bytes of the score-sized tensors a materialising backend keeps (0 for linear ones)."""
    if job.bias == "relpos-dense":  # measured: ~4 score-sized fp32 tensors (bias, grads, scores)
        return (5 if job.backend != "chunked" else 4) * HEADS * job.length**2 * 4
    if job.backend == "chunked" or (job.backend == "sdpa" and job.kind == "gpt"):
        return 0.0
    if job.kind == "kernel":
        if job.backend == "sdpa" and job.bias == "causal":
            return 0.0
        heads, layers, copies = HEADS, 1, 5 if job.bias == "causal" else 7
    else:
        heads, layers, copies = 4, 2 if job.kind == "gpt" else 3, 4
    return copies * layers * heads * job.length**2 * 4


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure(job: Job, cap: float = MEMORY_CAP_BYTES) -> dict | str:
    """The worker's result, or a string saying why the configuration was skipped or failed."""
    need = quadratic_bytes(job)
    if need > min(cap, 0.8 * mem_available()):
        return f"skipped (~{need / 1e9:.0f} GB)"
    cmd = [sys.executable, "-m", "bench.attention", "--worker", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {tail[:60]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(result: dict | str) -> tuple[str, str]:
    """(wall s / cpu s, peak MiB) cells."""
    if isinstance(result, str):
        return result, "-"
    return f"{result['seconds']:.2f} / {result['cpu_seconds']:.2f}", f"{result['peak_mib']:.0f}"


def load() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY", "default (active)")
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f", OMP_WAIT_POLICY {policy}"


class Table:
    """A markdown table printed row by row, so a long run shows its results as they come."""

    def __init__(self, headers: list[str]) -> None:
        self.widths = [max(len(h), 13) for h in headers]
        print(self._line(headers))
        print("|" + "|".join("-" * (w + 2) for w in self.widths) + "|", flush=True)

    def _line(self, cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, self.widths)) + " |"

    def row(self, cells: list[str]) -> None:
        print(self._line(cells), flush=True)


def kernel_table(lengths: list[int], reps: int) -> None:
    print(
        f"## Kernels: forward + backward, B=1 H={HEADS} D={HEAD_DIM} fp32, {torch.get_num_threads()} threads"
    )
    print(
        f"(s = wall / CPU seconds of the measured call; MiB = peak RSS growth during one call; {load()} at start)\n"
    )
    table = Table(["L", "bias"] + [f"{b} {unit}" for b in BACKENDS for unit in ("s", "MiB")])
    for bias in ("causal", "t5"):
        for length in lengths:
            cells = [str(length), bias]
            for backend in BACKENDS:
                cells += fmt(
                    measure(Job(kind="kernel", backend=backend, length=length, bias=bias, reps=reps))
                )
            table.row(cells)
    print()


def interleaved_ratio(lengths: list[int], reps: int) -> None:
    """chunked / SDPA time with no bias, calls alternating so load spikes on the shared CPU hit both.

    The verdict is on wall time, what a training step waits for; CPU time (all threads) is shown too,
    as the steadier measure of work when the machine is shared (then also run with --passive).
    """
    print("## chunked vs SDPA where SDPA's fused kernel applies (no bias), interleaved, medians")
    print(f"({reps} timed rounds after 1 warm-up; {load()} at start)\n")
    headers = ["L", "mask", "sdpa wall/CPU s", "chunked wall/CPU s", "wall ratio", "CPU ratio", "goal <= 1.5"]
    table = Table(headers)
    for length in lengths:
        for causal in (True, False):
            g = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(1, HEADS, length, HEAD_DIM, generator=g).requires_grad_() for _ in range(3)
            )
            wall: dict[str, list[float]] = {"sdpa": [], "chunked": []}
            cpu: dict[str, list[float]] = {"sdpa": [], "chunked": []}
            for i in range(reps + 1):
                for backend in wall:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    attend(q, k, v, causal=causal, backend=backend).sum().backward()
                    if i:  # the first round is warm-up
                        wall[backend].append(time.perf_counter() - start)
                        cpu[backend].append(time.process_time() - start_cpu)
            w_sdpa, w_chunked, c_sdpa, c_chunked = (
                statistics.median(t[b]) for t in (wall, cpu) for b in ("sdpa", "chunked")
            )
            ratio = w_chunked / w_sdpa
            table.row(
                [
                    str(length),
                    "causal" if causal else "bidirectional",
                    f"{w_sdpa:.2f} / {c_sdpa:.2f}",
                    f"{w_chunked:.2f} / {c_chunked:.2f}",
                    f"{ratio:.2f}",
                    f"{c_chunked / c_sdpa:.2f}",
                    "ok" if ratio <= 1.5 else "MISSED",
                ]
            )
    print()


def model_table(gpt_len: int, t5_len: int, reps: int) -> None:
    print("## Models: one training step (forward, backward, AdamW), batch 1, fp32")
    print(f"GPT: gpt-tiny, 2 layers, vocab 2048, L={gpt_len}. T5: t5-tiny, vocab 2048, encoder L={t5_len},")
    print(f"128 target tokens. Goal (at 8192 / 4096): chunked peak <= 1/5 of eager's. {load()} at start.\n")
    headers = ["model", "L"] + [f"{b} {u}" for b in BACKENDS for u in ("s", "MiB")]
    table = Table(headers + ["eager/chunked", "goal"])
    for kind, length in (("gpt", gpt_len), ("t5", t5_len)):
        results = {b: measure(Job(kind=kind, backend=b, length=length, reps=reps)) for b in BACKENDS}
        cells = [kind, str(length)]
        for backend in BACKENDS:
            cells += fmt(results[backend])
        eager, chunked = results["eager"], results["chunked"]
        if isinstance(eager, dict) and isinstance(chunked, dict):
            ratio = eager["peak_mib"] / chunked["peak_mib"]
            at_goal = length == (GOAL_GPT_LEN if kind == "gpt" else GOAL_T5_LEN)
            cells += [f"{ratio:.1f}x", ("ok" if ratio >= 5 else "MISSED") if at_goal else "n/a (not goal L)"]
        else:
            cells += ["-", "-"]
        table.row(cells)
    print()


def relpos_table(lengths: list[int], reps: int, cap: float) -> None:
    """The position term per tile (O(L) memory) against the dense bias, through `attend`."""
    print("## Transformer-XL position term (Conformer): per tile vs dense, forward + backward")
    print(f"B=1 H={HEADS} D={HEAD_DIM} fp32, bidirectional, query and positions need grad; dense runs over")
    print(f"~{cap / 1e9:.0f} GB skipped. {load()} at start.\n")
    columns = [
        ("eager", "relpos-dense"),
        ("sdpa", "relpos-dense"),
        ("chunked", "relpos-dense"),
        ("chunked", "relpos"),
    ]
    names = ["eager (dense)", "sdpa (dense)", "chunked, dense bias", "chunked, per tile"]
    table = Table(
        ["L"] + [f"{n} {u}" for n in names for u in ("s", "MiB")] + ["MiB dense-chunked / per tile"]
    )
    for length in lengths:
        results = [
            measure(Job(kind="kernel", backend=b, length=length, bias=k, reps=reps), cap) for b, k in columns
        ]
        cells = [str(length)]
        for result in results:
            cells += fmt(result)
        old, new = results[2], results[3]
        ok = isinstance(old, dict) and isinstance(new, dict)
        cells.append(f"{old['peak_mib'] / new['peak_mib']:.1f}x" if ok else "-")
        table.row(cells)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="L = 1k, 2k; model rows at 2048 / 1024")
    parser.add_argument("--reps", type=int, default=0, help="extra timed calls after the measured one")
    parser.add_argument("--ratio-only", action="store_true", help="only the chunked vs SDPA time table")
    parser.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (a busy machine)")
    parser.add_argument("--relpos", action="store_true", help="only the Conformer position-term table")
    parser.add_argument("--relpos-cap-gb", type=float, default=6.0, help="skip dense runs needing more")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(Job(**json.loads(args.worker)))))
        return
    if args.relpos:
        relpos_table([2048, 4096, 8192, 16384], args.reps, args.relpos_cap_gb * 1e9)
    elif args.ratio_only:
        interleaved_ratio([2048, 4096, 8192], 5)
    elif args.quick:
        model_table(2048, 1024, args.reps)
        interleaved_ratio([2048], 3)
        kernel_table([1024, 2048], args.reps)
    else:  # the goals first, the long sweep last
        model_table(GOAL_GPT_LEN, GOAL_T5_LEN, args.reps)
        interleaved_ratio([2048, 4096, 8192], 5)
        kernel_table([1024, 2048, 4096, 8192, 16384], args.reps)
    print(f"(torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

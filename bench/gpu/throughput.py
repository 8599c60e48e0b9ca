"""Stage d, throughput: training steps of our models through our engine vs transformers', bf16, one GPU.

Per model (gpt2-large first: its MFU is a goal; then gpt2-small, bert-base, t5-base, gpt2-medium), in its
own process (a clean CUDA context; an out-of-memory ends one row, not the stage):
- transformers' model (`models.to_hf` of ours: the same architecture and weights, SDPA where transformers
  has it) in a plain loop: bf16 autocast, the AdamW `pretrain train` builds, clipping; against ours
  through the engine `ENGINE` (common.ENGINES), eager and `train.compile` (each block compiled), with and
  without gradient checkpointing (transformers' own for theirs). Same batch, dropout 0.
- tokens/s, achieved TFLOP/s (the models' own FLOP count, bench/_common.step_flops), MFU against the
  bf16 matmul rate the environment stage measured and against the 989 TFLOP/s datasheet, peak memory;
- for gpt2-large, the largest micro-batch that fits (doubling until out of memory), eager, with and
  without checkpointing;
- where a goal is missed (ours >= 1.25x transformers' tokens/s; gpt2-large MFU >= 50%), the top kernels
  of one profiled step of each model (torch.profiler, self device time).
GPT-2's vocabulary is padded to 50304 (a multiple of 64) in both models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu.common import (
    ROOT,
    Report,
    build_our_engine,
    cuda,
    device,
    free_memory,
    is_oom,
    load_ceiling,
    peak_memory,
    run_stage,
    short_error,
    stage_env,
    sync,
)

ENGINE = "ddp"  # at world size 1: the model itself in bf16 autocast, as a plain loop runs it
DATASHEET_BF16 = 989e12
MFU_GOAL, SPEEDUP_GOAL = 0.50, 1.25


@dataclasses.dataclass(frozen=True)
class ModelJob:
    preset: str
    micro_batch: int
    seq_len: int
    weight: float  # share of the stage's time
    overrides: tuple[tuple[str, Any], ...] = ()


GPU_MODELS = (
    ModelJob("gpt2-large", 8, 1024, 3.0, (("vocab_size", 50304),)),
    ModelJob("gpt2-small", 16, 1024, 1.0, (("vocab_size", 50304),)),
    ModelJob("bert-base", 32, 512, 1.0),
    ModelJob("t5-base", 32, 512, 1.0),
    ModelJob("gpt2-medium", 16, 1024, 1.0, (("vocab_size", 50304),)),
)
_TINY = (("n_layers", 2), ("d_model", 64), ("n_heads", 2), ("d_ff", 256), ("vocab_size", 512))
DRY_MODELS = (
    ModelJob("gpt-tiny", 2, 64, 1.0, _TINY + (("max_seq_len", 64),)),
    ModelJob("bert-tiny", 2, 64, 1.0, _TINY + (("max_seq_len", 64),)),
    ModelJob("t5-tiny", 2, 64, 1.0, _TINY),
)
COLUMNS = {
    "steps": ["model", "who", "mode", "ckpt", "micro_batch", "seq", "step_ms", "tokens_per_s", "tflops",
              "mfu_measured", "mfu_datasheet", "peak_gib", "loss0", "status"],
    "max_micro_batch": ["model", "ckpt", "micro_batch", "fits", "step_ms", "tokens_per_s", "mfu_measured",
                        "peak_gib"],
    "profile": ["model", "who", "rank", "kernel", "ms_per_step", "share", "calls"],
}  # fmt: skip


# ------------------------------------------------------------------------------- worker (one per model)


class Worker:
    """Runs one model's rows, appending each as a JSON line to `rows_path` for the stage to collect."""

    def __init__(self, job: ModelJob, rows_path: Path, deadline: float, ceiling: float | None, dry: bool):
        import models

        self.job, self.rows_path, self.deadline = job, rows_path, deadline
        self.ceiling, self.dry = ceiling, dry
        torch.manual_seed(0)
        overrides = dict(job.overrides) | {"dropout": 0.0, "attention_dropout": 0.0}
        self.config = models.get_config(job.preset, **overrides)
        with torch.device(device()):  # initialising a large model is seconds on a GPU, minutes on one core
            ours = models.build_from_config(self.config)
            theirs = models.to_hf(ours)
        # Both models restart from these weights in every row (kept on the host, out of the peak memory).
        self.state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
        self.theirs = theirs.to("cpu").train()
        self.theirs_state = {k: v.detach().clone() for k, v in self.theirs.state_dict().items()}
        del ours
        with torch.device("meta"):  # for the FLOP count only
            self.meta_model = models.build_from_config(self.config, init=False)
        self.family = self.config.family
        self.speeds: dict[tuple[str, bool], float] = {}
        self.eager_rows: dict[bool, dict[str, Any]] = {}  # ours, eager, by checkpointing
        self.steps = (1, 2) if dry else (3, 8)

    def emit(self, table: str, **cells: Any) -> None:
        with self.rows_path.open("a") as f:
            f.write(json.dumps({"table": table, "cells": cells}) + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def batch(self, micro_batch: int) -> dict[str, torch.Tensor]:
        from bench.mfu import preset_batch

        probe = type("Probe", (), {"config": self.config})()
        return preset_batch(probe, micro_batch, self.job.seq_len)

    def ours(self, *, ckpt: bool, compiled: bool) -> torch.nn.Module:
        import models

        config = dataclasses.replace(self.config, gradient_checkpointing=ckpt)
        with torch.device("meta"):
            model = models.build_from_config(config, init=False)
        model.to_empty(device=device())
        model.load_state_dict(self.state)
        if compiled:
            model.compile_blocks()  # what train.compile=true does
        return model

    def step_fn(self, who: str, *, ckpt: bool, compiled: bool, micro_batch: int):
        """(one training step as a closure, the model, the batch), on the device."""
        batch = self.batch(micro_batch)
        if who == "ours":
            model = self.ours(ckpt=ckpt, compiled=compiled)
            engine = build_our_engine(model, ENGINE, micro_batch=micro_batch, precision="bf16")
            return (lambda: engine.train_step([batch]).loss), engine.model, batch
        from bench._common import adamw, train_step_fn

        self.theirs.load_state_dict(self.theirs_state)
        model = self.theirs.to(device())
        _hf_checkpointing(model, ckpt)
        return train_step_fn(model, batch, "bf16", adamw(model)), model, batch

    def measure(self, who: str, *, ckpt: bool, compiled: bool, micro_batch: int) -> dict[str, Any]:
        from bench._common import step_flops

        free_memory()
        step, model, batch = self.step_fn(who, ckpt=ckpt, compiled=compiled, micro_batch=micro_batch)
        try:
            warmup, timed = self.steps
            loss0 = float(step())
            for _ in range(warmup - 1):
                step()
            with peak_memory() as mem:
                sync()
                start = time.perf_counter()
                for _ in range(timed):
                    step()
                sync()
                seconds = (time.perf_counter() - start) / timed
            flops = step_flops(self.meta_model, batch)
            tokens = batch["input_ids"].numel()
            wanted = self.wants_profile(who, ckpt, compiled, tokens / seconds)
            profile = self.profile(step) if wanted else []
        finally:
            if who == "theirs":
                self.theirs.to("cpu")
            del step, model
            free_memory()
        return {
            "step_ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12,
            "mfu_measured": flops / seconds / self.ceiling if self.ceiling else None,
            "mfu_datasheet": flops / seconds / DATASHEET_BF16 if cuda() else None,
            "peak_gib": mem["total_gib"] if cuda() else None,
            "loss0": loss0,
            "profile": profile,
        }

    def wants_profile(self, who: str, ckpt: bool, compiled: bool, tokens_per_s: float) -> bool:
        """Profile the eager step of each side without checkpointing: always in a dry run (to keep the code
        working), on the GPU for gpt2-large (its MFU goal) and wherever ours is under the speed goal
        (transformers' row runs first, so its speed is known by then)."""
        if ckpt or compiled:
            return False
        if self.dry or self.job.preset == "gpt2-large":
            return True
        theirs = self.speeds.get(("theirs", False))
        return who == "ours" and theirs is not None and tokens_per_s / theirs < SPEEDUP_GOAL

    def profile(self, step, rows: int = 10) -> list[dict[str, Any]]:
        """The top kernels (self device time; self CPU time on a CPU) of one step, per step in ms."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step()
            sync()
            wall = time.perf_counter() - start
        events = list(prof.key_averages())

        def self_time(e) -> float:  # microseconds
            if cuda():
                return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
            return e.self_cpu_time_total

        total = sum(self_time(e) for e in events) or 1.0
        top = sorted(events, key=self_time, reverse=True)[:rows]
        # Rank 0: all kernels against the step's wall time; a share well under 1 means the GPU waits.
        everything = {"rank": 0, "kernel": f"all ({'device' if cuda() else 'CPU'} time / step wall time)",
                      "ms_per_step": total / 1e3, "share": total / 1e6 / wall, "calls": len(events)}  # fmt: skip
        return [everything] + [
            {
                "rank": rank,
                "kernel": e.key[:90],
                "ms_per_step": self_time(e) / 1e3,
                "share": self_time(e) / total,
                "calls": e.count,
            }
            for rank, e in enumerate(top, 1)
        ]

    def row(self, who: str, *, ckpt: bool, compiled: bool, micro_batch: int) -> None:
        """One line of the steps table; `who` is "transformers" or "ours"."""
        label = who if who == "transformers" else f"ours ({ENGINE})"
        cells = {"model": self.job.preset, "who": label, "mode": "compile" if compiled else "eager",
                 "ckpt": ckpt, "micro_batch": micro_batch, "seq": self.job.seq_len}  # fmt: skip
        key = "theirs" if who == "transformers" else "ours"
        try:
            result = self.measure(key, ckpt=ckpt, compiled=compiled, micro_batch=micro_batch)
        except Exception as exc:
            self.emit("steps", **cells, status="OOM" if is_oom(exc) else short_error(exc))
            free_memory()
            return
        profile = result.pop("profile")
        self.emit("steps", **cells, **result, status="ok")
        if not compiled:
            self.speeds[(key, ckpt)] = result["tokens_per_s"]
            if key == "ours":
                self.eager_rows[ckpt] = result
        for entry in profile:
            self.emit("profile", model=self.job.preset, who=label, **entry)

    def run(self) -> None:
        """The rows in priority order; each is skipped, and says so, once too little time is left for it.
        gpt2-large (and gpt-tiny in a dry run) also searches its largest micro-batch, right after the eager
        rows of each checkpointing setting: larger batches are where its MFU goal can be met."""
        search = self.job.preset == "gpt2-large" or (self.dry and self.family == "gpt")
        for ckpt in (False, True):
            self.steps_row("transformers", ckpt=ckpt, compiled=False)
            self.steps_row("ours", ckpt=ckpt, compiled=False)
            if search:
                self.max_micro_batch(ckpt)
            self.steps_row("ours", ckpt=ckpt, compiled=True)

    def steps_row(self, who: str, *, ckpt: bool, compiled: bool) -> None:
        cells = {
            "model": self.job.preset,
            "who": who,
            "mode": "compile" if compiled else "eager",
            "ckpt": ckpt,
        }
        if compiled and not cuda():
            self.emit("steps", **cells, status="skipped (dry run: compiling takes minutes on a CPU)")
        elif self.left() < (2 if self.dry else 90 if compiled else 20):
            self.emit("steps", **cells, status="skipped (time budget)")
        else:
            self.row(who, ckpt=ckpt, compiled=compiled, micro_batch=self.job.micro_batch)

    def max_micro_batch(self, ckpt: bool) -> None:
        """Double the micro-batch until a step runs out of memory (a dry run stops at 8: no limit on a CPU)."""
        mb, limit = self.job.micro_batch, 8 if self.dry else 1024
        keep = ("step_ms", "tokens_per_s", "mfu_measured", "peak_gib")
        if ckpt in self.eager_rows:  # measured already, in the steps table
            self.emit("max_micro_batch", model=self.job.preset, ckpt=ckpt, micro_batch=mb, fits=True,
                      **{k: self.eager_rows[ckpt][k] for k in keep})  # fmt: skip
            mb *= 2
        while mb <= limit:
            cells = {"model": self.job.preset, "ckpt": ckpt, "micro_batch": mb}
            if self.left() < (2 if self.dry else 25):
                self.emit("max_micro_batch", **cells, fits="skipped (time budget)")
                return
            saved, self.steps = self.steps, (1, 2)
            try:
                result = self.measure("ours", ckpt=ckpt, compiled=False, micro_batch=mb)
            except Exception as exc:
                self.emit("max_micro_batch", **cells, fits="OOM" if is_oom(exc) else short_error(exc))
                return
            finally:
                self.steps = saved
            self.emit("max_micro_batch", **cells, fits=True, **{k: result[k] for k in keep})
            mb *= 2


def _hf_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """transformers' own gradient checkpointing on or off (newer versions call it activation_*)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    if enabled:
        model.config.use_cache = False


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--ceiling", type=float)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    job = ModelJob(
        **{**json.loads(args.job), "overrides": tuple(map(tuple, json.loads(args.job)["overrides"]))}
    )
    deadline = time.monotonic() + args.seconds
    Worker(job, args.rows, deadline, args.ceiling, args.dry_run).run()


# --------------------------------------------------------------------------------- stage (the parent)


def run_model(report: Report, job: ModelJob, seconds: float, ceiling: float | None) -> None:
    # A scratch file outside the output folder: only the stages' own 8 files come back from a device call.
    rows_path = Path(tempfile.mkdtemp(prefix="gpu-bench-throughput-")) / f"{job.preset}.jsonl"
    cmd = [sys.executable, "-m", "bench.gpu.throughput", "--worker", "--job", json.dumps(dataclasses.asdict(job)),
           "--rows", str(rows_path), "--seconds", str(seconds)]  # fmt: skip
    cmd += ["--ceiling", str(ceiling)] if ceiling else []
    cmd += ["--dry-run"] if report.dry_run else []
    env = stage_env()
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer fragmentation OOMs
    status = "ok"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 20)
        if proc.returncode != 0:
            status = (
                f"worker exit {proc.returncode}: " + " / ".join(proc.stderr.strip().splitlines()[-2:])[-300:]
            )
    except subprocess.TimeoutExpired:
        status = f"worker killed after {seconds + 20:.0f} s"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    shutil.rmtree(rows_path.parent, ignore_errors=True)
    for r in rows:
        report.row(r["table"], **r["cells"])
    if status != "ok":
        report.row("steps", model=job.preset, status=status)


def goals(report: Report) -> None:
    rows = [r for r in report.data["tables"]["steps"]["rows"] if r.get("tokens_per_s")]
    report.table("speedup", ["model", "ckpt", "transformers_tokens_per_s", "ours_best_tokens_per_s", "ours_mode",
                             "speedup", "goal_met"], title=f"ours (best of eager / compile) vs transformers, goal >= {SPEEDUP_GOAL}x")  # fmt: skip
    missed = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for ckpt in (False, True):
            theirs = [
                r for r in rows if r["model"] == model and r["ckpt"] == ckpt and r["who"] == "transformers"
            ]
            ours = [
                r for r in rows if r["model"] == model and r["ckpt"] == ckpt and r["who"] != "transformers"
            ]
            if not theirs or not ours:
                continue
            best = max(ours, key=lambda r: r["tokens_per_s"])
            ratio = best["tokens_per_s"] / theirs[0]["tokens_per_s"]
            report.row("speedup", model=model, ckpt=ckpt, transformers_tokens_per_s=theirs[0]["tokens_per_s"],
                       ours_best_tokens_per_s=best["tokens_per_s"], ours_mode=best["mode"], speedup=ratio,
                       goal_met=ratio >= SPEEDUP_GOAL)  # fmt: skip
            if ratio < SPEEDUP_GOAL:
                missed.append(
                    f"{model}{' ckpt' if ckpt else ''} {ratio:.2f}x ({SPEEDUP_GOAL - ratio:+.2f} short)"
                )
    measured = bool(report.data["tables"]["speedup"]["rows"])
    report.goal(f"ours >= {SPEEDUP_GOAL}x transformers' tokens/s, every family", not missed if measured else None,
                "; ".join(missed) or ("all met" if measured else "nothing measured"))  # fmt: skip
    for ckpt in (False, True):
        fits = [r["micro_batch"] for r in report.data["tables"]["max_micro_batch"]["rows"]
                if r["ckpt"] == ckpt and r["fits"] is True]  # fmt: skip
        if fits:
            report.note(
                f"largest micro-batch that fitted, {'with' if ckpt else 'without'} checkpointing: {max(fits)}"
            )
    if not cuda():
        report.goal(f"gpt2-large MFU >= {MFU_GOAL:.0%}", None, "skipped (no CUDA)")
        return
    large = [r for r in rows if r["model"] == "gpt2-large" and r["who"] != "transformers"]
    large += [r for r in report.data["tables"]["max_micro_batch"]["rows"] if r.get("mfu_measured")]
    best = max((r.get("mfu_measured") or 0 for r in large), default=0)
    report.goal(f"gpt2-large MFU >= {MFU_GOAL:.0%} (against the measured bf16 matmul rate)",
                best >= MFU_GOAL if large else None,
                f"best {best:.1%}, {MFU_GOAL - best:+.1%} to the goal; profile table: where the time goes")  # fmt: skip


def body(report: Report) -> None:
    titles = {
        "steps": "training steps, bf16 (tokens/s of micro_batch x seq tokens; MFU as a fraction)",
        "max_micro_batch": "largest micro-batch: ours, eager, doubled until out of memory",
        "profile": "top kernels of one profiled step (share: of all kernel time; rank 0: all kernels)",
    }
    for name, columns in COLUMNS.items():
        report.table(name, columns, title=titles[name])
    ceiling = load_ceiling(report.out_dir)
    if ceiling is None and cuda():
        report.note("no measured ceiling (environment stage missing): mfu_measured left empty")
    jobs = DRY_MODELS if report.dry_run else GPU_MODELS
    for i, job in enumerate(jobs):
        share = job.weight / sum(j.weight for j in jobs[i:])
        seconds = (report.left() - 15) * share
        if seconds < (5 if report.dry_run else 40):
            report.row("steps", model=job.preset, status="skipped (stage budget spent)")
            continue
        run_model(report, job, seconds, ceiling)
    goals(report)
    report.note(f"ours runs through engine {ENGINE!r} (bench/gpu/throughput.py ENGINE); theirs: a plain loop")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main([a for a in sys.argv[1:] if a != "--worker"])
    else:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        run_stage("throughput", __doc__.splitlines()[0], body)

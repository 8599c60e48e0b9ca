"""What the GPU stages share: the report each stage writes, its deadline, timing on CUDA or CPU, and the
one table of engine overrides.

A stage writes `<out>/<stage>.json` and `<out>/<stage>.md` after every row, so a stage killed at its time
limit still leaves what it measured; bench/gpu/run.py marks it as cut short.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# The engines by what they run, as `pretrain train` overrides with the engine keys of the redesigned
# config (DESIGN.md). This table is the one place that names them; run dirs, models and data come from
# the stage.
ENGINES: dict[str, list[str]] = {
    "zero1": ["engine.backend=deepspeed", "engine.deepspeed.zero_stage=1"],
    "zero2": ["engine.backend=deepspeed", "engine.deepspeed.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.deepspeed.zero_stage=3"],
    "ddp": ["engine.backend=ddp"],
    "fsdp": ["engine.backend=fsdp"],
}


def engine_overrides(name: str) -> list[str]:
    """`pretrain train` overrides selecting engine `name` (a key of ENGINES)."""
    return list(ENGINES[name])


def build_our_engine(model: torch.nn.Module, name: str, *, micro_batch: int, precision: str) -> Any:
    """`model` wrapped by engine `name` as `pretrain train` wraps it, for timing steps in this process.

    The engine is made from a run config (ENGINES' overrides on a minimal YAML) through the config's own
    `engine_spec`, so it follows whatever the config layer maps the keys to. The config's preset only
    satisfies the schema: the engine wraps `model` as given.
    """
    import tempfile

    from pretrain.config import load_config
    from pretrain.engines import build_engine, init_distributed

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine.yaml"
        path.write_text("model:\n  preset: gpt-tiny\n")
        overrides = [f"train.micro_batch_size={micro_batch}", f"train.precision={precision}", "train.lr=1e-4"]
        overrides += ["train.max_steps=100000", "wandb.mode=disabled", f"run.dir={tmp}/run"]
        cfg = load_config(path, overrides + engine_overrides(name))
    return build_engine(cfg.engine_spec, model, init_distributed())


def stage_env() -> dict[str, str]:
    """Environment for child processes: offline (the device machine has no network), no W&B, unbuffered."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    path = env.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT)) if p)
    return env


# ------------------------------------------------------------------------------------------ the report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.4g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value).replace("|", "/").replace("\n", " ")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class Report:
    """One stage's results: tables of rows (dicts), goals, notes; rewritten to JSON + Markdown on each change.

    Rows are dicts keyed by the table's columns, so the JSON keeps raw numbers for tests and later
    analysis while the Markdown shows them rounded.
    """

    def __init__(self, out_dir: Path, stage: str, *, dry_run: bool, budget_s: float) -> None:
        self.out_dir = out_dir
        self.stage = stage
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.data: dict[str, Any] = {
            "stage": stage,
            "dry_run": dry_run,
            "status": "running",
            "budget_s": round(budget_s, 1),
            "seconds": 0.0,
            "device": device_name(),
            "tables": {},
            "goals": [],
            "notes": [],
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        self.write()

    @property
    def dry_run(self) -> bool:
        return self.data["dry_run"]

    def left(self) -> float:
        """Seconds of this stage's budget still unspent."""
        return self.deadline - time.monotonic()

    def table(self, name: str, columns: list[str], *, title: str = "") -> None:
        self.data["tables"][name] = {"title": title or name, "columns": columns, "rows": []}
        self.write()

    def row(self, table: str, **cells: Any) -> None:
        columns = self.data["tables"][table]["columns"]
        unknown = set(cells) - set(columns)
        if unknown:
            raise KeyError(f"table {table}: no column(s) {sorted(unknown)}")
        self.data["tables"][table]["rows"].append({c: cells.get(c) for c in columns})
        self.write()

    def goal(self, name: str, met: bool | None, detail: str) -> None:
        """A goal of the issue: met, missed (with by how much in `detail`), or None = not measured."""
        self.data["goals"].append({"goal": name, "met": met, "detail": detail})
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.write()

    def set(self, key: str, value: Any) -> None:
        """A stage-specific top-level value (e.g. the measured matmul ceiling)."""
        self.data[key] = value
        self.write()

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        self.data["status"] = status
        if error:
            self.data["error"] = error
        self.write()

    def write(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        write_report(self.out_dir, self.stage, self.data)


def write_report(out_dir: Path, stage: str, data: dict[str, Any]) -> None:
    """`<stage>.json` and `<stage>.md`, each written whole and renamed into place (a kill leaves the last)."""
    for suffix, text in ((".json", json.dumps(_clean(data), indent=1)), (".md", markdown(data))):
        path = out_dir / f"{stage}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)


def markdown(data: dict[str, Any]) -> str:
    mode = "dry run (CPU, toy sizes)" if data.get("dry_run") else "GPU sizes"
    lines = [
        f"## {data['stage']}: {data['status']}, {data['seconds']:.0f} s of {data['budget_s']:.0f} s, {mode}",
        f"device: {data.get('device')}",
    ]
    if data.get("error"):
        lines.append(f"error: {_cell(data['error'])}")
    if data.get("install"):
        wheels = ", ".join(data["install"]["wheels"]) or "none"
        lines.append(f"wheels: {data['install']['status']}: {wheels}")
    if data.get("log_tail"):
        lines += ["", "log tail:", "```", *data["log_tail"], "```"]
    for table in data["tables"].values():
        columns = table["columns"]
        lines += ["", f"### {table['title']}", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in table["rows"]]
        if not table["rows"]:
            lines.append("| " + " | ".join("-" for _ in columns) + " |")
    if data["goals"]:
        lines += ["", "### goals", ""]
        for g in data["goals"]:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
            lines.append(f"- {g['goal']}: **{verdict}**. {g['detail']}")
    if data["notes"]:
        lines += ["", "### notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ device and timing


def cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if cuda() else "cpu")


def device_name() -> str:
    if cuda():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], *, warmup: int, reps: int) -> list[float]:
    """Seconds per call of `fn` after `warmup` calls: CUDA events on a GPU, the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak CUDA memory allocated inside the block, above what was allocated at its start (GiB);
    nan on a CPU, where the stages do not measure memory."""
    result = {"peak_gib": math.nan, "total_gib": math.nan}
    if not cuda():
        yield result
        return
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield result
    sync()
    peak = torch.cuda.max_memory_allocated()
    result["peak_gib"] = (peak - base) / 2**30
    result["total_gib"] = peak / 2**30


def free_memory() -> None:
    """Return freed CUDA blocks to the device (after collecting the reference cycles that may hold them)."""
    if cuda():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def sdpa_backend(kind: str | None) -> Any:
    """A context forcing one SDPA kernel ("flash" / "efficient" / "math"), or nothing for None."""
    if kind is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel(kernels.get(kind, SDPBackend.MATH))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 (bench/gpu thresholds: fp32 ~1e-6, bf16 operands 1e-3..1e-2)."""
    a, b = ours.detach().double(), ref.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def load_ceiling(out_dir: Path) -> float | None:
    """The bf16 matmul rate the environment stage measured (FLOP/s), or None when it did not run."""
    path = out_dir / "environment.json"
    try:
        return json.loads(path.read_text()).get("bf16_ceiling_flops")
    except (OSError, ValueError):
        return None


def stage_args(description: str) -> Any:
    """The arguments every stage module takes from bench/gpu/run.py."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args()


def run_stage(stage: str, description: str, body: Callable[[Report], None]) -> None:
    """Parse the stage arguments, run `body`, and record an exception as the stage's error (exit code 1)."""
    args = stage_args(description)
    report = Report(args.out, stage, dry_run=args.dry_run, budget_s=args.budget_s)
    try:
        body(report)
    except Exception as exc:
        import traceback

        report.finish("error", short_error(exc))
        traceback.print_exc()
        raise SystemExit(1) from None
    report.finish("ok")

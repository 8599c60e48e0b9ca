"""Where a run's numbers go: metrics.jsonl (the contract), a progress display, and Weights & Biases.

Only rank 0 logs. Each record is appended and flushed at once, so `tail -f` works and a killed run keeps what
it logged; on resume the records after the restored step are dropped, so the file reads like one straight run.
W&B files live under the run directory; it is imported only when enabled, and never sees or prints a key
from us (it reads WANDB_API_KEY / netrc itself).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pretrain.config import RunConfig
from pretrain.console import stamp

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl` (a torn last line from a kill is skipped)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


RESUMES_FILE = "resumes.jsonl"
SAMPLES_FILE = "samples.jsonl"


def note_resume(run_dir: Path, step: int) -> None:
    """Record that the run resumed at `step` (rank 0), for the marks `pretrain plot` draws."""
    with open(run_dir / RESUMES_FILE, "a") as f:
        f.write(json.dumps({"step": step, "time": time.time()}) + "\n")


def read_resumes(run_dir: Path) -> list[int]:
    """The steps a run resumed at, in order (a torn last line is skipped)."""
    path = run_dir / RESUMES_FILE
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (logged by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path.parent) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLogger:
    """metrics.jsonl + progress + W&B for one run; a no-op on ranks other than 0."""

    def __init__(self, cfg: RunConfig, *, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self._console = Console(stderr=True, soft_wrap=True)  # no hard wraps in SLURM/CI logs
        self._progress: Progress | None = None
        self._wandb: Any = None
        self._file = None
        if not enabled:
            return
        path = cfg.run_dir / METRICS_FILE
        _truncate_after(path, start_step)
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        if cfg.log.progress and self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._task = self._progress.add_task(
                "train", total=cfg.train.max_steps, completed=start_step, info=""
            )
            self._progress.start()
        self._wandb = _start_wandb(cfg)

    def log(self, record: dict[str, Any]) -> None:
        """One training (or validation) record: to the file at once, then the display and W&B."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"]
            )
        info = "  ".join(
            f"{k} {_short(record[k])}" for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in record
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        elif self.cfg.log.progress:
            print(stamp(f"step {record['step']}/{self.cfg.train.max_steps}  {info}"), flush=True)

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Generated samples at an evaluation step: appended to RUN_DIR/samples.jsonl, and a W&B table."""
        if not self.enabled:
            return
        with open(self.cfg.run_dir / SAMPLES_FILE, "a") as f:
            for prompt, output in samples:
                f.write(json.dumps({"step": step, "prompt": prompt, "output": output}) + "\n")
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "output"], data=[[step, p, o] for p, o in samples])
            self._wandb.log({"samples": table}, step=step)

    def note(self, message: str) -> None:
        """A human-facing line (rank 0 only) that does not break the progress bar."""
        if self.enabled:
            self._console.print(stamp(message), markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _start_wandb(cfg: RunConfig) -> Any:
    """A W&B run under the run directory, resumed across restarts via a stored id; None when disabled."""
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    id_file = cfg.run_dir / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(8))
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=cfg.wandb.name or cfg.run_dir.name,
        id=id_file.read_text().strip(),
        resume="allow",
        mode=cfg.wandb.mode,
        dir=str(cfg.run_dir),
        config=cfg.to_dict() | {"run_dir": str(cfg.run_dir.resolve())},
        settings=wandb.Settings(console="off", silent=True),
    )

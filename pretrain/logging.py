"""Where a run's numbers go: metrics.jsonl (the contract), a progress display, and Weights & Biases.

Only rank 0 logs. Each record is appended and flushed at once, so `tail -f` works and a killed run keeps what
it logged; on resume the records after the restored step are dropped, so the file reads like one straight run.
W&B files live under the run directory; it is imported only when enabled, and never sees or prints a key
from us (it reads WANDB_API_KEY / netrc itself).

Logging must never cost a checkpoint. W&B talks to a separate service process, and a cluster's SIGTERM reaches
that process too: afterwards every W&B call raises (`ConnectionResetError`), and a hung service would block one.
So each W&B call runs with a time limit and behind a fuse (`_Wandb`): the first failure or timeout is said once,
on the console and as a `warning` record in metrics.jsonl, W&B is off for the rest of the run, and the loop goes
on to its checkpoint; metrics.jsonl, which needs no other process, keeps every record.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pretrain.config import RunConfig
from pretrain.console import stamp

METRICS_FILE = "metrics.jsonl"
WANDB_CALL_TIMEOUT_S = 30.0  # a W&B call that takes longer is abandoned (offline calls take milliseconds)
WANDB_FINISH_TIMEOUT_S = (
    60.0  # finish flushes the offline files; a dead or hung service must not hold the exit
)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl` (a torn last line from a kill is skipped)."""
    return _read_records(run_dir / METRICS_FILE)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a .jsonl file, a torn last line skipped."""
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
    kept = [r for r in _read_records(path) if r.get("step", 0) <= step]
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
        self._wandb: _Wandb | None = None
        self._file = None
        self._step = start_step
        if not enabled:
            return
        path = cfg.run_dir / METRICS_FILE
        _truncate_after(path, start_step)
        _truncate_after(cfg.run_dir / SAMPLES_FILE, start_step)  # samples past the restored step are redone
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
        self._wandb = _Wandb.start(cfg, on_failure=self._wandb_failed)

    def log(self, record: dict[str, Any]) -> None:
        """One training (or validation) record: to the file at once, then the display and W&B."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._step = record["step"]
        self._write(record)
        if self._wandb is not None:
            point = {k: v for k, v in record.items() if k != "step" and v is not None}
            self._wandb.log(point, step=record["step"])
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
        """Stop the display, finish W&B (bounded: it may be dead or hung), close metrics.jsonl."""
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _wandb_failed(self, message: str) -> None:
        """W&B is off from now on: say so on the console and in metrics.jsonl (once)."""
        self._wandb = None
        self.note(f"warning: {message}")  # through the console, so a live progress bar stays intact
        if self._file is not None:
            self._write({"step": self._step, "warning": message})


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class _Wandb:
    """A W&B run behind a fuse: every call is time-limited, and the first failure turns W&B off for good."""

    def __init__(self, run: Any, on_failure: Callable[[str], None]) -> None:
        self._run = run
        self._on_failure = on_failure

    @classmethod
    def start(cls, cfg: RunConfig, *, on_failure: Callable[[str], None]) -> _Wandb | None:
        """None when disabled, or when W&B cannot start (said once; the run trains without it)."""
        try:
            run = _start_wandb(cfg)
        except Exception as e:  # noqa: BLE001 - any W&B failure degrades to a warning
            on_failure(_failure("init", e))
            return None
        return None if run is None else cls(run, on_failure)

    def log(self, data: dict[str, Any], *, step: int) -> None:
        self._call("log", lambda: self._run.log(data, step=step), WANDB_CALL_TIMEOUT_S)

    def finish(self) -> None:
        self._call("finish", self._run.finish, WANDB_FINISH_TIMEOUT_S)

    def _call(self, what: str, fn: Callable[[], object], timeout_s: float) -> None:
        if self._run is None:
            return
        error = call_with_timeout(fn, timeout_s)
        if error is not None:
            self._run = None
            _teardown_quietly()
            self._on_failure(_failure(what, error))


def call_with_timeout(fn: Callable[[], object], timeout_s: float) -> BaseException | None:
    """Run `fn` in a daemon thread; its exception, a TimeoutError if it is still running after `timeout_s`
    (it is then abandoned), or None."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            outcome.append(e)

    thread = threading.Thread(target=target, name="pretrain-wandb", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return TimeoutError(f"no answer after {timeout_s:.0f} s")
    return outcome[0]


def _failure(what: str, error: BaseException) -> str:
    detail = " ".join(str(error).split()) or "no message"
    return (
        f"W&B {what} failed ({type(error).__name__}: {detail}); W&B is off for the rest of this run, "
        f"metrics.jsonl keeps every record"
    )


def _teardown_quietly() -> None:
    """Drop W&B's connection to its (dead) service, so its exit hook does not print a traceback at exit."""
    import wandb

    call_with_timeout(lambda: wandb.teardown(1), 5.0)


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

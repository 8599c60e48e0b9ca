"""GPU truth in one call: install the carried wheels, then run the four stages, each in its own process with
its own time budget, writing `<stage>.json` + `<stage>.md` to the output folder (8 files: the most a device
call brings back). The whole call stays under `--budget-s` (at most 8 minutes): a stage that overruns its
share is killed and recorded as cut short, with whatever rows it had written; a stage that fails records
its error and the next one runs.

    python3 -m bench.gpu.run                       # on the GPU machine: wheels from .whl/, output to $OUT
    python -m bench.gpu.run --dry-run --out out/gpu  # CPU: every stage at toy size, CUDA-only parts skipped
    python3 -m bench.gpu.run --stages throughput --budget-s 240   # a rerun of one stage

Stages: environment (versions, matmul and copy ceilings), correctness (parity with transformers, chunked
vs SDPA in bf16, 20 steps per engine), attention (chunked vs SDPA vs eager at 4k-64k), throughput (ours vs
transformers, MFU, largest micro-batch, profiles). This file imports only the standard library: the
project's own packages may need the wheels it installs first.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_BUDGET_S = 470.0  # the issue allows 8 minutes (480 s) for the whole call
# Stage -> share of the time left when it starts; unused time passes on to the stages after it.
STAGES = {"environment": 0.05, "correctness": 0.36, "attention": 0.19, "throughput": 0.40}
SITE = Path("/tmp/site")


def install_wheels(wheel_dir: Path) -> dict:
    """pip-install the carried wheels into a scratch target (no network, no dependency resolution)."""
    wheels = sorted(glob.glob(str(wheel_dir / "*.whl")))
    if not wheels:
        return {"status": f"no wheels in {wheel_dir} (run bench/gpu/wheels.sh first)", "wheels": []}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]  # fmt: skip
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        status = "ok" if proc.returncode == 0 else "failed: " + proc.stderr.strip()[-500:]
    except subprocess.TimeoutExpired:
        status = "failed: pip install ran over 120 s"
    names = [Path(w).name for w in wheels]
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "wheels": names}


def child_env(installed: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = ([str(SITE)] if installed else []) + [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_stage(
    stage: str, out: Path, budget_s: float, kill_s: float, *, dry: bool, env: dict[str, str]
) -> dict:
    """Run one stage's module, which keeps to `budget_s` itself; kill its whole process group (its engine
    and model workers too) at `kill_s` if it does not."""
    cmd = [sys.executable, "-m", f"bench.gpu.{stage}", "--out", str(out), "--budget-s", f"{budget_s:.0f}"]
    cmd += ["--dry-run"] if dry else []
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=kill_s)
        result = {"returncode": proc.returncode}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        result = {"returncode": None, "killed_after_s": round(time.monotonic() - started)}
    result["seconds"] = round(time.monotonic() - started, 1)
    result["log_tail"] = output.strip().splitlines()[-15:]
    return result


def record(out: Path, stage: str, outcome: dict, extra: dict | None = None) -> dict:
    """The stage's JSON with how its process ended (its own, or a stub when it wrote none); rewritten."""
    from bench.gpu.common import write_report  # stdlib + torch: imported only after the stage ran

    path = out / f"{stage}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"stage": stage, "status": "no report", "tables": {}, "goals": [], "notes": [], "seconds": 0.0}
        data["budget_s"] = 0.0
    if outcome["returncode"] is None:
        data["status"] = f"cut short at its time limit ({outcome['killed_after_s']} s)"
    elif outcome["returncode"] != 0 and data.get("status") in ("ok", "running", "no report"):
        data["status"] = f"failed (exit {outcome['returncode']})"
    if data["status"] != "ok":
        data["log_tail"] = outcome["log_tail"]
    data["process_seconds"] = outcome["seconds"]
    data.update(extra or {})
    write_report(out, stage, data)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, CUDA-only parts skipped")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "out" / "gpu")))
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}"
    )
    parser.add_argument(
        "--budget-s", type=float, default=MAX_BUDGET_S, help=f"whole call, at most {MAX_BUDGET_S:.0f}"
    )
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--no-install", action="store_true", help="use the packages already importable")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; accepted: {', '.join(STAGES)}")
    started = time.monotonic()
    deadline = started + min(args.budget_s, MAX_BUDGET_S)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.dry_run or args.no_install:
        install = {"status": "skipped (dry run or --no-install: packages already importable)", "wheels": []}
    else:
        install = install_wheels(args.wheels)
    print(f"install: {install['status']} ({len(install['wheels'])} wheels)", flush=True)
    env = child_env(installed=install["status"] == "ok")

    summary = []
    order = [s for s in STAGES if s in stages]
    for i, stage in enumerate(order):
        share = STAGES[stage] / sum(STAGES[s] for s in order[i:])
        budget = (deadline - time.monotonic() - 5) * share
        if budget < 10:
            summary.append(f"{stage}: skipped (whole-call budget spent)")
            continue
        print(f"== {stage}: budget {budget:.0f} s", flush=True)
        kill = min(budget + 10, deadline - time.monotonic())  # a few seconds' grace, never past the deadline
        outcome = run_stage(stage, args.out, budget, kill, dry=args.dry_run, env=env)
        extra = {"install": install} if stage == "environment" else None
        data = record(args.out, stage, outcome, extra)
        summary.append(f"{stage}: {data['status']} in {outcome['seconds']:.0f} s")
        print((args.out / f"{stage}.md").read_text(), flush=True)
    for leftover in args.out.glob("*.tmp"):  # a stage killed mid-write; only the 8 reports may come back
        leftover.unlink()
    print("\n".join(["== summary", *summary, f"total {time.monotonic() - started:.0f} s"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

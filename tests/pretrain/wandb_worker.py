"""A RunLogger with W&B offline whose service process this script kills after the first record, as a cluster's
SIGTERM does (run by test_logging_faults.py as a subprocess, so W&B's process-wide state stays out of pytest)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import psutil

from pretrain.config import load_config
from pretrain.logging import RunLogger


def main(run_dir: Path) -> None:
    cfg = load_config(
        Path("configs/gpt-tiny.yaml"), [f"run.dir={run_dir}", "wandb.mode=offline", "log.progress=false"]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(cfg, enabled=True, start_step=0)
    logger.log({"step": 1, "loss": 5.0})
    service = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("wandb-core")]
    assert service, "W&B offline runs a service process"
    for process in service:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    for step in (2, 3, 4):
        logger.log({"step": step, "loss": 5.0 - step})
    logger.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

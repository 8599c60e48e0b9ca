"""`make demo`: pretrain gpt-tiny on the builtin corpus on CPU, export it to transformers, plot its curves.

Running it again resumes the same run directory: it finishes at once when the run is complete, or continues
from the newest checkpoint if it was interrupted (Ctrl-C, a kill).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pretrain.cli import main as cli_main
from pretrain.config import bundled_config, load_config
from pretrain.loop import finished_state

CONFIG = bundled_config("gpt-tiny")


def main() -> int:
    start = time.perf_counter()
    cfg = load_config(CONFIG)
    run_dir = cfg.run_dir
    code = cli_main(["train", str(CONFIG)])
    if code:
        return code
    if finished_state(cfg) is None:  # stopped by a signal after saving a checkpoint
        print(
            f"stopped before step {cfg.train.max_steps}; run `make demo` again to continue from the checkpoint"
        )
        return 0
    hf_dir = run_dir / "hf"
    for command in (["export", str(run_dir), str(hf_dir)], ["plot", str(run_dir)]):
        code = cli_main(command)
        if code:
            return code
    _summary(run_dir, hf_dir, time.perf_counter() - start)
    return 0


def _summary(run_dir: Path, hf_dir: Path, seconds: float) -> None:
    from pretrain.logging import read_metrics

    records = read_metrics(run_dir)
    last = records[-1] if records else {}
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    speeds = sorted(r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
    median_speed = f"{speeds[len(speeds) // 2]:.0f}" if speeds else "-"
    lines = [
        f"demo done in {seconds:.0f} s",
        f"  run directory   {run_dir}   (config.yaml, metrics.jsonl, checkpoints/, tokenizer/, wandb/)",
        f"  final step      {last.get('step')}  loss {_fmt(last.get('loss'))}  val_loss {_fmt(val[-1] if val else None)}",
        f"  throughput      {median_speed} tokens/s (median over logged steps)",
        f"  plot            {run_dir / 'metrics.png'}",
        f"  exported model  {hf_dir}  (AutoModelForCausalLM / AutoTokenizer .from_pretrained)",
        "  run `make demo` again to resume (it finishes at once when the run is complete)",
    ]
    print("\n" + "\n".join(lines))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())

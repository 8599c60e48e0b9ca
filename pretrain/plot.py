"""`pretrain plot RUN_DIR`: loss, learning rate and throughput curves from metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path

from pretrain.errors import UserError
from pretrain.logging import METRICS_FILE, read_metrics


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's curves; returns the PNG path (default RUN_DIR/metrics.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("loss") is not None]
    if not train:
        raise UserError(f"no training records in {run_dir / METRICS_FILE}; train first")
    val = [r for r in records if r.get("val_loss") is not None]
    steps = [r["step"] for r in train]

    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r.get("lr") for r in train])
    ax_lr.set_ylabel("learning rate")
    ax_tps.plot(steps, [r.get("tokens_per_s") for r in train])
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_xlabel("step")
    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.resolve().name)
    fig.tight_layout()
    out = out or run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

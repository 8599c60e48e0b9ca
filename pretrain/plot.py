"""`pretrain plot RUN_DIR [RUN_DIR ...]`: a run's curves from metrics.jsonl, or several runs overlaid, as one PNG.

Panels: loss (each record, faint, and an exponential moving average over it, with validation points), learning rate,
tokens/s, gradient norm and MFU (those a run logged). A dashed vertical line marks each step where a run resumed
(RUN_DIR/resumes.jsonl), where a throughput dip or a loss bump usually comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.logging import METRICS_FILE, read_metrics, read_resumes

SMOOTHING = 0.9  # EMA weight of the past: about the last 10 records
_PANELS = (  # (record key, axis label); loss is drawn apart
    ("lr", "learning rate"),
    ("tokens_per_s", "tokens / s"),
    ("grad_norm", "grad norm"),
    ("mfu", "MFU"),
)


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards 0 (as TensorBoard's)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _unit(run_dir: Path) -> str:
    """What the run's tokens/s counts (text tokens, image patches, audio frames), from its config.yaml."""
    from pretrain.export import read_run_config

    try:
        return read_run_config(run_dir).unit
    except UserError:  # no or an old config: the records alone still plot
        return "tokens"


def build_figure(run_dirs: Sequence[Path]) -> Any:
    """The matplotlib figure for `run_dirs` (one color per run); UserError if a run has no training records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for run_dir in run_dirs:
        train = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
        if not train:
            raise UserError(f"no training records in {run_dir / METRICS_FILE}; train first")
        runs.append((run_dir, train, read_resumes(run_dir)))
    units = " | ".join(dict.fromkeys(_unit(run_dir) for run_dir in run_dirs))
    labels = {**dict(_PANELS), "tokens_per_s": f"{units} / s"}
    panels = [(k, labels[k]) for k, _ in _PANELS if any(_series(t, k)[0] for _, t, _ in runs)]
    fig, axes = plt.subplots(
        1 + len(panels), 1, figsize=(9, 2.6 * (1 + len(panels))), sharex=True, squeeze=False
    )
    axes = axes[:, 0]
    many = len(runs) > 1
    for i, (run_dir, train, resumes) in enumerate(runs):
        color, name = f"C{i}", run_dir.resolve().name
        steps, loss = _series(train, "loss")
        axes[0].plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        axes[0].plot(
            steps, smoothed(loss), color=color, label=f"{name} train" if many else "train (smoothed)"
        )
        val_steps, val = _series(read_metrics(run_dir), "val_loss")
        if val:
            axes[0].plot(
                val_steps, val, "o--", color=color, label=f"{name} validation" if many else "validation"
            )
        for ax, (key, _) in zip(axes[1:], panels):
            ax.plot(*_series(train, key), color=color, label=name)
        for step in resumes:
            for ax in axes:
                ax.axvline(step, color=color, linestyle=":", linewidth=1)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize="small")
    for ax, (_, label) in zip(axes[1:], panels):
        ax.set_ylabel(label)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step (dotted: resumed)" if any(r for _, _, r in runs) else "step")
    fig.suptitle(" vs ".join(run_dir.resolve().name for run_dir in run_dirs))
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Draw the runs' curves; returns the PNG path (default: RUN_DIR/metrics.png for one run, else
    metrics-compare.png in the current directory)."""
    import matplotlib.pyplot as plt

    fig = build_figure(run_dirs)
    out = out or (run_dirs[0] / "metrics.png" if len(run_dirs) == 1 else Path("metrics-compare.png"))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """One run's curves (default RUN_DIR/metrics.png)."""
    return plot_runs([run_dir], out)

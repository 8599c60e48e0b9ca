"""metrics.jsonl writing/truncation, throughput and MFU arithmetic, GPU peak lookup, plot output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain import metrics
from pretrain.config import load_config
from pretrain.logging import METRICS_FILE, SAMPLES_FILE, RunLogger, read_metrics
from pretrain.plot import plot_run
from tests.pretrain.helpers import write_yaml


def make_cfg(tmp_path: Path):
    text = f"model: {{preset: gpt-tiny}}\nlog: {{progress: false}}\nwandb: {{mode: disabled}}\nrun: {{dir: '{tmp_path}'}}\n"
    return load_config(write_yaml(tmp_path / "c.yaml", text))


def test_jsonl_is_flushed_per_record_and_truncated_on_resume(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    logger = RunLogger(cfg, enabled=True, start_step=0)
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step, "grad_norm": math.inf if step == 3 else 0.5})
        assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == step  # readable before close
    logger.close()
    assert read_metrics(tmp_path)[2]["grad_norm"] is None  # inf is not JSON: written as null
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 4, "lo')  # torn line from a kill
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    RunLogger(cfg, enabled=True, start_step=2).close()  # resumed from the step-2 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    RunLogger(cfg, enabled=False, start_step=0).log({"step": 9})  # other ranks write nothing
    assert [json.loads(x)["step"] for x in (tmp_path / METRICS_FILE).read_text().splitlines()] == [1, 2]


def test_samples_past_the_restored_step_are_dropped_on_resume(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    logger = RunLogger(cfg, enabled=True, start_step=0)
    for step in (2, 4, 6):
        logger.samples(step, [("a", f"a{step}"), ("b", f"b{step}")])
    logger.close()
    RunLogger(cfg, enabled=True, start_step=4).close()  # resumed from the step-4 checkpoint: step 6 is redone
    kept = [json.loads(x) for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [(r["step"], r["output"]) for r in kept] == [(2, "a2"), (2, "b2"), (4, "a4"), (4, "b4")]


def test_throughput_and_mfu() -> None:
    meter = metrics.Throughput(flops_per_token=6e6, peak_flops_total=1e12)
    meter.add(1000, 0.5)
    meter.add(3000, 1.5)
    tokens_per_s, mfu = meter.rate()
    assert tokens_per_s == 2000 and mfu == pytest.approx(6e6 * 2000 / 1e12)
    assert metrics.Throughput(flops_per_token=1.0, peak_flops_total=None).rate() == (0.0, None)


def test_peak_flops_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops(cuda, "bf16") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(cuda, "bf16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert metrics.peak_flops(cuda, "fp32") == 19.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert metrics.peak_flops(cuda, "bf16") is None
    assert metrics.peak_flops(cuda, "bf16", configured=5e12) == 5e12
    cpu_peak = metrics.peak_flops(torch.device("cpu"), "fp32")
    assert 1e8 < cpu_peak < 1e14  # a measured matmul rate, not a constant


def test_plot_writes_png(tmp_path: Path) -> None:
    lines = [{"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_s": 100.0 + s} for s in range(1, 11)]
    lines[4]["val_loss"] = 4.8
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_overlays_runs_with_panels_smoothing_and_resume_marks(tmp_path: Path, monkeypatch) -> None:
    from pretrain.logging import note_resume
    from pretrain.plot import build_figure, plot_runs, smoothed

    runs = []
    for i, name in enumerate(("short", "long")):
        run = tmp_path / name
        run.mkdir()
        records = [
            {
                "step": s,
                "loss": 5 - s / 10 + i,
                "lr": 1e-3,
                "tokens_per_s": 100.0,
                "grad_norm": 1.0 + s,
                "mfu": None,
            }
            for s in range(1, 11)
        ]
        records[4]["val_loss"] = 4.8
        (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    note_resume(runs[1], 6)
    (runs[1] / "config.yaml").write_text("model: {preset: vit-tiny-mae}\n")  # an image run counts patches
    fig = build_figure(runs)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == [
        "loss",
        "learning rate",
        "tokens | patches / s",
        "grad norm",
    ]  # no MFU logged
    loss_lines = axes[0].get_lines()
    assert len(loss_lines) == 2 * 3 + 1  # per run: raw, smoothed, validation; and the one resume mark
    assert list(loss_lines[1].get_ydata()) == smoothed([5 - s / 10 for s in range(1, 11)])
    marks = [line for ax in axes for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(marks) == 4 and all(list(m.get_xdata()) == [6, 6] for m in marks)
    assert fig.texts[0].get_text() == "short vs long"
    monkeypatch.chdir(tmp_path)
    assert (
        plot_runs(runs) == Path("metrics-compare.png") and (tmp_path / "metrics-compare.png").stat().st_size
    )


def test_smoothing_is_debiased() -> None:
    from pretrain.plot import smoothed

    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])

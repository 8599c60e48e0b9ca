"""Stage b, correctness: our models against transformers, the chunked kernel against SDPA, and every engine.

1. Parity: each family converted from a randomly initialised transformers model (`models.from_hf`), both
   given one batch in fp32 (TF32 off) and in bf16 autocast; logits, loss and every gradient compared.
2. Attention in bf16: chunked, SDPA's flash and memory-efficient kernels (forced one at a time) and eager,
   each against eager attention in float64 on the same inputs: output and the q, k, v (and T5 bias table)
   gradients, as ||x - ref|| / ||ref||.
3. Engines: `pretrain train` for 20 steps (3 in a dry run) at world size 1 in bf16 with each engine of
   `common.ENGINES`, the same seed, model and data, run side by side (one GPU holds them all); the
   per-step losses compared, and the peak memory of ZeRO-3 and FSDP against the predicted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench._common import QUICK, Shape, autocast, hf_model, make_batch
from bench.gpu.common import (
    ENGINES,
    ROOT,
    Report,
    cuda,
    device,
    engine_overrides,
    free_memory,
    rel_err,
    run_stage,
    sdpa_backend,
    short_error,
    stage_env,
)

ENGINE_STEPS = 20
PARITY_SHAPE = Shape(n_layers=4, d_model=512, n_heads=8, vocab_size=8192, seq_len=512, batch_size=4)
# ||x - ref|| / ||ref|| accepted: fp32 (TF32 off) is rounding only; bf16 autocast rounds every matmul
# output, and the two models round in different places.
PARITY_TOL = {"fp32": {"logits": 1e-5, "grads": 1e-4}, "bf16": {"logits": 2e-2, "grads": 5e-2}}


# ---------------------------------------------------------------------------------------------- parity


def _grads_in_our_names(theirs: torch.nn.Module, ours: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' gradients under our parameter names (the mapping tests/models/test_parity.py uses)."""
    from models.hf import _FAMILIES, convert_from_hf

    spec = _FAMILIES[ours.config.family]
    grads = {n: p.grad for n, p in theirs.named_parameters(remove_duplicate=False)}
    return convert_from_hf(spec.rules(ours.config), grads)


def parity_row(family: str, precision: str, shape: Shape) -> dict:
    import models

    dev = device()
    theirs = hf_model(family, shape).to(dev).train()
    ours = models.from_hf(theirs).train()
    batch = {k: v.to(dev) for k, v in make_batch(family, shape).items()}
    with autocast(precision):
        ref = theirs(**batch)
        out = ours(**batch)
    ref.loss.backward()
    out.loss.backward()
    ref_logits = ref.logits[batch["labels"] != -100] if family == "bert" else ref.logits
    expected = _grads_in_our_names(theirs, ours)
    num = den = 0.0
    worst, worst_name = 0.0, ""
    for name, param in ours.named_parameters():
        diff = (param.grad.double() - expected[name].double()).norm().item()
        size = expected[name].double().norm().item()
        num, den = num + diff**2, den + size**2
        err = diff / max(size, 1e-30)
        if err > worst:
            worst, worst_name = err, name
    logits_err = rel_err(out.logits, ref_logits)
    grads_err = math.sqrt(num / max(den, 1e-300))
    tol = PARITY_TOL[precision]
    return {
        "family": family,
        "precision": precision,
        "attention (ours / theirs)": f"{ours.config.attention} / {theirs.config._attn_implementation}",
        "logits_rel_err": logits_err,
        "loss_abs_diff": abs(out.loss.item() - ref.loss.item()),
        "grads_rel_err": grads_err,
        "worst_param_rel_err": worst,
        "worst_param": worst_name,
        "ok": logits_err <= tol["logits"] and grads_err <= tol["grads"],
        "status": "ok",
    }


def parity(report: Report) -> None:
    shape = QUICK if report.dry_run else PARITY_SHAPE
    columns = ["family", "precision", "attention (ours / theirs)", "logits_rel_err", "loss_abs_diff",
               "grads_rel_err", "worst_param_rel_err", "worst_param", "ok", "status"]  # fmt: skip
    report.table("parity", columns, title=f"parity with transformers ({shape}); tolerances {PARITY_TOL}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failed = []
    for family in ("gpt", "bert", "t5"):
        for precision in ("fp32", "bf16"):
            row = {"family": family, "precision": precision, "ok": False}
            if report.left() < 10:
                row["status"] = "skipped (stage budget spent)"
            else:
                try:
                    row = parity_row(family, precision, shape)
                except Exception as exc:
                    row["status"] = short_error(exc)
            report.row("parity", **row)
            if not row["ok"]:
                failed.append(f"{family} {precision}")
            free_memory()
    report.goal("parity with transformers, 3 families x fp32/bf16", not failed, f"failed: {failed or 'none'}")


# ------------------------------------------------------------------------------------------- attention


def _attention_inputs(b: int, h: int, n: int, d: int, *, bias: bool):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v, grad = (torch.randn(b, h, n, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(4))
    table = torch.randn(32, h, device=dev, generator=g) if bias else None
    return q, k, v, grad, table


def _run_attention(backend: str, sdpa_kind: str | None, inputs, *, causal: bool, dtype: torch.dtype) -> dict:
    """Output and gradients of one backend on `inputs` converted to `dtype` (the table stays float32
    unless dtype is float64)."""
    from models.attention import attend
    from models.kernels.bias import RelativeBias

    q, k, v, grad, table = inputs
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    kwargs: dict = {"causal": causal}
    leaves = {"q": q, "k": k, "v": v}
    if table is not None:
        t = table.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        leaves["table"] = t
        kwargs = {"bias": RelativeBias(table=t, bidirectional=True, num_buckets=32, max_distance=128)}
        kwargs["scale"] = 1.0
    with sdpa_backend(sdpa_kind):
        out = attend(q, k, v, backend=backend, **kwargs)
        out.backward(grad.to(out.dtype))
    return {"out": out.detach()} | {f"d{name}": t.grad for name, t in leaves.items()}


def attention_exactness(report: Report) -> None:
    b, h, n, d = (1, 2, 256, 64) if report.dry_run else (2, 16, 2048, 64)
    report.table(
        "attention",
        ["case", "backend", "out", "dq", "dk", "dv", "dtable", "status"],
        title=f"attention in bf16 vs eager in float64, ||x - ref|| / ||ref|| (B={b} H={h} L={n} D={d})",
    )
    candidates = {
        "causal": [("chunked", None), ("sdpa flash", "flash"), ("sdpa efficient", "efficient"), ("eager", None)],
        "t5 bias": [("chunked", None), ("sdpa efficient", "efficient"), ("sdpa math", "math"), ("eager", None)],
    }  # fmt: skip
    verdicts = []
    for case, backends in candidates.items():
        bias = case == "t5 bias"
        inputs = _attention_inputs(b, h, n, d, bias=bias)
        ref = _run_attention("eager", None, inputs, causal=not bias, dtype=torch.float64)
        errors: dict[str, float] = {}
        for label, kind in backends:
            if kind is not None and not cuda():
                report.row("attention", case=case, backend=label, status="skipped (no CUDA)")
                continue
            if report.left() < 10:
                report.row("attention", case=case, backend=label, status="skipped (stage budget spent)")
                continue
            backend = label.split()[0]
            try:
                got = _run_attention(backend, kind, inputs, causal=not bias, dtype=torch.bfloat16)
            except Exception as exc:  # e.g. a kernel that does not take this bias
                report.row("attention", case=case, backend=label, status=short_error(exc))
                continue
            errs = {name: rel_err(got[name], ref[name]) for name in ref}
            errors[label] = max(errs.values())
            report.row("attention", case=case, backend=label, status="ok", **errs)
            del got
            free_memory()
        fused = [e for label, e in errors.items() if label.startswith("sdpa")]
        if "chunked" in errors:
            # Exact = as close to the float64 result as PyTorch's own kernels get from the same bf16 inputs.
            # The floor: gradients are stored in bf16 and use the bf16 output (rowsum(dO * O)), ~1e-2 worst.
            bound = max(1.1 * min(fused), 1e-2) if fused else 1e-2
            verdicts.append((case, errors["chunked"], bound))
    bad = [f"{c}: {e:.2e} > {bound:.2e}" for c, e, bound in verdicts if e > bound]
    detail = "; ".join(f"{c}: chunked {e:.2e}, bound {bound:.2e}" for c, e, bound in verdicts)
    report.goal(
        "chunked kernel exact in bf16 (within 1.1x of the best SDPA kernel's error, or <= 1e-2)",
        not bad,
        detail,
    )


# --------------------------------------------------------------------------------------------- engines


def _run_config(run_root: Path, dry: bool) -> Path:
    """The run config every engine trains (the engine keys come from common.ENGINES), without dropout so
    that the engines' losses can be compared step by step."""
    import yaml

    if dry:
        model = {
            "preset": "gpt-tiny",
            "n_layers": 2,
            "d_model": 64,
            "n_heads": 2,
            "d_ff": 256,
            "max_seq_len": 64,
        }
        data = {"seq_len": 64, "vocab_size": 512, "tokenizer_train_chars": 200_000}
        train = {"max_steps": 3, "micro_batch_size": 4}
    else:
        model = {"preset": "gpt2-small", "max_seq_len": 512}
        data = {"seq_len": 512, "vocab_size": 8192}
        train = {"max_steps": ENGINE_STEPS, "micro_batch_size": 16}
    config = {
        "model": model | {"dropout": 0.0, "attention_dropout": 0.0},
        "data": data | {"source": "builtin", "num_workers": 0},
        "train": train | {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant", "precision": "bf16",
                          "seed": 0, "eval_every": 0},
        "checkpoint": {"every": 100_000, "keep": 1},  # the loop still saves once, at the last step
        "log": {"every": 1, "progress": False},
        "wandb": {"mode": "disabled"},
    }  # fmt: skip
    path = run_root / "engines.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _memory_plan_gib(config: Path, engine: str) -> tuple[float | None, str]:
    """Predicted peak GPU memory of `engine` at world size 1 for the run `config` describes, and its source.

    The memory planner (`pretrain plan`) is not on this branch: until it is, an analytic estimate (model
    states as each engine keeps them in bf16 + Korthikanti et al.'s activation bytes with a fused attention
    kernel + the logits' bf16 / fp32 / gradient copies). Replace the body with the planner's number.
    """
    import models
    from pretrain.config import load_config

    cfg = load_config(config, [])
    # the vocabulary a run trains its tokenizer to (the run fills it from the tokenizer at start)
    model_cfg = dataclasses.replace(cfg.model.config, vocab_size=cfg.data.vocab_size)
    with torch.device("meta"):
        n = models.build_from_config(model_cfg, init=False).num_parameters()
    state_bytes = {"zero1": 20, "zero2": 20, "zero3": 20, "fsdp": 16, "ddp": 18}[engine]
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    activations = 34 * tokens * model_cfg.d_model * model_cfg.n_layers
    logits = 10 * tokens * model_cfg.vocab_size
    return (state_bytes * n + activations + logits) / 2**30, "analytic (no planner on this branch)"


def _launch(name: str, config: Path, run_root: Path, dry: bool) -> tuple[subprocess.Popen, Path]:
    run_dir = run_root / name
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "train",
        str(config),
        f"run.dir={run_dir}",
        *engine_overrides(name),
    ]
    env = stage_env()
    if dry:
        env["OMP_NUM_THREADS"] = "1"  # five processes on a small CPU
    log = open(run_root / f"{name}.log", "w")  # noqa: SIM115 - the child writes it; closed with the process
    # In this stage's process group, so that bench/gpu/run.py's kill at the time limit reaches it too.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, run_dir


def _losses(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class EngineRuns:
    """The `pretrain train` processes of every engine, started together and collected at the end."""

    root: Path
    config: Path
    procs: dict[str, tuple[subprocess.Popen, Path]]
    started: float
    finished: dict[str, float] = dataclasses.field(default_factory=dict)

    def watch(self) -> None:
        """Note each process's wall time as it exits (this process is busy with other checks meanwhile)."""
        for name, (proc, _) in self.procs.items():

            def note(name: str = name, proc: subprocess.Popen = proc) -> None:
                proc.wait()
                self.finished[name] = time.monotonic() - self.started

            threading.Thread(target=note, daemon=True).start()

    def wait(self, deadline: float) -> None:
        """Until all have exited or `deadline` (monotonic) passes; then kill what still runs."""
        while any(p.poll() is None for p, _ in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start_engines(dry: bool) -> EngineRuns:
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-engines-"))
    config = _run_config(root, dry)
    procs = {name: _launch(name, config, root, dry) for name in ENGINES}
    runs = EngineRuns(root=root, config=config, procs=procs, started=time.monotonic())
    runs.watch()
    return runs


def collect_engines(report: Report, runs: EngineRuns) -> None:
    try:
        runs.wait(report.deadline - 5)
        _engine_table(report, runs)
    finally:
        shutil.rmtree(runs.root, ignore_errors=True)


def _engine_table(report: Report, runs: EngineRuns) -> None:
    dry = report.dry_run
    report.table(
        "engines",
        ["engine", "overrides", "status", "steps", "first_loss", "last_loss", "max_abs_dloss_vs_zero1",
         "max_rel_dloss_vs_zero1", "tokens_per_s", "peak_gib", "planned_gib", "measured_over_planned", "wall_s"],
        title="pretrain train, world size 1, bf16, same seed"
        + (" (dry run: gpt-tiny, 3 steps)" if dry else " (gpt2-small, vocab 8192, seq 512, micro-batch 16, 20 steps)"),
    )  # fmt: skip
    records = {name: _losses(run_dir) for name, (_, run_dir) in runs.procs.items()}
    ref = [r["loss"] for r in records.get("zero1", [])]
    worst_rel = 0.0
    memory_goals = []
    for name, (proc, _) in runs.procs.items():
        recs = records[name]
        losses = [r["loss"] for r in recs]
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        if proc.returncode != 0:
            tail = (runs.root / f"{name}.log").read_text().strip().splitlines()[-3:]
            status += ": " + " / ".join(tail)[-300:]
        common = min(len(ref), len(losses))
        dl = [abs(a - b) for a, b in zip(losses[:common], ref[:common], strict=True)]
        rel = [x / abs(b) for x, b in zip(dl, ref[:common], strict=True)]
        if rel and name != "zero1":
            worst_rel = max(worst_rel, max(rel))
        speeds = [r["tokens_per_s"] for r in recs[2:]] or [r["tokens_per_s"] for r in recs]
        peak = recs[-1]["memory_gib"] if recs else None
        planned, source = _memory_plan_gib(runs.config, name) if name in ("zero3", "fsdp") else (None, "")
        ratio = peak / planned if planned and peak and cuda() else None
        report.row(
            "engines", engine=name, overrides=" ".join(ENGINES[name]), status=status, steps=len(recs),
            first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
            max_abs_dloss_vs_zero1=max(dl) if dl else None, max_rel_dloss_vs_zero1=max(rel) if rel else None,
            tokens_per_s=sorted(speeds)[len(speeds) // 2] if speeds else None, peak_gib=peak if cuda() else None,
            planned_gib=planned, measured_over_planned=ratio, wall_s=runs.finished.get(name),
        )  # fmt: skip
        if ratio:
            memory_goals.append((name, ratio, source))
    report.note(
        "the engine runs ran side by side, and beside this stage's parity and attention checks: their "
        "tokens/s share the device (stage d times steps alone); wall_s includes start-up and the final save"
    )
    finished = all(p.returncode == 0 for p, _ in runs.procs.values())
    report.goal(
        f"every engine trains {ENGINE_STEPS} steps at world size 1 in bf16",
        finished,
        ", ".join(f"{n}: exit {p.returncode}" for n, (p, _) in runs.procs.items()),
    )
    report.goal(
        "identical-seed losses agree across engines (each step within 1% of ZeRO-1's)",
        worst_rel <= 0.01 if finished else False,
        f"worst relative difference {worst_rel:.2e}",
    )
    if not cuda():
        report.goal("ZeRO-3 and FSDP peak memory within 15% of the plan", None, "skipped (no CUDA)")
    for name, ratio, source in memory_goals:
        report.goal(
            f"{name} peak memory within 15% of the plan",
            abs(ratio - 1) <= 0.15,
            f"measured / planned = {ratio:.2f} ({source})",
        )


def body(report: Report) -> None:
    runs = start_engines(report.dry_run)  # they train while this process checks parity and attention
    try:
        parity(report)
        attention_exactness(report)
    finally:
        collect_engines(report, runs)


if __name__ == "__main__":
    run_stage("correctness", __doc__.splitlines()[0], body)

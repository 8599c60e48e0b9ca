"""bench/gpu/run.py --dry-run keeps the GPU script working on CPU: every stage runs at toy size and writes
its JSON and Markdown, with numbers that say the code computed what it should (CUDA-only parts skipped)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.common import REPO, subprocess_env

STAGES = ("environment", "correctness", "attention", "throughput")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gpu-dry-run")
    env = subprocess_env(WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu.run", "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{s}.{ext}" for s in STAGES for ext in ("json", "md")), (
        names
    )  # 8: what comes back
    for stage in STAGES:
        assert (out / f"{stage}.md").read_text().startswith(f"## {stage}: ok")
    return {stage: json.loads((out / f"{stage}.json").read_text()) for stage in STAGES}


def rows(report: dict, table: str) -> list[dict]:
    return report["tables"][table]["rows"]


def test_every_stage_ran_as_a_dry_run(reports: dict[str, dict]) -> None:
    for stage, report in reports.items():
        assert report["status"] == "ok", (stage, report.get("error"), report.get("log_tail"))
        assert report["dry_run"] is True
        assert 0 < report["seconds"] <= report["budget_s"]


def test_environment_measures_the_ceiling(reports: dict[str, dict]) -> None:
    env = reports["environment"]
    assert env["bf16_ceiling_flops"] > 1e8
    assert {r["measure"] for r in rows(env, "ceilings")} >= {"matmul bf16", "device copy (read + write)"}
    assert all(r["median"] > 0 for r in rows(env, "ceilings"))
    assert env["install"]["status"].startswith("skipped")


def test_parity_and_attention_errors_are_small(reports: dict[str, dict]) -> None:
    report = reports["correctness"]
    parity = rows(report, "parity")
    assert {(r["family"], r["precision"]) for r in parity} == {
        (f, p) for f in ("gpt", "bert", "t5") for p in ("fp32", "bf16")
    }
    for r in parity:
        tol = 1e-5 if r["precision"] == "fp32" else 2e-2
        assert r["ok"] and r["logits_rel_err"] <= tol and r["grads_rel_err"] < 10 * tol, r
    attention = rows(report, "attention")
    chunked = [r for r in attention if r["backend"] == "chunked"]
    assert len(chunked) == 2 and all(0 < r["out"] < 1e-2 and r["dq"] < 1e-2 for r in chunked), chunked
    assert [r["dtable"] for r in chunked if r["case"] == "t5 bias"][0] < 2e-2
    assert {r["status"] for r in attention if r["backend"].startswith("sdpa")} == {"skipped (no CUDA)"}


def test_every_engine_trains_with_the_same_losses(reports: dict[str, dict]) -> None:
    engines = rows(reports["correctness"], "engines")
    assert [r["engine"] for r in engines] == ["zero1", "zero2", "zero3", "ddp", "fsdp"]
    for r in engines:
        assert r["status"] == "ok" and r["steps"] == 3, r
        assert r["max_rel_dloss_vs_zero1"] < 1e-2, r
    assert all(r["planned_gib"] > 0 for r in engines if r["engine"] in ("zero3", "fsdp"))
    goals = {g["goal"]: g["met"] for g in reports["correctness"]["goals"]}
    assert goals["parity with transformers, 3 families x fp32/bf16"] is True


def test_attention_rows_cover_both_cases_and_lengths(reports: dict[str, dict]) -> None:
    table = rows(reports["attention"], "attention")
    measured = {(r["case"], r["L"], r["backend"]) for r in table if r["status"] == "ok"}
    for case in ("causal", "t5 bias"):
        for length in (128, 256):
            assert {(case, length, b) for b in ("sdpa auto", "chunked 256", "eager")} <= measured
    assert all(r["ms"] > 0 and r["err_vs_ref"] < 5e-2 for r in table if r["status"] == "ok")


def test_throughput_compares_ours_with_transformers_on_the_same_weights(reports: dict[str, dict]) -> None:
    report = reports["throughput"]
    steps = [r for r in rows(report, "steps") if r["status"] == "ok"]
    for model in ("gpt-tiny", "bert-tiny", "t5-tiny"):
        pair = [r for r in steps if r["model"] == model and not r["ckpt"]]
        assert {r["who"] for r in pair} == {"transformers", "ours (ddp)"}, pair
        assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in pair)
        theirs, ours = sorted(pair, key=lambda r: r["who"] != "transformers")
        assert abs(ours["loss0"] - theirs["loss0"]) < 1e-2 * theirs["loss0"]  # the same function
    compiled = [r for r in rows(report, "steps") if r["mode"] == "compile"]
    assert compiled and all(r["status"].startswith("skipped") for r in compiled)
    assert [r["micro_batch"] for r in rows(report, "max_micro_batch") if not r["ckpt"]] == [2, 4, 8]
    profile = rows(report, "profile")
    assert {r["model"] for r in profile} == {"gpt-tiny", "bert-tiny", "t5-tiny"}
    assert all(r["ms_per_step"] >= 0 for r in profile)

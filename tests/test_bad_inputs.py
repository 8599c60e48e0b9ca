"""Every bad input gets a clear answer, through the real `pretrain` / `launch` commands.

Each bad input must end in a non-zero exit, ONE line on stderr naming the key/file/value, no traceback, and
nothing started (no run directory). The checkpoint cases train one tiny run, then damage or tamper with its
checkpoints: resume must refuse what is unsafe without running it and fall back to the newest intact one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pretrain.safety import write_manifest
from tests.common import REPO

CONFIG = REPO / "configs" / "gpt-tiny.yaml"
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
for _name in [k for k in ENV if k == "WANDB_API_KEY" or k.endswith(("_TOKEN", "_SECRET", "_PASSWORD"))]:
    del ENV[_name]
MAX_CPU_S = 20.0  # a validation error must come before models, data or process groups (imports cost ~5 s)


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str
    cpu_s: float


def run_cli(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> Result:
    """`python -m MODULE ARGS` in a subprocess; also reports the CPU time it used (load-independent)."""
    out, err = cwd / f".{os.getpid()}-{id(args)}.out", cwd / f".{os.getpid()}-{id(args)}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=cwd, env=env or ENV, stdout=fo, stderr=fe
        )
        killer = threading.Timer(timeout, proc.kill)  # a hang (e.g. wandb online without network) fails
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
            proc.returncode = 0  # reaped by wait4 above; keep Popen from waiting again
    result = Result(
        os.waitstatus_to_exitcode(status), out.read_text(), err.read_text(), usage.ru_utime + usage.ru_stime
    )
    out.unlink()
    err.unlink()
    return result


# ------------------------------------------------------------------------------------------ bad inputs

TRAIN = ("pretrain", "train", str(CONFIG), "run.dir={cwd}/run")

# id -> (command, fragments the one stderr line must contain); {tmp}: the shared inputs, {cwd}: the case's own dir
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "config_missing": (
        ("pretrain", "train", "{tmp}/missing.yaml", "run.dir={cwd}/run"),
        ("missing.yaml", "not found"),
    ),
    "config_not_yaml": (
        ("pretrain", "train", "{tmp}/broken.yaml", "run.dir={cwd}/run"),
        ("broken.yaml", "not valid YAML"),
    ),
    "config_not_mapping": (
        ("pretrain", "train", "{tmp}/list.yaml", "run.dir={cwd}/run"),
        ("list.yaml", "mapping"),
    ),
    "unknown_key_override": (
        (*TRAIN, "train.max_step=5"),
        ("train.max_step", "did you mean train.max_steps"),
    ),
    "unknown_key_in_file": (
        ("pretrain", "train", "{tmp}/typo.yaml", "run.dir={cwd}/run"),
        ("trian", "did you mean train"),
    ),
    "unknown_model_field": ((*TRAIN, "model.n_layer=2"), ("model.n_layer", "did you mean model.n_layers")),
    "override_without_equals": ((*TRAIN, "train.max_steps"), ("train.max_steps", "key.path=value")),
    "wrong_type": ((*TRAIN, "train.max_steps=lots"), ("train.max_steps", "lots")),
    "wrong_type_bool": (
        (*TRAIN, "model.gradient_checkpointing=maybe"),
        ("model.gradient_checkpointing", "maybe"),
    ),
    "negative_steps": ((*TRAIN, "train.max_steps=-5"), ("train.max_steps", "-5")),
    "zero_batch": ((*TRAIN, "train.micro_batch_size=0"), ("train.micro_batch_size", "0")),
    "zero_seq_len": ((*TRAIN, "data.seq_len=0"), ("data.seq_len", "0")),
    "zero_stage_5": ((*TRAIN, "engine.deepspeed.zero_stage=5"), ("engine.deepspeed.zero_stage", "5")),
    "renamed_engine_key": (
        (*TRAIN, "engine.zero_stage=1"),
        ("engine.zero_stage", "engine.deepspeed.zero_stage"),
    ),
    "unknown_preset": (
        (*TRAIN, "model.preset=gpt-tinny"),
        ("model.preset", "gpt-tinny", "did you mean 'gpt-tiny'"),
    ),
    "unknown_attention": ((*TRAIN, "model.attention=flash"), ("model.attention", "flash", "sdpa")),
    "unknown_objective": ((*TRAIN, "objective=causal"), ("objective", "causal", "clm")),
    "unknown_engine": ((*TRAIN, "engine.backend=horovod"), ("engine.backend", "horovod", "deepspeed")),
    "objective_not_for_family": ((*TRAIN, "objective=mlm"), ("objective", "mlm", "gpt", "clm")),
    "deepspeed_json_invalid": (
        (*TRAIN, "engine.deepspeed.config={tmp}/broken.json"),
        ("broken.json", "not valid JSON"),
    ),
    "deepspeed_json_missing": (
        (*TRAIN, "engine.deepspeed.config={tmp}/nope.json"),
        ("nope.json", "does not exist"),
    ),
    "deepspeed_json_conflict": (
        (*TRAIN, "engine.deepspeed.config={tmp}/conflict.json"),
        ("conflict.json", "train_micro_batch_size_per_gpu=4", "train.micro_batch_size"),
    ),
    "data_glob_matches_nothing": (
        (*TRAIN, "data.source={tmp}/nowhere/*.txt"),
        ("data.source", "nowhere/*.txt", "matches no files"),
    ),
    "corpus_without_text": (
        (*TRAIN, "data.source={tmp}/blank/*.txt"),
        ("data.source", "blank/*.txt", "empty"),
    ),
    "export_without_checkpoint": (
        ("pretrain", "export", "{tmp}/fresh_run", "{tmp}/exported"),
        ("fresh_run", "no checkpoint"),
    ),
    "export_not_a_run_dir": (
        ("pretrain", "export", "{tmp}/blank", "{tmp}/exported"),
        ("blank", "not a run directory"),
    ),
    "launch_nodes_0": (
        ("launch", "slurm", "--dry-run", "--nodes", "0", "--gpus-per-node", "1", str(CONFIG)),
        ("--nodes", "0"),
    ),
    "launch_nproc_zero": (
        ("launch", "local", "--dry-run", "--nproc", "zero", str(CONFIG)),
        ("--nproc", "zero"),
    ),
    "launch_bad_master": (
        (
            "launch",
            "torchrun",
            "--dry-run",
            "--nnodes",
            "2",
            "--node-rank",
            "0",
            "--master",
            "node1",
            "--nproc",
            "1",
            str(CONFIG),
        ),
        ("--master", "node1", "HOST:PORT"),
    ),
    "launch_bad_time": (
        (
            "launch",
            "slurm",
            "--dry-run",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--time",
            "soon",
            str(CONFIG),
        ),
        ("--time", "soon"),
    ),
    "launch_config_missing": (
        ("launch", "local", "--dry-run", "--nproc", "1", "{tmp}/missing.yaml"),
        ("missing.yaml", "not found"),
    ),
    "launch_override_without_equals": (
        ("launch", "local", "--dry-run", "--nproc", "1", str(CONFIG), "train.max_steps"),
        ("train.max_steps", "key.path=value"),
    ),
}


def _write_inputs(tmp: Path) -> None:
    (tmp / "broken.yaml").write_text("model: [gpt-tiny\ntrain: {\n")
    (tmp / "list.yaml").write_text("- model\n- train\n")
    (tmp / "typo.yaml").write_text(CONFIG.read_text().replace("train:", "trian:", 1))
    (tmp / "broken.json").write_text('{"train_micro_batch_size_per_gpu": "auto",')
    (tmp / "conflict.json").write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}})
    )
    (tmp / "blank").mkdir()
    (tmp / "blank" / "a.txt").write_text("")
    (tmp / "blank" / "b.txt").write_text("")
    (tmp / "fresh_run").mkdir()
    (tmp / "fresh_run" / "config.yaml").write_text(CONFIG.read_text())


@pytest.fixture(scope="module")
def bad_input_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Result]]:
    """Run each selected case once, a few at a time (each is a fresh interpreter: most of its cost is imports)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input_gets_one_clear_line"
    ]
    tmp = tmp_path_factory.mktemp("bad")
    _write_inputs(tmp)

    def one(case: str) -> tuple[Path, Result]:
        cwd = tmp / case
        cwd.mkdir()
        module, *args = (
            part.replace("{tmp}", str(tmp)).replace("{cwd}", str(cwd)) for part in CASES[case][0]
        )
        return cwd, run_cli(module, *args, cwd=cwd)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(selected, pool.map(one, selected)))
    for case, (_, result) in results.items():  # shown with -s: how long each answer took
        print(f"{case:32s} rc={result.rc} cpu={result.cpu_s:5.1f}s")
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    list(CASES),
)
def test_bad_input_gets_one_clear_line(case: str, bad_input_results: dict[str, tuple[Path, Result]]) -> None:
    cwd, result = bad_input_results[case]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.rc != 0, f"exit code 0 for a bad input; stdout: {result.stdout!r}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n" + "\n".join(lines[-20:])
    for fragment in CASES[case][1]:
        assert fragment in lines[0], f"{fragment!r} not named in: {lines[0]}"
    assert not (cwd / "run").exists() and not (cwd / "runs").exists(), "a run directory was created"
    assert result.cpu_s < MAX_CPU_S, (
        f"took {result.cpu_s:.1f} s of CPU: validation must come before expensive work"
    )


# -------------------------------------------------------------------------------- checkpoints & secrets

FAKE_KEY = "fakewandbkey0123456789abcdef0123456789abcd"  # 40 hex-ish chars like a real W&B key
FAKE_TOKEN = "hf_fakeTokenForLeakTest0123456789"
TINY = (
    "train.max_steps=6",
    "checkpoint.every=2",
    "checkpoint.keep=3",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "train.warmup_steps=1",
    "data.seq_len=32",
    "data.vocab_size=384",
    "model.max_seq_len=32",
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "log.every=1",
    "log.progress=true",
)


def _train(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Result:
    return run_cli(
        "pretrain", "train", str(CONFIG), f"run.dir={run_dir}", *TINY, *extra, cwd=run_dir.parent, env=env
    )


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One tiny 6-step run (checkpoints at 2, 4, 6), trained with fake credentials in the environment."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": FAKE_TOKEN}
    result = _train(run_dir, "wandb.mode=offline", env=env)
    assert result.rc == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_2", "step_4", "step_6"]
    return run_dir, result


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper(checkpoint: Path, marker: Path) -> None:
    """Plant a code-running pickle in the engine state, and re-sign the manifest as an attacker could."""
    (pt,) = checkpoint.glob("engine/**/*model_states.pt")
    state = torch.load(pt, weights_only=False)
    torch.save({**state, "payload": _Touch(marker)}, pt)
    write_manifest(checkpoint)


def _interrupted(trained_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run as if it had been stopped right after saving step 4 of 6."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_6")
    (run_dir / "checkpoints" / "latest").write_text("step_4")
    return run_dir


@pytest.mark.slow
def test_tampered_checkpoint_is_refused_and_resume_uses_the_previous(trained, tmp_path: Path) -> None:
    run_dir = _interrupted(trained[0], tmp_path)
    marker = tmp_path / "pwned"
    _tamper(run_dir / "checkpoints" / "step_4", marker)
    result = _train(run_dir)
    assert result.rc == 0, result.stderr[-3000:]
    assert not marker.exists(), "the tampered pickle ran code"
    output = result.stdout + result.stderr
    assert "step_4" in output and "posix.system" in output, output[-3000:]
    assert "resumed from step_2" in output, output[-3000:]
    assert _losses(run_dir) == _losses(trained[0])  # steps 3-6 redone from step 2, exactly as the first time


@pytest.mark.slow
def test_truncated_checkpoint_file_resumes_from_the_previous(trained, tmp_path: Path) -> None:
    run_dir = _interrupted(trained[0], tmp_path)
    weights = run_dir / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = _train(run_dir)
    assert result.rc == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "model.safetensors" in output and "truncated" in output, output[-3000:]
    assert "resumed from step_2" in output, output[-3000:]
    assert _losses(run_dir) == _losses(trained[0])


@pytest.mark.slow
def test_no_intact_checkpoint_stops_instead_of_starting_over(trained, tmp_path: Path) -> None:
    run_dir = _interrupted(trained[0], tmp_path)
    marker = tmp_path / "pwned"
    for step in ("step_2", "step_4"):
        _tamper(run_dir / "checkpoints" / step, marker)
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    result = _train(run_dir)
    assert result.rc != 0
    assert not marker.exists(), "the tampered pickle ran code"
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no intact checkpoint" in last, result.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before, "training started over"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_2", "step_4"]


@pytest.mark.slow
def test_finished_run_with_damaged_final_checkpoint_says_so(trained, tmp_path: Path) -> None:
    # Rerunning a finished run must not vouch for a final checkpoint that no longer verifies.
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    weights = run_dir / "checkpoints" / "step_6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = _train(run_dir)
    output = result.stdout + result.stderr
    assert "step_6" in output and "model.safetensors" in output, output[-3000:]
    assert "already trained to step 6" not in output, output[-3000:]


@pytest.mark.slow
def test_no_secret_in_any_run_output(trained, tmp_path: Path) -> None:
    run_dir, result = trained
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": FAKE_TOKEN}
    # --dry-run checks a resume of the run dir (trained by 1 process): 1 process and the run's settings pass
    sbatch = run_cli(
        "launch",
        "slurm",
        "--dry-run",
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        str(CONFIG),
        f"run.dir={run_dir}",
        *TINY,
        cwd=tmp_path,
        env=env,
    )
    local = run_cli(
        "launch",
        "local",
        "--dry-run",
        "--nproc",
        "1",
        str(CONFIG),
        f"run.dir={run_dir}",
        *TINY,
        cwd=tmp_path,
        env=env,
    )
    assert sbatch.rc == 0 and "#SBATCH" in sbatch.stdout and local.rc == 0, sbatch.stderr + local.stderr
    outputs = {
        "train stdout": result.stdout,
        "train stderr": result.stderr,
        "sbatch script": sbatch.stdout + sbatch.stderr,
        "launch local": local.stdout + local.stderr,
    }
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert run_dir / "config.yaml" in files and run_dir / "metrics.jsonl" in files
    assert any("offline-run-" in str(p) for p in files), "W&B offline files missing"
    assert not any(p.name.startswith("run-") and p.parent.name.startswith("run-") for p in files), (
        "W&B went online"
    )
    for secret in (FAKE_KEY, FAKE_TOKEN):
        leaks = [name for name, text in outputs.items() if secret in text]
        leaks += [str(p.relative_to(run_dir)) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"secret {secret[:6]}... found in: {leaks}"


def test_a_key_alone_does_not_turn_wandb_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Online only when configured: a key in the environment (with no network) would make wandb hang.
    from pretrain.config import load_config

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = tmp_path / "no-wandb.yaml"
    config.write_text(CONFIG.read_text().split("wandb:")[0])
    assert "wandb" not in config.read_text()
    assert load_config(config, [f"run.dir={tmp_path / 'run'}"]).wandb.mode == "offline"
    assert FAKE_KEY not in load_config(config, [f"run.dir={tmp_path / 'run'}"]).to_yaml()

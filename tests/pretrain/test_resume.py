"""Resume planning (pretrain/resume.py): the grad_accum that keeps the global batch at a new world size, one-line
refusals naming values that work, the data fingerprint, and the same verdicts from `pretrain check` and
`launch` before anything starts. Checkpoints here are hand-written JSON: no model, no torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from data.layout import Layout, expected_batches
from launch.cli import main as launch_main
from pretrain.checkpoint import FINGERPRINT_FILE, CheckpointManager
from pretrain.cli import main as pretrain_main
from pretrain.config import RunConfig, load_config
from pretrain.engines import DistInfo
from pretrain.errors import CheckpointError
from pretrain.resume import plan_resume
from pretrain.safety import write_manifest
from tests.common import REPO
from tests.pretrain.pretrain_fakes import FakeEngine, save_steps

MICRO = 2


def data_state(rank: int, *, world: int, accum: int, steps: int) -> dict[str, Any]:
    """Rank `rank`'s saved data state after `steps` steps of a run with `world` x `accum` micro-batches per step
    (as data/loader.py writes it at a step boundary, the per-stream cursors left out)."""
    V = world * accum
    layout = Layout(world_size=world, grad_accum=accum, num_workers=0, virtual_streams=V)
    position = steps * V
    return {
        "version": 2,
        "meta": {"batch_size": MICRO, "seq_len": 32},
        "virtual_streams": V,
        "layout": {"world_size": world, "grad_accum": accum, "num_workers": 0, "rank": rank},
        "start": 0,
        "delivered": steps * accum,
        "streams": {
            str(v): {"batches": expected_batches(v, position, V), "state": {"cursor": v}}
            for v in layout.rank_streams(rank, 0)
        },
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus" / "a.txt"
    path.parent.mkdir()
    path.write_text("one paragraph\n\nanother paragraph\n")
    return path


def config(tmp_path: Path, corpus: Path, *overrides: str) -> tuple[Path, RunConfig]:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{preset: gpt-tiny}}\ndata: {{source: '{corpus.parent}/*.txt', num_workers: 0}}\n"
        f"train: {{micro_batch_size: {MICRO}, grad_accum: 2}}\nrun: {{dir: '{tmp_path / 'run'}'}}\n"
    )
    return path, load_config(path, list(overrides))


def save_checkpoint(cfg: RunConfig, *, world: int = 2, accum: int = 2, steps: int = 3) -> Path:
    """A run dir whose latest checkpoint was written by `world` ranks (fake engine, real data states)."""
    root = cfg.run_dir / "checkpoints"
    save_steps(root, [steps], world_size=world)
    path = root / f"step_{steps}"
    for rank in range(world):
        (path / f"rank_{rank}").mkdir(exist_ok=True)
        state = data_state(rank, world=world, accum=accum, steps=steps)
        (path / f"rank_{rank}" / "data_state.json").write_text(json.dumps(state))
        (path / f"rank_{rank}" / "rng.json").write_text((path / "rank_0" / "rng.json").read_text())
    import data

    (path / FINGERPRINT_FILE).write_text(json.dumps(data.data_fingerprint(cfg.data)))
    (path / "manifest.json").unlink()
    write_manifest(path)
    return path


@pytest.mark.parametrize(("world", "accum"), [(1, 4), (2, 2), (4, 1)])
def test_the_global_batch_is_kept_at_any_world_size_dividing_it(tmp_path, corpus, world, accum) -> None:
    _, cfg = config(tmp_path, corpus)
    path = save_checkpoint(cfg)
    plan = plan_resume(cfg, world)
    assert plan is not None
    assert (plan.path, plan.step, plan.grad_accum, plan.saved_world_size) == (path, 3, accum, 2)
    assert plan.apply(cfg).train.grad_accum == accum
    assert plan.apply(cfg).engine_spec.grad_accum == accum
    if world == 2:
        assert plan.note() is None
    else:
        assert plan.note() == (
            f"resuming at step 3 at world size {world} (was 2), train.grad_accum 2 -> {accum}: "
            "the same global batch, the same data"
        )


def test_no_checkpoint_no_plan(tmp_path, corpus) -> None:
    _, cfg = config(tmp_path, corpus)
    assert plan_resume(cfg, 3) is None


def test_a_world_size_that_cannot_keep_the_global_batch_is_one_line_naming_those_that_can(
    tmp_path, corpus
) -> None:
    _, cfg = config(tmp_path, corpus)
    path = save_checkpoint(cfg)
    with pytest.raises(CheckpointError) as e:
        plan_resume(cfg, 3)
    assert str(e.value) == (
        f"{path}: cannot resume at world size 3: the checkpoint's global batch is 4 "
        "micro-batches (world 2 x grad_accum 2), so the world size must divide it: 1, 2, 4"
    )


def test_another_micro_batch_size_is_refused(tmp_path, corpus) -> None:
    _, cfg = config(tmp_path, corpus, "train.micro_batch_size=4")
    save_checkpoint(cfg)
    with pytest.raises(CheckpointError, match="resume with train.micro_batch_size=2$"):
        plan_resume(cfg, 1)


def test_changed_data_is_refused_naming_the_file_or_resumed_with_a_warning(tmp_path, corpus) -> None:
    _, cfg = config(tmp_path, corpus)
    save_checkpoint(cfg)
    corpus.write_text(corpus.read_text() + "a third paragraph\n")
    with pytest.raises(CheckpointError) as e:
        plan_resume(cfg, 2)
    assert "file 'a.txt' changed size" in str(e.value) and "\n" not in str(e.value)
    _, allowed = config(tmp_path, corpus, "data.allow_changed=true")
    plan = plan_resume(allowed, 2)
    assert plan is not None and plan.data_warning is not None
    assert plan.data_warning.startswith("warning: the data changed since the checkpoint (")


def test_restore_at_another_world_size_merges_every_rank_and_reshards(tmp_path, corpus) -> None:
    """Rank 1 of a 4-process job gets the virtual streams it now owns, from the ranks that had them."""
    _, cfg = config(tmp_path, corpus)
    save_checkpoint(cfg)
    loaded: list[dict] = []

    class Data:
        def load_state_dict(self, state: dict) -> None:
            loaded.append(state)

    engine = FakeEngine()
    dist = DistInfo(rank=1, world_size=4)
    manager = CheckpointManager(cfg.run_dir / "checkpoints", keep=3, dist=dist, broadcast=lambda _: 3)
    state = manager.restore(engine=engine, data=Data())  # type: ignore[arg-type]
    assert state is not None and state.step == 3 and state.world_size == 2
    assert engine.loaded_world_size == 2
    (merged,) = loaded
    assert merged["position"] == 12 and sorted(merged["streams"], key=int) == ["0", "1", "2", "3"]
    assert merged["streams"]["3"] == {
        "batches": 3,
        "state": {"cursor": 3},
    }  # rank 1's stream, saved by rank 1


def test_restore_at_the_saved_world_size_loads_its_own_state(tmp_path, corpus) -> None:
    _, cfg = config(tmp_path, corpus)
    path = save_checkpoint(cfg)
    loaded: list[dict] = []

    class Data:
        def load_state_dict(self, state: dict) -> None:
            loaded.append(state)

    engine = FakeEngine()
    dist = DistInfo(rank=1, world_size=2)
    manager = CheckpointManager(cfg.run_dir / "checkpoints", keep=3, dist=dist, broadcast=lambda _: 3)
    before = torch.get_rng_state()
    manager.restore(engine=engine, data=Data())  # type: ignore[arg-type]
    assert engine.loaded_world_size is None
    assert loaded == [json.loads((path / "rank_1" / "data_state.json").read_text())]
    assert not torch.equal(before, torch.get_rng_state())  # the saved RNG state was restored


def test_pretrain_check_answers_for_the_launchers_world_size(tmp_path, corpus, capsys, monkeypatch) -> None:
    path, cfg = config(tmp_path, corpus)
    save_checkpoint(cfg)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert pretrain_main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 3 at world size 4 (was 2), train.grad_accum 2 -> 1" in out
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert pretrain_main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the world size must divide it: 1, 2, 4" in err


def test_pretrain_check_refuses_a_run_without_an_intact_checkpoint(tmp_path, corpus, capsys) -> None:
    path, cfg = config(tmp_path, corpus)
    step = save_checkpoint(cfg)
    (step / "trainer_state.json").write_text("{}")  # damaged: the manifest's hash no longer matches
    assert pretrain_main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: no intact checkpoint under {cfg.run_dir / 'checkpoints'}")


@pytest.mark.parametrize(
    "argv",
    [["local", "--nproc", "3"], ["slurm", "--nodes", "3", "--gpus-per-node", "1", "--dry-run"]],
    ids=["local", "slurm-dry-run"],
)
def test_launch_refuses_an_impossible_resume_before_starting_anything(
    tmp_path, corpus, capsys, monkeypatch, argv
) -> None:
    path, cfg = config(tmp_path, corpus)
    save_checkpoint(cfg)
    started: list[str] = []
    monkeypatch.setattr(os, "execvpe", lambda file, *_: started.append(file))
    assert launch_main([*argv, str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and started == []
    step = cfg.run_dir / "checkpoints" / "step_3"
    assert err.startswith(
        f"error: launch {argv[0]}: run config {path}: {step}: cannot resume at world size 3"
    )
    assert err.endswith("so the world size must divide it: 1, 2, 4\n") and err.count("\n") == 1


def test_launch_says_how_it_will_resume_at_another_world_size(tmp_path, corpus, capsys, monkeypatch) -> None:
    path, cfg = config(tmp_path, corpus)
    save_checkpoint(cfg)
    started: list[list[str]] = []

    def execvpe(file: str, args: list[str], env: dict) -> None:
        started.append(args)
        raise SystemExit(0)  # the real one never returns

    monkeypatch.setattr(os, "execvpe", execvpe)
    with pytest.raises(SystemExit):
        launch_main(["local", "--nproc", "4", str(path)])
    assert len(started) == 1
    note = (
        "launch: resuming at step 3 at world size 4 (was 2), train.grad_accum 2 -> 1: the same global batch"
    )
    assert capsys.readouterr().err.startswith(note)


@pytest.mark.slow
def test_train_records_the_data_and_refuses_a_changed_file_or_model_unless_allowed(tmp_path, corpus) -> None:
    """Through `pretrain train`: the checkpoint records the data, an edited file stops the resume in one line
    naming it, and data.allow_changed=true resumes with a warning."""
    corpus.write_text("\n\n".join(f"paragraph {i} " + "word " * (i % 17) for i in range(400)))
    path, _ = config(tmp_path, corpus)

    def train_cli(command: str, *overrides: str) -> subprocess.CompletedProcess[str]:
        tiny = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "data.seq_len=16"]
        tiny += ["data.vocab_size=384", "checkpoint.every=2", "wandb.mode=offline", "engine.backend=ddp"]
        env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
        cmd = [sys.executable, "-m", "pretrain", command, str(path), *tiny, *overrides]
        return subprocess.run(
            cmd, cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
        )

    def train(*overrides: str) -> subprocess.CompletedProcess[str]:
        return train_cli("train", *overrides)

    first = train("train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_2" / FINGERPRINT_FILE).is_file()
    with corpus.open("a") as f:
        f.write("\n\none more paragraph\n")
    refused = train("train.max_steps=4")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the data changed since the checkpoint: data.source" in errors[0], errors
    assert "file 'a.txt' changed size" in errors[0]
    allowed = train("train.max_steps=4", "data.allow_changed=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "warning: the data changed since the checkpoint (" in allowed.stderr
    assert "resuming at step 2" in allowed.stderr
    # another architecture than the checkpoint's (here: its vocabulary padded to 400 rows) is refused in one line
    other = train("train.max_steps=6", "model.vocab_multiple=100")
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, other.stderr[-3000:]
    assert "step_4 does not fit this run's model: embed.tokens.weight is (" in errors[0]
    assert (
        "there and (400, 32) in this run's model (another vocabulary or its padding: model.vocab_size, "
        in errors[0]
    )
    assert errors[0].endswith("; resume with the model fields the run started with (its config.yaml)")
    check = train_cli("check", "model.vocab_multiple=100")
    assert (
        check.returncode == 2 and check.stderr.startswith("error: ") and len(check.stderr.splitlines()) == 1
    )
    assert "step_4 does not fit this run's model: embed.tokens.weight is (" in check.stderr
    # and so is an export from a config.yaml whose model is not the one trained (a preset's defaults changed)
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("model:\n", "model:\n  vocab_multiple: 100\n", 1))
    cmd = [sys.executable, "-m", "pretrain", "export", str(tmp_path / "run"), str(tmp_path / "export")]
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    export = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
    assert "does not fit this run's model: embed.tokens.weight is (" in export.stderr
    assert not (tmp_path / "export").exists()

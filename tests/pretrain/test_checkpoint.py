"""Checkpoint manager: atomic saves, keep-N, damaged/tampered checkpoints, RNG and data state restored, and in a
multi-rank job only rank 0 reading the files to verify them."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import safety
from pretrain.checkpoint import CheckpointError, CheckpointManager, checkpoint_dirs, find_checkpoint
from pretrain.engines.base import DistInfo
from pretrain.safety import write_manifest
from tests.common import subprocess_env
from tests.pretrain import checkpoint_worker
from tests.pretrain.pretrain_fakes import FakeData, FakeEngine, save_steps


def restore(root: Path, messages: list[str] | None = None) -> tuple[int | None, FakeEngine, FakeData]:
    engine, data = FakeEngine(), FakeData()
    say = messages.append if messages is not None else print
    state = CheckpointManager(root, keep=3, dist=DistInfo(), say=say).restore(engine=engine, data=data)
    return (state.step if state else None), engine, data


def cut_short(path: Path) -> None:
    """Truncate `path`, as a full disk does."""
    path.write_bytes(path.read_bytes()[:-7])


def manifest_size(checkpoint: Path) -> int:
    return len(json.loads((checkpoint / "manifest.json").read_text())["files"])


def weight_offset(engine: FakeEngine, reference: FakeEngine) -> float:
    """How many fake steps separate two engines' weights (each fake step adds 1 to every weight)."""
    return (engine.model.weight - reference.model.weight).mean().item()


def test_layout_and_restore(tmp_path: Path) -> None:
    trained = save_steps(tmp_path, [1, 2])
    final = tmp_path / "step_2"
    assert (tmp_path / "latest").read_text() == "step_2"
    expected = {"engine", "model.safetensors", "trainer_state.json", "rank_0", "manifest.json"}
    assert {p.name for p in final.iterdir()} == expected
    assert {p.name for p in (final / "rank_0").iterdir()} == {"data_state.json", "rng.json"}
    assert json.loads((final / "trainer_state.json").read_text()) == {
        "step": 2,
        "tokens": 200,
        "world_size": 1,
        "skips": 0,
    }
    step, engine, data = restore(tmp_path)
    assert (step, data.position) == (2, 20)
    assert torch.equal(engine.model.weight, trained.model.weight)


def test_no_checkpoint_means_fresh_start(tmp_path: Path) -> None:
    assert restore(tmp_path / "missing")[0] is None
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        find_checkpoint(tmp_path)


def test_keep_last_n(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_4", "step_5"]


def test_save_killed_midway_leaves_latest_on_previous(tmp_path: Path) -> None:
    here = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, str(here / "pretrain_fakes.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 17, proc.stderr
    assert "unreachable" not in proc.stdout
    assert (tmp_path / "latest").read_text() == "step_1"
    assert (tmp_path / ".tmp-step_2").is_dir() and not (tmp_path / "step_2").exists()
    assert restore(tmp_path)[0] == 1
    save_steps(tmp_path, [2])  # the next save succeeds and clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1", "step_2"]


def test_damaged_newest_falls_back_with_message(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    cut_short(tmp_path / "step_2" / "model.safetensors")
    messages: list[str] = []
    step, _, data = restore(tmp_path, messages)
    assert (step, data.position) == (1, 10)
    assert any("step_2" in m and "damaged" in m and "model.safetensors" in m for m in messages), messages
    assert find_checkpoint(tmp_path, say=lambda m: None).name == "step_1"


def test_no_intact_checkpoint_is_an_error_not_a_restart(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / f"step_{step}" / "trainer_state.json").write_text('{"step": 999}')
    with pytest.raises(CheckpointError, match="no intact checkpoint.*refusing to start over"):
        restore(tmp_path, [])


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/pretrain-test-pwned"),))


def test_tampered_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    marker = Path("/tmp/pretrain-test-pwned")
    marker.unlink(missing_ok=True)
    newest = tmp_path / "step_2"
    (newest / "engine" / "extra_state.pt").write_bytes(pickle.dumps(_RunsCode()))
    write_manifest(newest)  # the attacker also rewrote the manifest
    messages: list[str] = []
    assert restore(tmp_path, messages)[0] == 1
    assert not marker.exists()
    assert any("step_2" in m and "extra_state.pt" in m for m in messages), messages


def test_latest_is_trusted_over_an_unreferenced_newer_dir(tmp_path: Path) -> None:
    """A save killed between the rename and the `latest` update: `latest` still decides."""
    save_steps(tmp_path, [1, 2])
    (tmp_path / "latest").write_text("step_1")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_1", "step_2"]
    assert restore(tmp_path)[0] == 1


def test_rng_states_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    save_steps(tmp_path, [1])
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore(tmp_path)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


class TwoRanks:
    """Two ranks of one job, played one after the other in this process (rank 0 first): `broadcast` hands
    rank 1 what rank 0 sent, and `reads` counts, per rank, the files hashed and the directories scanned for
    pickles, i.e. every read of a checkpoint's contents that verification makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rank = 0
        self.sent: list[int] = []
        self.reads = {0: [0, 0], 1: [0, 0]}
        sha256, scan = safety._sha256, safety.check_pickles_under
        monkeypatch.setattr(safety, "_sha256", lambda path: self._count(0) or sha256(path))
        monkeypatch.setattr(safety, "check_pickles_under", lambda path: self._count(1) or scan(path))

    def _count(self, kind: int) -> None:
        self.reads[self.rank][kind] += 1

    def broadcast(self, value: int) -> int:
        if self.rank == 0:
            self.sent.append(value)
            return value
        return self.sent.pop(0)

    def manager(self, root: Path, rank: int, messages: list[str]) -> CheckpointManager:
        self.rank = rank
        dist = DistInfo(rank=rank, world_size=2)
        return CheckpointManager(root, keep=3, dist=dist, broadcast=self.broadcast, say=messages.append)


def save_two_rank_steps(root: Path, steps: list[int]) -> None:
    """Checkpoints as a 2-rank job writes them (rank_1's data/RNG state beside rank_0's)."""
    save_steps(root, steps, world_size=2)
    for step in steps:
        shutil.copytree(root / f"step_{step}" / "rank_0", root / f"step_{step}" / "rank_1")
        write_manifest(root / f"step_{step}")


def test_two_ranks_only_rank_zero_verifies_and_both_fall_back_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_two_rank_steps(tmp_path, [1, 2])
    cut_short(tmp_path / "step_2" / "model.safetensors")
    job = TwoRanks(monkeypatch)
    restored = {}
    for rank in (0, 1):
        messages: list[str] = []
        engine, data = FakeEngine(), FakeData()
        state = job.manager(tmp_path, rank, messages).restore(engine=engine, data=data)
        restored[rank] = (state.step, data.position, engine.model.weight, messages)
    assert restored[0][:2] == restored[1][:2] == (1, 10)
    assert torch.equal(restored[0][2], restored[1][2])
    assert any("step_2" in m and "damaged" in m for m in restored[0][3]), restored[0][3]
    # rank 0: step_2's first file (the next is cut short, refused on its size), then all of step_1, one scan
    assert job.reads == {0: [1 + manifest_size(tmp_path / "step_1"), 1], 1: [0, 0]}


@pytest.mark.slow
def test_two_processes_only_rank_zero_reads_the_files(tmp_path: Path) -> None:
    """The same through torchrun and gloo: rank 1 loads the fallback rank 0 chose, having read none of the files."""
    root, out = tmp_path / "checkpoints", tmp_path / "out"
    out.mkdir()
    save_two_rank_steps(root, [1, 2])
    cut_short(root / "step_2" / "model.safetensors")
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in subprocess_env().items() if k not in launcher} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [checkpoint_worker.__file__, str(root), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads((out / f"rank_{rank}.json").read_text()) for rank in (0, 1)] == [
        {"step": 1, "position": 10, "hashed": 1 + manifest_size(root / "step_1"), "scanned": 1},
        {"step": 1, "position": 10, "hashed": 0, "scanned": 0},
    ]


@pytest.mark.parametrize(("max_steps", "finished"), [(2, True), (3, False)])
def test_two_ranks_only_rank_zero_verifies_a_finished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: int, finished: bool
) -> None:
    save_two_rank_steps(tmp_path, [1, 2])
    job = TwoRanks(monkeypatch)
    states = [job.manager(tmp_path, rank, []).finished(max_steps) for rank in (0, 1)]
    assert [s.step if s else None for s in states] == ([2, 2] if finished else [None, None])
    assert job.reads == {0: [manifest_size(tmp_path / "step_2"), 1] if finished else [0, 0], 1: [0, 0]}

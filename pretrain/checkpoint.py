"""Checkpoints that are whole or absent, verified before use, pruned to the last `keep`.

Layout: `checkpoints/step_N/` holds `engine/` (Engine.save), `model.safetensors` (our names),
`trainer_state.json`, `data_fingerprint.json` (what data it read), `rank_{r}/data_state.json` + `rank_{r}/rng.json`,
and `manifest.json` (written last).
A save goes to `.tmp-step_N`, is renamed to `step_N`, and only then is `latest` replaced, so a job killed at any
moment leaves `latest` on a complete checkpoint. On resume the manifest and every pickle are checked before the
engine reads a byte; a damaged checkpoint is reported and the previous one used, and if none is intact the run
stops rather than silently starting over. In a job of N ranks rank 0 alone hashes and scans the (shared) files and
tells the others which checkpoint to load, rather than N ranks reading every byte N times.

A full disk is met before it can hurt: a save first checks the free space against the size of the previous
checkpoint, and a write that fails anyway (quota, another writer) ends, on every rank alike, in one line that
says how much was needed and how much is free; the half-written `.tmp-step_N` is removed and `latest` still names
the previous checkpoint, so the run resumes from it once space is freed.

At the world size it was saved with, each rank loads its own data position and RNG states: bitwise the
uninterrupted run. At another one (pretrain/resume.py decides the grad_accum first), the engine reshards its
state, every rank loads the merge of all saved data positions (`data.merge_states`), and the RNG states are
left as seeded: dropout is seeded per global micro-batch, so nothing else depends on them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pretrain.console import say as _say
from pretrain.errors import CheckpointError

if TYPE_CHECKING:
    from pretrain.engines.dist import DistInfo

LATEST = "latest"
FINGERPRINT_FILE = "data_fingerprint.json"  # data.data_fingerprint of the run's data when it saved
# model.safetensors' header metadata: the model's vocabulary, which its padded tables' rows do not tell
VOCAB_SIZE_KEY = "vocab_size"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_NONE = -1  # rank 0's verdict when no checkpoint qualifies


class EngineState(Protocol):
    """What a checkpoint needs of an engine (every `pretrain.engines.Engine` has it)."""

    def save(self, path: Path) -> None: ...
    def load(self, path: Path, *, saved_world_size: int | None = None) -> None: ...
    def full_state_dict(self) -> dict[str, Any] | None: ...


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(kw_only=True)
class TrainerState:
    """Loop counters saved with each checkpoint."""

    step: int = 0
    tokens: int = 0
    world_size: int = 1
    skips: int = 0


def read_trainer_state(path: Path) -> TrainerState:
    """The loop counters of checkpoint `path` (raises OSError/ValueError/TypeError when unreadable)."""
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_N)")
    return int(match.group(1))


def checkpoint_dirs(root: Path) -> list[Path]:
    """Resume candidates, best first: the one `latest` names, then the others from newest to oldest."""
    steps = sorted(
        (p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and p.is_dir()), key=step_of, reverse=True
    )
    latest_file = root / LATEST
    if latest_file.is_file():
        target = root / latest_file.read_text().strip()
        if target in steps:
            steps.remove(target)
            steps.insert(0, target)
    return steps


def dangling_latest(root: Path) -> str | None:
    """The warning to give when `latest` names a checkpoint that is not there (else None)."""
    latest_file = root / LATEST
    if not latest_file.is_file():
        return None
    name = latest_file.read_text().strip()
    if (root / name).is_dir():
        return None
    return (
        f"warning: {latest_file} names {name or 'nothing'}, which does not exist; "
        "falling back to the newest intact checkpoint"
    )


def verify(path: Path) -> str | None:
    """None if `path` is complete and safe to load, else what is wrong with it (manifest, pickles)."""
    from pretrain import safety

    try:
        safety.verify_manifest(path)
        safety.check_pickles_under(path)
    except (safety.CorruptCheckpointError, safety.UnsafeCheckpointError, OSError, ValueError) as e:
        return " ".join(str(e).split())
    return None


def find_checkpoint(root: Path, step: int | None = None, *, say: Callable[[str], None] = _say) -> Path:
    """The checkpoint to read (the newest intact one, or exactly `step`), verified."""
    candidates = checkpoint_dirs(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint under {root}; train first (pretrain train CONFIG)")
    if step is None and (warning := dangling_latest(root)):
        say(warning)
    if step is not None:
        wanted = root / f"step_{step}"
        if wanted not in candidates:
            have = ", ".join(str(step_of(p)) for p in sorted(candidates, key=step_of))
            raise CheckpointError(f"no checkpoint for step {step} under {root}; available steps: {have}")
        candidates = [wanted]
    path = first_intact(candidates, say)
    if path is None:
        raise CheckpointError(
            f"no intact checkpoint under {root} (tried {', '.join(p.name for p in candidates)})"
        )
    return path


def first_intact(candidates: list[Path], say: Callable[[str], None]) -> Path | None:
    """The first candidate that verifies, saying what is wrong with each damaged one before it."""
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        say(f"warning: checkpoint {path} is damaged ({problem}); trying the previous one")
    return None


def _step_or_none(path: Path | None) -> int:
    return _NONE if path is None else step_of(path)


def _unshared(weights: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory (tied embeddings): give repeats their own copy."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's tensor shapes by name and its metadata, from its header (no tensor is read).
    CheckpointError (one line) when the file is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = f.keys()  # a safe_open handle is not iterable
            return {name: tuple(f.get_slice(name).get_shape()) for name in names}, f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})", path=path) from None


def state_dict_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of `model`'s state dict by name (a meta-device build will do): what `check_fits` compares."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


RESUME_FIX = "resume with the model fields the run started with (its config.yaml)"


def check_fits(weights: Path, shapes: dict[str, tuple[int, ...]], *, fix: str) -> None:
    """Refuse, in one line ending in `fix`, a checkpoint's `model.safetensors` whose tensors are not the model's
    (`shapes`: its state dict's, by name), read from the header alone: a model config other than the one
    that wrote it."""
    saved, _ = safetensors_header(weights)
    for name in sorted(saved.keys() | shapes.keys()):
        ours, theirs = shapes.get(name), saved.get(name)
        if ours == theirs:
            continue
        if ours is None or theirs is None:
            where = "the checkpoint" if ours is None else "this run's model"
            what = f"{name} is only in {where}"
        else:
            what = f"{name} is {theirs} there and {ours} in this run's model"
            if name.endswith("tokens.weight") and ours[1:] == theirs[1:]:
                what += " (another vocabulary or its padding: model.vocab_size, model.vocab_multiple)"
        raise CheckpointError(f"{weights.parent} does not fit this run's model: {what}; {fix}", path=weights)


def _alone(value: int) -> int:
    return value


def _itself(flag: bool) -> bool:
    return flag


_MB = 1024 * 1024
_SPACE_MARGIN = 1.05  # the next checkpoint may be a little larger than the last (metadata, RNG state)


def dir_bytes(path: Path) -> int:
    """Bytes in the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _disk_full(error: BaseException) -> bool:
    """The write failed for want of space: ENOSPC/EDQUOT, or a library's wrapping of it (safetensors, DCP, and
    torch.save's `unexpected pos` when a write comes up short)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(marker in text for marker in ("No space left", "Disk quota exceeded", "unexpected pos"))


def _noop() -> None:
    return None


class CheckpointManager:
    """Saves and restores the whole training state under `root` (collective on every rank).

    `barrier` and `broadcast` (rank 0's int on every rank) are the job's collectives; the defaults serve one
    process."""

    def __init__(
        self,
        root: Path,
        *,
        keep: int,
        dist: DistInfo,
        barrier: Callable[[], None] = _noop,
        broadcast: Callable[[int], int] = _alone,
        any_rank: Callable[[bool], bool] = _itself,
        say: Callable[[str], None] = _say,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.fingerprint = fingerprint  # the data's (data.data_fingerprint), recorded in each checkpoint
        # Set by the run once its model is known: the model's vocabulary, recorded in each model.safetensors
        # (`VOCAB_SIZE_KEY`), and its state dict's shapes, which a checkpoint must have to be restored.
        self.vocab_size: int | None = None
        self.model_shapes: dict[str, tuple[int, ...]] | None = None
        self.keep = keep
        self.dist = dist
        self._barrier = barrier
        self._broadcast = broadcast
        self._any_rank = any_rank
        self._say = say
        self._last_bytes: int | None = None  # the size of the newest checkpoint, once known

    # ------------------------------------------------------------------------------------------- save

    def save(self, *, engine: EngineState, state: TrainerState, data: Stateful) -> Path:
        """Write step `state.step`; `latest` points at it only once every file and the manifest are on disk.

        Each phase ends in an agreement (`any_rank`) instead of a plain barrier, so a rank whose write failed
        stops every rank with the same one-line CheckpointError rather than leaving them waiting."""
        tmp = self.root / f".tmp-step_{state.step}"
        final = self.root / f"step_{state.step}"
        self._check_space(final)
        self._phase(final, tmp, self._make_tmp, tmp)
        self._phase(final, tmp, self._write_files, tmp, engine=engine, state=state, data=data)
        self._phase(final, tmp, self._publish, tmp, final)
        return final

    def _make_tmp(self, tmp: Path) -> None:
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "engine").mkdir(parents=True)

    def _write_files(self, tmp: Path, *, engine: EngineState, state: TrainerState, data: Stateful) -> None:
        from safetensors.torch import save_file

        from pretrain.rng import rng_state

        engine.save(tmp / "engine")
        weights = engine.full_state_dict()
        rank_dir = tmp / f"rank_{self.dist.rank}"
        rank_dir.mkdir(exist_ok=True)
        _write_json(rank_dir / "data_state.json", data.state_dict())
        _write_json(rank_dir / "rng.json", rng_state())
        if self.dist.is_main:
            assert weights is not None, "Engine.full_state_dict returns the weights on rank 0"
            metadata = None if self.vocab_size is None else {VOCAB_SIZE_KEY: str(self.vocab_size)}
            save_file(_unshared(weights), str(tmp / "model.safetensors"), metadata=metadata)
            _write_json(tmp / "trainer_state.json", dataclasses.asdict(state))
            if self.fingerprint is not None:
                _write_json(tmp / FINGERPRINT_FILE, self.fingerprint)

    def _publish(self, tmp: Path, final: Path) -> None:
        from pretrain.safety import write_manifest

        if self.dist.is_main:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._point_latest_at(final)
            self._last_bytes = dir_bytes(final)
            self._prune(final)

    def _phase(self, final: Path, tmp: Path, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run one phase of a save on every rank, then agree whether any rank failed (collective)."""
        error: Exception | None = None
        try:
            write(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised on every rank
            error = e
        if not self._any_rank(error is not None):
            return
        written = dir_bytes(tmp) if self.dist.is_main and tmp.is_dir() else 0
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None and not _disk_full(error):
            raise error
        if error is None:
            raise CheckpointError(
                f"writing {final.name} failed on another rank (its error says why)", path=final
            )
        needs = (
            f"~{self._last_bytes / _MB:.1f} MB" if self._last_bytes else f"more than {written / _MB:.1f} MB"
        )
        raise CheckpointError(self._no_space(final, needs), path=final) from error

    def _check_space(self, final: Path) -> None:
        """Refuse (on every rank alike) a save that cannot fit: free space against the last checkpoint's size."""
        short = 0
        if self.dist.is_main:
            if self._last_bytes is None:
                newest = next(iter(checkpoint_dirs(self.root)), None) if self.root.is_dir() else None
                self._last_bytes = dir_bytes(newest) if newest is not None else None
            self.root.mkdir(parents=True, exist_ok=True)
            short = int(bool(self._last_bytes) and free_bytes(self.root) < self._last_bytes * _SPACE_MARGIN)
        if self._broadcast(short):
            needs = f"~{(self._last_bytes or 0) / _MB:.1f} MB"
            raise CheckpointError(
                self._no_space(final, needs) if self.dist.is_main else "no space", path=final
            )

    def _no_space(self, final: Path, needs: str) -> str:
        latest = self.root / LATEST
        previous = latest.read_text().strip() if latest.is_file() else None
        kept = f"{previous} is intact" if previous else "no checkpoint was written yet"
        return (
            f"no space left on device writing {self.root.name}/{final.name} in {self.root.parent} (needs {needs}, "
            f"{free_bytes(self.root) / _MB:.1f} MB free); {kept}: free space, then run the same command again "
            "to resume"
        )

    def _point_latest_at(self, final: Path) -> None:
        tmp = self.root / f".{LATEST}.tmp"
        with open(tmp, "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _prune(self, current: Path) -> None:
        """Keep the newest `keep` checkpoints; drop leftovers of saves that died midway."""
        steps = sorted(
            (p for p in self.root.glob("step_*") if _STEP_DIR.match(p.name)), key=step_of, reverse=True
        )
        for old in steps[self.keep :]:
            if old != current:
                shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob(".tmp-step_*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- restore

    def restore(self, *, engine: EngineState, data: Stateful) -> TrainerState | None:
        """Load the newest intact checkpoint into `engine`, `data` and the RNGs; None when there is none yet."""
        candidates = checkpoint_dirs(self.root) if self.root.is_dir() else []
        if self.root.is_dir() and (warning := dangling_latest(self.root)):
            self._say(warning)
        if not candidates:
            return None
        step = self._from_main(lambda: _step_or_none(first_intact(candidates, self._say)))
        if step == _NONE:
            raise CheckpointError(
                f"no intact checkpoint under {self.root} (tried {', '.join(p.name for p in candidates)}); "
                "refusing to start over: repair it or move the run directory away to start fresh"
            )
        path = self.root / f"step_{step}"
        state = self._load(path, engine=engine, data=data)
        if path != candidates[0]:
            self._say(f"resumed from {path.name}, the newest intact checkpoint")
        return state

    def finished(self, max_steps: int) -> TrainerState | None:
        """The state `latest` points at, if it reached `max_steps` and is intact; else None (the full resume
        path then reports a damaged one and falls back)."""
        step = self._from_main(lambda: self._finished_step(max_steps))
        return None if step == _NONE else read_trainer_state(self.root / f"step_{step}")

    def _finished_step(self, max_steps: int) -> int:
        latest = self.root / LATEST
        if not latest.is_file():
            return _NONE
        path = self.root / latest.read_text().strip()
        try:
            step, state = step_of(path), read_trainer_state(path)
        except (OSError, ValueError, TypeError):
            return _NONE  # damaged: the full resume path reports it
        return step if state.step >= max_steps and verify(path) is None else _NONE

    def _from_main(self, decide: Callable[[], int]) -> int:
        """Rank 0 runs `decide` (which reads and hashes the files) and every rank gets its answer."""
        return self._broadcast(decide() if self.dist.is_main else _NONE)

    def _load(self, path: Path, *, engine: EngineState, data: Stateful) -> TrainerState:
        """The checkpoint's state, loaded; at another world size resharded (see the module docstring)."""
        from pretrain.rng import set_rng_state

        state = read_trainer_state(path)
        if self.model_shapes is not None:
            check_fits(path / "model.safetensors", self.model_shapes, fix=RESUME_FIX)
        if state.world_size == self.dist.world_size:
            rank_dir = path / f"rank_{self.dist.rank}"
            engine.load(path / "engine")
            data.load_state_dict(json.loads((rank_dir / "data_state.json").read_text()))
            set_rng_state(json.loads((rank_dir / "rng.json").read_text()))
            return state
        import data as data_pipeline

        engine.load(path / "engine", saved_world_size=state.world_size)
        states = [
            json.loads((path / f"rank_{r}" / "data_state.json").read_text()) for r in range(state.world_size)
        ]
        try:
            data.load_state_dict(data_pipeline.merge_states(states))
        except data_pipeline.DataError as e:
            raise CheckpointError(f"cannot resume {path} at world size {self.dist.world_size}: {e}") from None
        return state

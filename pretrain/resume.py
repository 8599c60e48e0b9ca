"""Whether and how this job can resume the run directory's checkpoint, decided before anything is built.

A checkpoint resumes at any world size that keeps its global batch (`micro_batch x world x grad_accum`): the
data order depends only on the global micro-batch number (data/layout.py), the engines reshard weights and
optimizer state by name, and dropout is seeded per global micro-batch (`engines.base.dropout_seed`), so the
continued run sees the same batches and, up to floating-point reduction order, the same losses. What cannot
be kept is refused in one line naming values that work: a world size that does not divide the global batch,
another micro-batch size, or data that changed since the checkpoint (`data.allow_changed=true` resumes anyway,
with a warning). `pretrain check` (which `launch` runs on the login node) asks the same question, so `launch`
refuses an impossible resume before torchrun or sbatch start.

Torch-free: only JSON files of the checkpoint are read (and hashed, when `verify`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pretrain import checkpoint
from pretrain.checkpoint import FINGERPRINT_FILE
from pretrain.config import RunConfig
from pretrain.errors import CheckpointError


@dataclass(frozen=True, kw_only=True)
class ResumePlan:
    """The checkpoint a job will resume, and the grad_accum that keeps its global batch at this world size."""

    path: Path
    step: int
    saved_world_size: int
    saved_grad_accum: int
    world_size: int
    grad_accum: int
    data_warning: str | None = None  # the data changed and data.allow_changed=true: say so

    def apply(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with train.grad_accum set to the one that keeps the checkpoint's global batch."""
        if cfg.train.grad_accum == self.grad_accum:
            return cfg
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=self.grad_accum))

    def note(self) -> str | None:
        """The line that says what changed, when the layout did (None at the saved world size and batch)."""
        if (self.world_size, self.grad_accum) == (self.saved_world_size, self.saved_grad_accum):
            return None
        return (
            f"resuming at step {self.step} at world size {self.world_size} (was {self.saved_world_size}), "
            f"train.grad_accum {self.saved_grad_accum} -> {self.grad_accum}: the same global batch, "
            "the same data"
        )


def plan_resume(
    cfg: RunConfig, world_size: int, *, verify: bool = False, say: Callable[[str], None] | None = None
) -> ResumePlan | None:
    """The plan for resuming `cfg.run_dir`'s newest checkpoint with `world_size` processes; None when there
    is no checkpoint yet. A one-line CheckpointError when it cannot be resumed.

    `verify`: hash the checkpoint against its manifest first and fall back past damaged ones, as the resume
    itself will (`pretrain check`); otherwise the newest readable one is planned for and the resume verifies."""
    root = cfg.run_dir / "checkpoints"
    if not root.is_dir() or not any(root.glob("step_*")):
        return None
    candidates = checkpoint.checkpoint_dirs(root)
    if verify:
        intact = checkpoint.first_intact(candidates, say or (lambda message: None))
        if intact is None:
            raise CheckpointError(
                f"no intact checkpoint under {root} (tried {', '.join(p.name for p in candidates)}); "
                "repair it or move the run directory away to start fresh",
                path=root,
            )
        candidates = [intact]
    for path in candidates:
        try:
            state = checkpoint.read_trainer_state(path)
            data_state = json.loads((path / "rank_0" / "data_state.json").read_text())
        except (OSError, ValueError, TypeError):
            continue  # damaged: the resume reports it and falls back
        return _plan(cfg, path, state.step, state.world_size, data_state, world_size)
    return None


def _plan(
    cfg: RunConfig, path: Path, step: int, saved_world_size: int, data_state: dict, world_size: int
) -> ResumePlan:
    import data
    from data.layout import layout_of

    try:
        grad_accum = data.plan_resume(
            data_state,
            world_size=world_size,
            num_workers=cfg.data.num_workers,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        warning = _check_fingerprint(path, cfg)
        saved_grad_accum = layout_of(data_state).grad_accum
    except data.DataError as e:
        raise CheckpointError(f"{path}: {e}", path=path) from None
    return ResumePlan(
        path=path,
        step=step,
        saved_world_size=saved_world_size,
        saved_grad_accum=saved_grad_accum,
        world_size=world_size,
        grad_accum=grad_accum,
        data_warning=warning,
    )


def _check_fingerprint(path: Path, cfg: RunConfig) -> str | None:
    """The data check of `data.check_fingerprint` against what the checkpoint recorded (if it did)."""
    import data

    file = path / FINGERPRINT_FILE
    if not file.is_file():
        return None  # written before checkpoints recorded their data
    return data.check_fingerprint(json.loads(file.read_text()), cfg.data, cfg.modality)

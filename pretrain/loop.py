"""The training loop, as short functions: set up, step, evaluate, log, save, resume.

Everything random is seeded from `train.seed` and every piece of state a step depends on (weights, optimizer,
schedule, data position, each rank's RNGs) is in the checkpoint, so a run resumed from step k repeats exactly
what an uninterrupted run does after step k. The loop checks for preemption only at step boundaries, where all
ranks agree, and saves before it stops.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from torch import Tensor

from pretrain import components
from pretrain.checkpoint import CheckpointManager, TrainerState, checkpoint_dirs, state_dict_shapes
from pretrain.config import RunConfig
from pretrain.console import say as _say
from pretrain.engines import (
    DistInfo,
    Engine,
    StepOutput,
    any_rank,
    barrier,
    broadcast_int,
    build_engine,
    init_distributed,
    shutdown,
)
from pretrain.engines.base import dropout_seed
from pretrain.errors import ConfigError, Interrupted
from pretrain.faults import DivergenceGuard, PreemptionHandler
from pretrain.logging import RunLogger, note_resume
from pretrain.metrics import Throughput, memory_gib, peak_flops
from pretrain.rng import seed_everything
from pretrain.runlock import RunLock, RunLockedError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from data import DataPipeline
    from models.base import LanguageModel
    from models.config import ModelConfig

Batch = dict[str, Tensor]


@dataclass(kw_only=True)
class Run:
    """Everything one training run holds while it trains."""

    cfg: RunConfig
    dist: DistInfo
    engine: Engine
    data: DataPipeline
    batches: Iterator[Batch]
    checkpoints: CheckpointManager
    logger: RunLogger
    guard: DivergenceGuard
    preemption: PreemptionHandler
    throughput: Throughput
    tokenizer: PreTrainedTokenizerFast | None  # None for image and speech models
    state: TrainerState
    last_saved: int = -1
    val_batches: list[Batch] = field(default_factory=list)


def train(cfg: RunConfig, *, wait_lock_s: float = 0.0) -> TrainerState:
    """`pretrain train`: train (or resume, or notice it is done) the run `cfg` describes.

    Rank 0 holds the run directory's lock from before anything in it changes until the end (`wait_lock_s`:
    how long to wait for another trainer to let go)."""
    dist = init_distributed(timeout_s=cfg.engine.dist_timeout_s)
    if dist.is_main:
        for warning in cfg.warnings():
            _say(f"warning: {warning}")
    finished = finished_state(cfg, dist)
    if finished is not None:  # nothing to do: do not pay for a tokenizer, a model and an engine
        if dist.is_main:
            _say(
                f"{cfg.run_dir}: already trained to step {finished.step} (train.max_steps={cfg.train.max_steps})"
            )
        shutdown()
        return finished
    try:
        lock = take_run_lock(cfg, dist, wait_s=wait_lock_s)
    except BaseException:
        shutdown()
        raise
    preemption = PreemptionHandler().install()
    try:
        run = setup(cfg, dist, preemption)
        try:
            return run_loop(run)
        finally:
            run.logger.close()
    finally:
        preemption.uninstall()
        lock.release()
        shutdown()


def take_run_lock(cfg: RunConfig, dist: DistInfo, *, wait_s: float) -> RunLock:
    """Rank 0 takes RUN_DIR/.lock (collective): every rank refuses alike when another trainer holds it."""
    lock = RunLock(cfg.run_dir)
    refusal: RunLockedError | None = None
    if dist.is_main:
        try:
            lock.acquire(wait_s=wait_s)
        except RunLockedError as e:
            refusal = e
    if broadcast_int(int(refusal is not None)):
        raise refusal or RunLockedError(f"run directory {cfg.run_dir} is in use by another trainer")
    return lock


def finished_state(cfg: RunConfig, dist: DistInfo | None = None) -> TrainerState | None:
    """The state `latest` points at, if it already reached train.max_steps and is intact (collective)."""
    return checkpoint_manager(cfg, dist or DistInfo()).finished(cfg.train.max_steps)


def checkpoint_manager(cfg: RunConfig, dist: DistInfo) -> CheckpointManager:
    """The run's checkpoints, with the job's collectives (rank 0 alone verifies, the others follow)."""
    return CheckpointManager(
        cfg.run_dir / "checkpoints",
        keep=cfg.checkpoint.keep,
        dist=dist,
        barrier=barrier,
        broadcast=broadcast_int,
        any_rank=any_rank,
        say=_say if dist.is_main else _quiet,
    )


def setup(cfg: RunConfig, dist: DistInfo, preemption: PreemptionHandler) -> Run:
    """Tokenizer, model, engine, data; then restore the newest intact checkpoint, if any, and only then (once
    nothing can refuse the start any more) record the config in the run directory."""
    import data

    checkpoints = checkpoint_manager(cfg, dist)
    cfg = _plan_resume(cfg, dist)  # before paying for a tokenizer, a model and an engine
    if dist.is_main:
        checkpoints.fingerprint = data.data_fingerprint(cfg.data, cfg.modality)
    tokenizer = _tokenizer(cfg, dist)
    seed_everything(cfg.train.seed)
    fresh = not checkpoint_dirs(checkpoints.root)  # a resume restores its own weights, not init_from's
    recipe = components.model_recipe(cfg, tokenizer, init_from=fresh)
    meta = components.meta_model(recipe.config)
    # Recorded in each checkpoint (padded tables do not tell it: model.init_from reads it), and the shapes a
    # checkpoint must have to be restored.
    checkpoints.vocab_size = recipe.config.vocab_size
    checkpoints.model_shapes = state_dict_shapes(meta)
    flops_per_token = objective_flops_per_token(meta, cfg)
    if recipe.weights is not None and dist.is_main:
        for note in recipe.weights.notes:
            _say(f"note: {note}")
    engine = build_engine(cfg.engine_spec, recipe, dist)  # ZeRO-3/FSDP: built sharded, never whole
    seed_everything(cfg.train.seed + dist.rank)  # per-rank streams (dropout is reseeded per micro-batch)
    pipeline = build_pipeline(cfg, tokenizer, recipe.config, dist, grad_accum=cfg.train.grad_accum)
    state = checkpoints.restore(engine=engine, data=pipeline) or TrainerState(world_size=dist.world_size)
    state.world_size = dist.world_size  # what the next checkpoint is written with
    prepare_run_dir(cfg, dist)  # after every check that can refuse: a refused start changes nothing here
    guard = DivergenceGuard(cfg.train.max_skips, skips=state.skips)
    peak = peak_flops(dist.device, cfg.train.precision, cfg.log.peak_flops)
    return Run(
        cfg=cfg,
        dist=dist,
        engine=engine,
        data=pipeline,
        batches=_start(pipeline),
        checkpoints=checkpoints,
        logger=RunLogger(cfg, enabled=dist.is_main, start_step=state.step),
        guard=guard,
        preemption=preemption,
        throughput=Throughput(
            flops_per_token=flops_per_token,
            peak_flops_total=peak * dist.world_size if peak else None,
        ),
        tokenizer=tokenizer,
        state=state,
        last_saved=state.step,
    )


def build_pipeline(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerFast | None,
    model: ModelConfig,
    dist: DistInfo,
    *,
    grad_accum: int = 1,
    split: Literal["train", "validation"] = "train",
) -> DataPipeline:
    """This rank's batches: text through `data.build_loader`, images and audio through `data.build_media_loader`
    (same sharding, workers and resumable state; the model's config gives image size, patches, sample rate)."""
    import data

    common = dict(
        batch_size=cfg.train.micro_batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.train.seed,
        split=split,
        grad_accum=grad_accum,
    )
    if cfg.modality is None:
        return data.build_loader(cfg.data, objective=cfg.objective, tokenizer=tokenizer, **common)
    from data.media_loader import media_options

    options = media_options(cfg.data, cfg.objective, model)
    return data.build_media_loader(cfg.data, objective=cfg.objective, model=model, options=options, **common)


def batch_units(batch: Batch) -> int:
    """Tokens (text), patches (images) or frames (speech) in one micro-batch: what tokens/s counts."""
    for key in ("input_ids", "noise", "bool_masked_pos", "mask_time_indices"):
        if key in batch:
            return batch[key].numel()
    raise KeyError(f"a batch with none of the counted inputs: {sorted(batch)}")


def _plan_resume(cfg: RunConfig, dist: DistInfo) -> RunConfig:
    """`cfg` with the grad_accum that keeps the checkpoint's global batch at this world size (every rank
    decides alike from the same files); rank 0 says what changed. Refuses in one line what cannot resume."""
    from pretrain.resume import plan_resume

    plan = plan_resume(cfg, dist.world_size)
    if plan is None:
        return cfg
    if dist.is_main:
        for line in (plan.data_warning, plan.note()):
            if line:
                _say(line)
    return plan.apply(cfg)


def objective_flops_per_token(model: LanguageModel, cfg: RunConfig) -> float:
    """Training FLOPs per input token as the objective runs the model (for MFU): BERT's head only at the
    masked share of positions (data.mlm_probability; a hair high, as special tokens are never masked),
    T5's decoder and head over the span targets, whose length the data config fixes. Image models: per
    patch; speech: per frame of a clip (what tokens/s counts for them)."""
    from data.objectives import compute_input_and_target_lengths
    from models.base import SampleShape

    d = cfg.data
    if cfg.modality is not None:
        return model.flops_per_token(SampleShape(cfg.sample_len))
    if cfg.objective == "mlm":
        return model.flops_per_token(SampleShape(d.seq_len, predicted_fraction=d.mlm_probability))
    if cfg.objective == "span":
        _, targets = compute_input_and_target_lengths(d.seq_len, d.noise_density, d.mean_noise_span_length)
        return model.flops_per_token(SampleShape(d.seq_len, target_len=targets))
    return model.flops_per_token(SampleShape(d.seq_len))


def _start(pipeline: Iterable[Batch]) -> Iterator[Batch]:
    """Start the loader without touching the global RNG (it draws a worker seed from it on the first batch),
    so the dropout stream is the same whether the run started at step 0 or resumed mid-way."""
    with torch.random.fork_rng(devices=[]):
        batches = iter(pipeline)
        first = next(batches)
    return itertools.chain([first], batches)


def _quiet(message: str) -> None:
    return None


def prepare_run_dir(cfg: RunConfig, dist: DistInfo) -> None:
    """Create the run directory and save the resolved config (noting what changed since the last use)."""
    if dist.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        path = cfg.run_dir / "config.yaml"
        new = cfg.to_dict()
        if path.is_file():
            changed = _changed_keys(yaml.safe_load(path.read_text()) or {}, new)
            if changed:
                _say(f"note: config changed since {path} was written: {', '.join(changed)}")
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(cfg.to_yaml())
        tmp.replace(path)
    barrier()


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def _tokenizer(cfg: RunConfig, dist: DistInfo) -> PreTrainedTokenizerFast | None:
    """Rank 0 trains/saves the tokenizer first; the others then load the saved one. Image and speech models
    have none."""
    if cfg.modality is not None:
        return None
    family = cfg.model.family
    tokenizer, error = None, None
    if dist.is_main:
        try:
            tokenizer = components.build_tokenizer(cfg.data, family, cfg.run_dir)
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised on rank 0
            error = e
    if any_rank(error is not None):  # instead of a barrier: the others stop too, and rank 0 alone says why
        if error is not None:
            raise error
        raise ConfigError("rank 0 could not make the tokenizer (its error says why)")
    return tokenizer or components.build_tokenizer(cfg.data, family, cfg.run_dir)


def run_loop(run: Run) -> TrainerState:
    """Step until `train.max_steps` (or a preemption signal), evaluating, logging and saving on schedule."""
    cfg, state = run.cfg, run.state
    if state.step >= cfg.train.max_steps:
        run.logger.note(
            f"{cfg.run_dir}: already trained to step {state.step} (train.max_steps={cfg.train.max_steps})"
        )
        if cfg.train.max_steps == 0:  # a fresh run asked for 0 steps: its starting weights as a checkpoint
            save(run)
        return state
    verb = f"resuming at step {state.step}" if state.step else "starting"
    if state.step and run.dist.is_main:
        note_resume(cfg.run_dir, state.step)
    run.logger.note(f"{cfg.run_dir}: {verb}, training to step {cfg.train.max_steps}")
    while state.step < cfg.train.max_steps:
        if run.preemption.should_stop(any_rank):
            return stop_for_preemption(run)
        out = train_step(run)
        val_loss = evaluate(run) if _due(state.step, cfg.train.eval_every, cfg.train.max_steps) else None
        if val_loss is not None and cfg.eval.samples:
            run.logger.samples(state.step, eval_samples(run))
        if val_loss is not None or _due(state.step, cfg.log.every, cfg.train.max_steps):
            run.logger.log(metrics_record(run, out, val_loss))
        if _due(state.step, cfg.checkpoint.every, cfg.train.max_steps):
            save(run)
    unit = {None: "tokens", "image": "patches", "audio": "frames"}[cfg.modality]
    run.logger.note(
        f"done: step {state.step}, {state.tokens:,} {unit}; checkpoints in {run.checkpoints.root}"
    )
    return state


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def train_step(run: Run) -> StepOutput:
    """One optimizer step over `grad_accum` micro-batches; counts tokens and feeds the divergence guard."""
    start = time.perf_counter()
    grad_accum = run.cfg.train.grad_accum
    micro = [next(run.batches) for _ in range(grad_accum)]
    # the data's global micro-batch numbers (data/layout.py): dropout follows the micro-batch, not the rank
    first = (run.state.step * run.dist.world_size + run.dist.rank) * grad_accum
    seeds = [dropout_seed(run.cfg.train.seed, first + a) for a in range(grad_accum)]
    out = run.engine.train_step(micro, seeds=seeds)
    tokens = sum(batch_units(batch) for batch in micro) * run.dist.world_size
    run.throughput.add(tokens, time.perf_counter() - start)
    run.state.step += 1
    run.state.tokens += tokens
    run.guard.observe(out, step=run.state.step)
    run.state.skips = run.guard.skips
    return out


def evaluate(run: Run) -> float:
    """Mean validation loss over the same `train.eval_batches` batches every time (all ranks, in step)."""
    if not run.val_batches:
        with torch.random.fork_rng(devices=[]):  # as in _start: loading must not shift the dropout stream
            run.val_batches = _validation_batches(run)
    losses = [run.engine.eval_loss(batch) for batch in run.val_batches]
    return sum(losses) / len(losses)


def _validation_batches(run: Run) -> list[Batch]:
    """The first eval_batches validation batches, repeated if the split is shorter, so every rank runs as many."""
    cfg = run.cfg
    pipeline = build_pipeline(cfg, run.tokenizer, run.engine.model.config, run.dist, split="validation")
    batches = list(itertools.islice(pipeline, cfg.train.eval_batches))
    if not batches:
        raise ConfigError(
            "data: the validation split is empty; set data.validation_source or train.eval_every=0"
        )
    return list(itertools.islice(itertools.cycle(batches), cfg.train.eval_batches))


def eval_samples(run: Run) -> list[tuple[str, str]]:
    """(prompt, output) for each `eval.samples` prompt, greedy (no RNG drawn: resume stays exact); every rank
    runs the same forwards, so sharded engines gather their parameters alike."""
    from pretrain.sample import generate

    cfg = run.cfg
    return [
        (
            prompt,
            generate(
                run.engine.model,
                run.tokenizer,
                cfg.model.family,
                prompt,
                max_new_tokens=cfg.eval.max_new_tokens,
                forward=run.engine.forward_module,
                device=run.dist.device,
            ),
        )
        for prompt in cfg.eval.samples
    ]


def metrics_record(run: Run, out: StepOutput, val_loss: float | None) -> dict[str, Any]:
    """One metrics.jsonl line: the contract's keys plus MFU, memory and skip counts."""
    tokens_per_s, mfu = run.throughput.rate()
    record: dict[str, Any] = {
        "step": run.state.step,
        "loss": out.loss,
        "lr": out.lr,
        "tokens": run.state.tokens,
        "tokens_per_s": round(tokens_per_s, 2),
        "grad_norm": out.grad_norm,
        "mfu": round(mfu, 6) if mfu is not None else None,
        "memory_gib": round(memory_gib(run.dist.device), 4),
        "skipped": out.skipped,
        "skips": run.state.skips,
    }
    if val_loss is not None:
        record["val_loss"] = val_loss
    return record


def save(run: Run) -> Path:
    """Checkpoint the current step (collective)."""
    path = run.checkpoints.save(engine=run.engine, state=run.state, data=run.data)
    run.last_saved = run.state.step
    return path


def stop_for_preemption(run: Run) -> TrainerState:
    """Save (unless this step is saved already), requeue the SLURM job if asked, and return; after Ctrl-C,
    raise `Interrupted` (exit code 130) instead, with the same checkpoint written."""
    if run.last_saved != run.state.step:
        save(run)
    step = run.state.step
    if run.preemption.interrupt_agreed:
        saved = "checkpoint saved" if step else "nothing trained yet"
        raise Interrupted(f"interrupted at step {step}; {saved}: run the same command again to resume")
    run.logger.note(f"stopped by signal at step {step}; checkpoint saved, run again to resume")
    if run.dist.is_main:
        run.preemption.requeue()
    return run.state

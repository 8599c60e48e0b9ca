"""`pretrain plan`: what one GPU holds under each engine, and the largest micro-batch that fits.

Model states follow the ZeRO paper (Rajbhandari et al.) per parameter, with what our engines actually keep:
- DDP and FSDP (PyTorch's own step): fp32 params 4, grads 4, AdamW moments 8 bytes; bf16 is autocast / a
  mixed-precision policy over the fp32 params. FSDP shards all three (like ZeRO-3).
- DeepSpeed: params and grads in the run's dtype (2 bytes in bf16/fp16, 4 in fp32), plus its own fp32
  partition of the params (kept even in fp32) and the moments; stage 1 shards those two, stage 3 also the
  params and grads. Stage 2 shards the grads on paper, but DeepSpeed keeps every parameter's full-size
  .grad until the step, so its peak holds them whole, as stage 1's does (measured, bench/NOTES.md).
  `zero3-offload` keeps params, grads and optimizer on the host. ZeRO-3 holds its gradient partition only
  from a step's first gradient reduce to the end of its optimizer step (pretrain/engines/deepspeed.py
  `_GradientPartitions`), so its top is either the start of backward or the optimizer step (`peak`).
This is DeepSpeed's `estimate_zero3_model_states_mem_needs` arithmetic; transient buffers are listed apart
(communication buckets sized as pretrain/engines/ds_config.py fills them; the fp32 copy of the rank's
gradient partition DeepSpeed flattens inside its step, ZeRO-3's counted at its step; the parameters a sharded engine gathers: FSDP's
and ZeRO-3's block in use and their root unit, the embedding, with its full gradient), as are
activations (per block, the tensors autograd keeps, counted for a pre-norm block as torchtitan's estimator
does, plus the fp32 logits and their log-softmax) with and without gradient checkpointing.
The per-process overhead of a GPU (CUDA context, NCCL, allocator slack) is a flat `OVERHEAD_GIB`.
Image and speech models are counted the same way over their patches or frames, which makes their activations
approximate: every block at the first stage's width and the full patch grid (MAE's encoder sees a quarter of
the patches, Swin's later stages are narrower in tokens), no pixel-output tensors, and no convolutional
feature encoder (speech: its first layers run at the audio rate and can add a fifth or more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.config import ModelConfig

if TYPE_CHECKING:
    from pretrain.config import RunConfig

GIB = 2**30
OVERHEAD_GIB = 1.5  # CUDA context + NCCL + allocator fragmentation, per process
ENGINES = ("ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp")
# Least communication first; gradient checkpointing (a third more compute) before offload (host transfers).
PREFERENCE = (
    *((name, False) for name in ("ddp", "zero1", "zero2", "fsdp", "zero3")),
    *((name, True) for name in ("ddp", "zero1", "zero2", "fsdp", "zero3")),
    ("zero3-offload", False),
    ("zero3-offload", True),
)


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the arithmetic needs from a model: its parameter counts and widths (from a meta-device build)."""

    params: int
    largest_block_params: int  # one transformer block: FSDP gathers it whole
    root_params: int  # outside the blocks (embeddings, final norm, head): FSDP's root unit
    config: ModelConfig

    @classmethod
    def of(cls, config: ModelConfig) -> ModelShape:
        from pretrain.components import meta_model

        model = meta_model(config)
        blocks = model.transformer_blocks()
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        return cls(
            params=model.num_parameters(),
            largest_block_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
            root_params=sum(p.numel() for p in model.parameters() if id(p) not in in_blocks),
            config=config,
        )


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Bytes per GPU that live for the whole run (host: what offload moves to CPU memory)."""

    params: float
    grads: float
    optimizer: float  # fp32 master partition (DeepSpeed) + AdamW's two moments
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states(engine: str, n: int, world: int, precision: str) -> ModelStates:
    """The ZeRO-paper bytes per GPU of `engine` for `n` parameters at `world` GPUs."""
    if engine in ("ddp", "fsdp"):
        shard = world if engine == "fsdp" else 1
        return ModelStates(params=4 * n / shard, grads=4 * n / shard, optimizer=8 * n / shard)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; accepted: {', '.join(ENGINES)}")
    stage = int(engine[4])
    width = 4 if precision == "fp32" else 2
    # fp32 ZeRO-3 steps its parameter partitions themselves (pretrain/engines/deepspeed.py
    # `_share_master_partitions`); every other case keeps an fp32 master partition beside them.
    master = 0 if engine == "zero3" and precision == "fp32" else 4
    states = ModelStates(
        params=width * n / (world if stage >= 3 else 1),
        grads=width * n / (world if stage >= 3 else 1),
        optimizer=(master + 8) * n / world,  # fp32 partition + moments (stage >= 1 shards both)
    )
    if engine == "zero3-offload":
        return ModelStates(params=0.0, grads=0.0, optimizer=0.0, host=states.total)
    return states


def flat_gradient(engine: str, n: int, world: int) -> float:
    """The fp32 copy of the rank's gradient partition that DeepSpeed's step flattens and hands to AdamW (offload:
    on the host): bytes per GPU, held only inside the step."""
    return 4 * n / world if engine in ("zero1", "zero2", "zero3") else 0.0


def buffers(engine: str, shape: ModelShape, precision: str, world: int) -> float:
    """Transient bytes per GPU besides activations: communication buckets and gathered parameters."""
    h = shape.config.d_model
    width = 4 if precision == "fp32" else 2
    if engine == "ddp":
        return 4 * shape.params  # the reducer's gradient buckets beside .grad (no bucket views)
    if engine == "fsdp":  # the block in use and the prefetched one, gathered, with their unsharded grads;
        # the root unit (embeddings) stays gathered from forward to backward
        return (2 * shape.largest_block_params + shape.root_params) * (width + 4)
    if engine in ("zero1", "zero2"):  # + reduce and all-gather buckets (h^2 each)
        return 2 * h * h * width + flat_gradient(engine, shape.params, world)
    # ZeRO-3 (no prefetch, pretrain/engines/ds_config.py): the reduce bucket, the block being computed and
    # the root unit (the embedding, also the tied LM head), gathered, the root with its full gradient. Its
    # fp32 gradient copy is part of the optimizer step (`peak`), when none of these is held.
    return h * h * width + shape.largest_block_params * width + shape.root_params * (width + 4)


def held(engine: str, states: ModelStates, buffers: float, *, n: int, world: int) -> tuple[float, float]:
    """Bytes per GPU, the process's fixed overhead aside: (held together with the activations, held at a
    moment without them).

    Every engine holds its states and buffers together with the activations, except ZeRO-3's gradient
    partition: allocated at the step's first gradient reduce and freed after the optimizer step, so ZeRO-3's
    optimizer step (the partition and DeepSpeed's fp32 copy of it) is a moment of its own."""
    if engine != "zero3":
        return states.total + buffers, 0.0
    kept = states.params + states.optimizer
    return kept + buffers, kept + states.grads + flat_gradient(engine, n, world)


def peak(
    engine: str, states: ModelStates, buffers: float, activations: float, *, n: int, world: int
) -> float:
    """Bytes per GPU at the step's high-water mark, the process's fixed overhead aside (`held`)."""
    beside, apart = held(engine, states, buffers, n=n, world=world)
    return max(beside + activations, apart)


def activations_per_sample(shape: ModelShape, seq_len: int, precision: str, *, checkpointing: bool) -> float:
    """Bytes autograd keeps for one sequence of `seq_len` tokens at the peak of the backward pass.

    Per block and token (pre-norm, fused attention that keeps no L x L scores): the norms' inputs and
    outputs, q/k/v, the attention output and its reshaped copy, the MLP input and its two d_ff-wide
    tensors: 9 d_model + 2 d_ff values (a gated MLP: 3 d_ff). With checkpointing only each block's input
    stays, plus one block recomputed at a time. Logits and their log-softmax are fp32 (the loss is).
    """
    cfg = shape.config
    width = 4 if precision == "fp32" else 2
    d_ff = cfg.d_ff * (1.5 if getattr(cfg, "gated", False) else 1.0)
    per_block = seq_len * (9 * cfg.d_model + 2 * d_ff) * width
    layers = cfg.n_layers + getattr(cfg, "n_decoder_layers", 0)
    stored = (layers * seq_len * cfg.d_model * width + per_block) if checkpointing else layers * per_block
    logits = 2 * seq_len * cfg.padded_vocab_size * 4  # the head computes every row, padding ones too
    return stored + logits


@dataclass(frozen=True, kw_only=True)
class EnginePlan:
    engine: str
    states: ModelStates
    buffers: float
    activations: float  # at the config's micro-batch, without gradient checkpointing
    activations_ckpt: float  # with it
    max_micro_batch: int  # 0: not even one sequence fits
    max_micro_batch_ckpt: int
    n: int  # parameters
    world: int

    def total(self, *, checkpointing: bool) -> float:
        acts = self.activations_ckpt if checkpointing else self.activations
        return (
            peak(self.engine, self.states, self.buffers, acts, n=self.n, world=self.world)
            + OVERHEAD_GIB * GIB
        )


@dataclass(frozen=True, kw_only=True)
class Plan:
    shape: ModelShape
    world: int
    micro_batch: int
    seq_len: int
    precision: str
    gpu_bytes: float
    engines: list[EnginePlan]
    unit: str = "tokens"  # what seq_len counts: tokens, or an image model's patches, a speech model's frames

    def recommendation(self) -> str:
        """The first choice in `PREFERENCE` that fits the config's micro-batch."""
        by_name = {e.engine: e for e in self.engines}
        for name, checkpointing in PREFERENCE:
            plan = by_name[name]
            if plan.total(checkpointing=checkpointing) <= self.gpu_bytes:
                ckpt = "with" if checkpointing else "without"
                largest = plan.max_micro_batch_ckpt if checkpointing else plan.max_micro_batch
                return (
                    f"recommended: {_engine_keys(name)}, {ckpt} gradient checkpointing "
                    f"(micro-batch {self.micro_batch} needs {plan.total(checkpointing=checkpointing) / GIB:.1f} "
                    f"of {self.gpu_bytes / GIB:.0f} GiB; up to {largest} fits)"
                )
        return (
            f"nothing fits micro-batch {self.micro_batch} in {self.gpu_bytes / GIB:.0f} GiB per GPU: "
            "use more GPUs, a smaller train.micro_batch_size or data.seq_len"
        )


def _engine_keys(name: str) -> str:
    """The config overrides that select engine `name`."""
    if name in ("ddp", "fsdp"):
        return f"engine.backend={name}"
    keys = f"engine.backend=deepspeed engine.deepspeed.zero_stage={name[4]}"
    return keys + (" engine.deepspeed.offload=params" if name.endswith("offload") else "")


def plan(
    config: ModelConfig,
    *,
    world: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    gpu_memory_gib: float,
    unit: str = "tokens",
) -> Plan:
    """Every engine's per-GPU memory for `config` trained on `world` GPUs of `gpu_memory_gib` each."""
    shape = ModelShape.of(config)
    gpu = gpu_memory_gib * GIB
    per_sample = {
        c: activations_per_sample(shape, seq_len, precision, checkpointing=c) for c in (False, True)
    }
    engines = []
    for name in ENGINES:
        states = model_states(name, shape.params, world, precision)
        extra = buffers(name, shape, precision, world)
        beside, apart = held(name, states, extra, n=shape.params, world=world)
        # room for activations beside what is held with them, provided the moment without them fits
        free = gpu - beside - OVERHEAD_GIB * GIB if apart + OVERHEAD_GIB * GIB <= gpu else 0.0
        engines.append(
            EnginePlan(
                engine=name,
                states=states,
                buffers=extra,
                activations=micro_batch * per_sample[False],
                activations_ckpt=micro_batch * per_sample[True],
                max_micro_batch=max(0, math.floor(free / per_sample[False])),
                max_micro_batch_ckpt=max(0, math.floor(free / per_sample[True])),
                n=shape.params,
                world=world,
            )
        )
    return Plan(
        shape=shape,
        world=world,
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        gpu_bytes=gpu,
        engines=engines,
        unit=unit,
    )


def plan_run(cfg: RunConfig, *, gpus: int, gpu_memory_gib: float) -> Plan:
    """The plan for a run config (its model, micro-batch, sequence length and precision) on `gpus` GPUs."""
    return plan(
        cfg.model.config,
        world=gpus,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.sample_len,
        precision=cfg.train.precision,
        gpu_memory_gib=gpu_memory_gib,
        unit=cfg.unit,
    )


def render(p: Plan) -> str:
    """The table `pretrain plan` prints (GiB per GPU)."""
    head = (
        f"{p.shape.params / 1e6:.1f} M parameters, {p.world} GPUs x {p.gpu_bytes / GIB:.0f} GiB, {p.precision}, "
        f"micro-batch {p.micro_batch} x {p.seq_len} {p.unit}; GiB per GPU (+{OVERHEAD_GIB} GiB CUDA/NCCL overhead)"
    )
    if p.unit != "tokens":
        head += "\nactivations are approximate for image and speech models (pretrain/plan.py says how)"
    columns = ["engine", "states", "buffers", "activations", "act. (ckpt)", "total", "total (ckpt)", "max mb",
               "max mb (ckpt)"]  # fmt: skip
    rows = []
    for e in p.engines:
        states = f"{e.states.total / GIB:.2f}" + (
            f" (+{e.states.host / GIB:.1f} host)" if e.states.host else ""
        )
        rows.append([
            e.engine, states, f"{e.buffers / GIB:.2f}", f"{e.activations / GIB:.2f}",
            f"{e.activations_ckpt / GIB:.2f}", f"{e.total(checkpointing=False) / GIB:.2f}",
            f"{e.total(checkpointing=True) / GIB:.2f}", str(e.max_micro_batch), str(e.max_micro_batch_ckpt),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([*lines, p.recommendation()])

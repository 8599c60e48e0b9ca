"""The run configuration: one typed tree, resolved once and passed down.

Every section is a frozen dataclass whose fields carry their documentation (`metadata["doc"]`), validated by
pydantic against the dataclass itself: the `model` section by the model family's own config class
(`models.config`), `data` by `data.config.DataConfig`, the rest by the sections below. Precedence is defaults
< YAML file < `key.path=value` overrides. Every problem becomes one `ConfigError` naming the dotted key and what
is accepted, so a typo fails in a second instead of after the queue wait.

`load_config` returns a `RunConfig` whose parts are what later stages take: `cfg.model.config` (the model's own
config; `cfg.model.for_tokenizer(tok)` fills the tokenizer's ids), `cfg.data`, `cfg.engine_spec` (the engine
with the DeepSpeed JSON already resolved) and `cfg.optimizer`. Nothing re-reads presets or derives the family
again. This module imports no torch: a config error answers at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import netrc
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from data.config import (
    FIELD_OBJECTIVES,
    MEDIA_MODALITY,
    DataConfig,
    MediaObjectiveName,
    Modality,
    ObjectiveName,
)
from models.config import CONFIG_CLASSES, PRESETS, ModelConfig
from pretrain.bundled import bundled_config_names, find_config
from pretrain.errors import ConfigError

__all__ = [
    "FAMILY_OBJECTIVE",
    "CheckpointConfig",
    "ConfigError",
    "DeepSpeedConfig",
    "EngineConfig",
    "EvalConfig",
    "EngineSpec",
    "FSDPConfig",
    "LogConfig",
    "ModelSection",
    "OptimizerConfig",
    "RunConfig",
    "RunDirConfig",
    "TrainConfig",
    "WandbConfig",
    "bundled_config",
    "engine_spec",
    "load_config",
    "parse_overrides",
]

FAMILY_OBJECTIVE: dict[str, Literal[ObjectiveName, MediaObjectiveName]] = {
    "gpt": "clm", "bert": "mlm", "t5": "span",
    "vit_mae": "mae", "vit_simmim": "simmim", "swin": "simmim", "conformer": "bestrq",
}  # fmt: skip
Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]
EngineBackend = Literal["deepspeed", "ddp", "fsdp"]
Offload = Literal["none", "optimizer", "params"]
WandbMode = Literal["online", "offline", "disabled"]

_MODALITY_WORDS = {"image": "an image", "audio": "a speech"}
_MEDIA_ONLY = [name for name, users in FIELD_OBJECTIVES.items() if not set(users) & {"clm", "mlm", "span"}]
_STRICT = {"extra": "forbid"}  # pydantic: an unknown key is an error, never silently dropped
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field documented where it is declared (`pretrain config` prints the text)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW + warmup/decay schedule + clipping: the train fields the engines' optimizer reads."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    schedule: Schedule
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    clip_grad: float | None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    __pydantic_config__ = _STRICT

    max_steps: NonNegativeInt = doc(
        "optimizer steps to train for (a resumed run continues up to it; 0 saves the starting weights)", 1000
    )
    micro_batch_size: PositiveInt = doc("sequences per rank per forward/backward", 8)
    grad_accum: PositiveInt = doc("micro-batches per optimizer step on each rank", 1)
    lr: Annotated[float, Field(gt=0)] = doc("peak learning rate (AdamW)", 3e-4)
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = doc("final LR as a share of train.lr", 0.1)
    warmup_steps: NonNegativeInt = doc("linear warmup steps before the decay", 0)
    schedule: Schedule = doc("LR decay after warmup", "cosine")
    weight_decay: Annotated[float, Field(ge=0)] = doc(
        "AdamW decay of weight matrices (norms, biases and embedding tables are exempt)", 0.01
    )
    betas: tuple[float, float] = doc("AdamW betas", (0.9, 0.95))
    eps: Annotated[float, Field(gt=0)] = doc("AdamW epsilon", 1e-8)
    clip_grad: Annotated[float, Field(gt=0)] | None = doc("global gradient-norm clip; null = none", 1.0)
    seed: NonNegativeInt = doc("seeds weights, data order, masking and dropout", 0)
    precision: Precision = doc("fp32, or bf16/fp16 mixed precision (fp16: DeepSpeed on a GPU)", "fp32")
    compile: bool = doc("torch.compile each transformer block (for GPU runs; the first step compiles)", False)
    eval_every: NonNegativeInt = doc("validation loss every N steps; 0 = never", 0)
    eval_batches: PositiveInt = doc("validation micro-batches per evaluation (the same ones each time)", 4)
    max_skips: NonNegativeInt = doc("non-finite steps tolerated before the run stops", 10)

    @functools.cached_property
    def optimizer(self) -> OptimizerConfig:
        names = [f.name for f in dataclasses.fields(OptimizerConfig)]
        return OptimizerConfig(**{name: getattr(self, name) for name in names})


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfig:
    __pydantic_config__ = _STRICT

    zero_stage: Annotated[int, Field(ge=0, le=3)] = doc(
        "ZeRO stage: 0 = DDP-like, 1 shards optimizer states, 2 also gradients, 3 also parameters", 0
    )
    offload: Offload = doc("to CPU memory: the optimizer (stage 2-3), or also parameters (stage 3)", "none")
    config: Path | None = doc(
        "a DeepSpeed JSON whose 'auto' fields the run config fills; null = the bundled one for the stage",
        None,
    )


@dataclass(frozen=True, kw_only=True)
class FSDPConfig:
    __pydantic_config__ = _STRICT

    reshard_after_forward: bool = doc(
        "free each block's gathered parameters after its forward (less memory, one more all-gather)", True
    )


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    __pydantic_config__ = _STRICT

    backend: EngineBackend = doc(
        "deepspeed (ZeRO 0-3, offload), ddp (PyTorch DDP through Accelerate) or fsdp (PyTorch FSDP2)",
        "deepspeed",
    )
    deepspeed: DeepSpeedConfig | None = doc("DeepSpeed's settings (engine.backend=deepspeed only)", None)
    fsdp: FSDPConfig | None = doc("FSDP2's settings (engine.backend=fsdp only)", None)
    dist_timeout_s: Annotated[float, Field(gt=0)] = doc("timeout of every collective, seconds", 600.0)

    def __post_init__(self) -> None:
        # The backend's own settings section always exists (defaults), the others never do.
        if self.backend == "deepspeed" and self.deepspeed is None:
            object.__setattr__(self, "deepspeed", DeepSpeedConfig())
        if self.backend == "fsdp" and self.fsdp is None:
            object.__setattr__(self, "fsdp", FSDPConfig())


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    __pydantic_config__ = _STRICT

    samples: tuple[str, ...] = doc(
        "prompts sampled greedily at every evaluation (train.eval_every) into RUN_DIR/samples.jsonl and W&B: "
        "GPT continues them, T5 fills their <extra_id_N> sentinels, BERT its [MASK]s; empty = none",
        (),
    )
    max_new_tokens: PositiveInt = doc("tokens generated per sample (GPT, T5)", 32)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    __pydantic_config__ = _STRICT

    every: PositiveInt = doc("save every N steps (and at the end, and on a preemption signal)", 100)
    keep: Annotated[int, Field(ge=1)] = doc("newest checkpoints kept on disk", 3)


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    __pydantic_config__ = _STRICT

    every: PositiveInt = doc("a metrics.jsonl record (and W&B point) every N steps", 10)
    progress: bool = doc("a progress bar on a terminal, a line per record otherwise", True)
    peak_flops: Annotated[float, Field(gt=0)] | None = doc(
        "per-device peak FLOP/s for MFU; null = looked up from the device", None
    )


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    __pydantic_config__ = _STRICT

    mode: WandbMode = doc("online needs an API key; offline writes under the run directory", "offline")
    project: str = doc("W&B project", "pretrain")
    entity: str | None = doc("W&B team or user; null = the key's default", None)
    name: str | None = doc("run name; null = the run directory's name", None)


@dataclass(frozen=True, kw_only=True)
class RunDirConfig:
    __pydantic_config__ = _STRICT

    dir: Path | None = doc("the run directory; null = runs/<config file name>", None)


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The `model:` section resolved: where the architecture comes from (a preset, or `init_from`'s weights),
    the fields the run config set, and the model's own config."""

    preset: str | None
    given: Mapping[str, Any]  # fields set in the run config (the tokenizer fills the ids it owns otherwise)
    config: ModelConfig  # the preset (or the source's architecture) with `given` applied, validated
    init_from: str | None = None  # start from these weights (pretrain/init_from.py)
    source_fields: Mapping[str, Any] = field(default_factory=dict)  # the architecture read from init_from
    source_tokenizer: str | None = None  # init_from's tokenizer directory, when it has one

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def origin(self) -> str:
        """Where the architecture comes from, for messages."""
        return f"model.init_from {self.init_from!r}" if self.init_from else f"model.preset {self.preset!r}"

    def for_tokenizer(self, tokenizer: Any) -> ModelConfig:
        """The model config with the tokenizer's vocabulary size and special-token ids filled in (image and
        speech models have no tokenizer: None, and the config as it is)."""
        if tokenizer is None:
            return self.config
        if self.init_from is None:
            vocab_size = self.given.get("vocab_size", len(tokenizer))
        else:  # the weights fix the vocabulary; only an explicit model.vocab_size grows it
            vocab_size = self.config.vocab_size
        if vocab_size < len(tokenizer):
            fix = " (set model.vocab_size to resize the embeddings explicitly)" if self.init_from else ""
            raise ConfigError(
                f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens{fix}"
            )
        ids = {
            "vocab_size": vocab_size,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
        names = {f.name for f in dataclasses.fields(self.config) if f.init}
        return dataclasses.replace(
            self.config,
            **{k: v for k, v in ids.items() if k in names and v is not None},
        )

    def to_dict(self) -> dict[str, Any]:
        """What config.yaml stores; with init_from, the whole architecture too, so that the run's own config
        still loads (for export, resume) once the source has moved."""
        if self.init_from is None:
            return {"preset": self.preset, **self.given}
        fields = {**self.source_fields, **self.given}
        return {"init_from": self.init_from, "family": self.family, **fields}


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """What an engine needs, resolved once from the run config (the DeepSpeed JSON included)."""

    backend: EngineBackend
    deepspeed: DeepSpeedConfig | None
    fsdp: FSDPConfig | None
    deepspeed_json: dict[str, Any] | None  # resolved; device-dependent fields (pin_memory) left "auto"
    precision: Precision
    micro_batch_size: int
    grad_accum: int
    seed: int
    optimizer: OptimizerConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run, as `pretrain train` sees it."""

    __pydantic_config__ = _STRICT

    model: ModelSection = doc(
        "`preset` (a name from models/config.py) or `init_from` (a transformers directory, a run directory or "
        "a checkpoint: its architecture and weights), plus any field of the model's config class"
    )
    data: DataConfig = doc(
        "where text, images or audio come from and how they become batches", factory=DataConfig
    )
    objective: Literal[ObjectiveName, MediaObjectiveName] | None = doc(
        "clm (gpt), mlm (bert), span (t5), mae (vit-*-mae), simmim (vit-*-simmim, swin) or bestrq (conformer): "
        "the model family's, so it may be left out",
        None,
    )
    train: TrainConfig = doc("steps, batch, optimizer, precision", factory=TrainConfig)
    engine: EngineConfig = doc("how the model is distributed", factory=EngineConfig)
    eval: EvalConfig = doc("what evaluation steps write besides the validation loss", factory=EvalConfig)
    checkpoint: CheckpointConfig = doc("how often, how many", factory=CheckpointConfig)
    log: LogConfig = doc("metrics.jsonl, console, MFU", factory=LogConfig)
    wandb: WandbConfig = doc("Weights & Biases", factory=WandbConfig)
    run: RunDirConfig = doc("where the run lives", factory=RunDirConfig)

    def __post_init__(self) -> None:
        objective = FAMILY_OBJECTIVE[self.model.family]
        if self.objective not in (None, objective):
            pairs = ", ".join(f"{o}<->{f}" for f, o in FAMILY_OBJECTIVE.items())
            raise ConfigError(
                f"objective: {self.objective!r} does not fit {self.model.origin} "
                f"(family {self.model.family}); accepted: {objective!r} ({pairs})"
            )
        object.__setattr__(self, "objective", objective)
        if self.modality is not None:
            self._check_media()
        else:
            self._check_text()
        ds = self.engine.deepspeed
        sharded = self.engine.backend == "fsdp" or (ds is not None and ds.zero_stage == 3)
        if self.train.compile and sharded:
            raise ConfigError(
                "train.compile: not supported (not tested) with sharded parameters (engine.backend=fsdp or "
                "engine.deepspeed.zero_stage=3); accepted with: engine.deepspeed.zero_stage 0-2, engine.backend=ddp"
            )
        if getattr(self.model.config, "reversible", False) and sharded:
            # Reversible backward reruns each block inside an autograd Function, outside the hooks that
            # gather sharded parameters (FSDP fails on plain vs DTensor, ZeRO-3 on an empty parameter).
            raise ConfigError(
                "model.reversible: not supported with sharded parameters (engine.backend=fsdp or "
                "engine.deepspeed.zero_stage=3); accepted with: engine.deepspeed.zero_stage 0-2, engine.backend=ddp"
            )

    def _check_text(self) -> None:
        """The tokenizer init_from's weights need, prompts that fit the family, sequences that fit the model."""
        if self.model.init_from is not None and self.data.tokenizer is None:
            if self.model.source_tokenizer is None:
                raise ConfigError(
                    f"data.tokenizer: model.init_from {self.model.init_from} has no tokenizer; name the one its "
                    "weights were trained with"
                )
            tokenizer = self.model.source_tokenizer  # the weights' own vocabulary, never a new one
            object.__setattr__(self, "data", dataclasses.replace(self.data, tokenizer=tokenizer))
        for i, prompt in enumerate(self.eval.samples):
            if self.model.family == "bert" and "[MASK]" not in prompt:
                raise ConfigError(f"eval.samples[{i}]: a BERT prompt needs [MASK] where tokens are filled")
        media = [n for n in self.data.unused_settings(str(self.objective)) if n in _MEDIA_ONLY]
        for name in media:
            raise ConfigError(
                f"data.{name}: set, but {self.model.origin} is a text model (objective {self.objective}), "
                "which does not use it; remove it"
            )
        positions = self.model.config.max_seq_len
        if positions is not None and self.data.seq_len > positions:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds the model's {positions} positions "
                f"(model.max_seq_len, from {self.model.origin}); accepted: <= {positions}"
            )

    def _check_media(self) -> None:
        """What an image or speech run cannot take: text settings, prompts, another model's weights."""
        for name in self.data.unused_settings(str(self.objective)):
            raise ConfigError(
                f"data.{name}: set, but {self.model.origin} is {_MODALITY_WORDS[str(self.modality)]} model "
                f"(objective {self.objective}), which does not use it; remove it"
            )
        if self.eval.samples:
            raise ConfigError(
                f"eval.samples: prompts are for text models; {self.model.origin} is "
                f"{_MODALITY_WORDS[str(self.modality)]} model (remove eval.samples)"
            )
        if self.model.init_from is not None:
            raise ConfigError(
                f"model.init_from: not supported for the image and speech families yet ({self.model.family}); "
                "start from a model.preset"
            )

    @property
    def sample_len(self) -> int:
        """Positions one sample feeds the model, what tokens/s counts: data.seq_len tokens for text, the patch
        grid of an image, the frames of one data.clip_seconds clip."""
        model: Any = self.model.config
        if self.modality == "image":
            return (model.image_size // model.patch_size) ** 2
        if self.modality == "audio":
            return model.num_frames(round(self.data.clip_seconds * model.sample_rate))
        return self.data.seq_len

    @property
    def unit(self) -> str:
        """What `sample_len` counts, for messages."""
        return {None: "tokens", "image": "patches", "audio": "frames"}[self.modality]

    @property
    def modality(self) -> Modality | None:
        """What the model reads: None for text, else 'image' or 'audio'."""
        return MEDIA_MODALITY.get(str(self.objective))

    @property
    def run_dir(self) -> Path:
        assert self.run.dir is not None, "load_config fills run.dir"
        return self.run.dir

    @property
    def optimizer(self) -> OptimizerConfig:
        return self.train.optimizer

    @functools.cached_property
    def engine_spec(self) -> EngineSpec:
        """The engine's inputs; resolving the DeepSpeed JSON here means once per run (the check does it)."""
        return engine_spec(self.engine, self.train)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data, in the form `load_config` reads back."""
        out: dict[str, Any] = {"model": self.model.to_dict()}
        for f in dataclasses.fields(self):
            if f.name != "model":
                out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def warnings(self) -> list[str]:
        """What will not stop training but will stop a later command; `pretrain train` prints these first."""
        problem = export_problem(self.model.config)
        if problem is None:
            return []
        return [f"{problem}, so `pretrain export` will refuse this run; set both to the same value"]


def engine_spec(engine: EngineConfig, train: TrainConfig) -> EngineSpec:
    """What an engine takes, from the engine and train sections (the DeepSpeed JSON resolved here)."""
    from pretrain.engines.ds_config import resolve_config

    return EngineSpec(
        backend=engine.backend,
        deepspeed=engine.deepspeed,
        fsdp=engine.fsdp,
        deepspeed_json=None if engine.deepspeed is None else resolve_config(engine.deepspeed, train),
        precision=train.precision,
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        seed=train.seed,
        optimizer=train.optimizer,
    )


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def export_problem(model: ModelConfig) -> str | None:
    """Why the model cannot be converted to transformers, or None. Export is a separate command, so the
    config check only warns and `pretrain export` refuses up front, before reading any weights."""
    if model.family == "t5" and model.dropout != model.attention_dropout:
        return (
            f"transformers' T5 has one dropout_rate, but model.dropout={model.dropout} and "
            f"model.attention_dropout={model.attention_dropout}"
        )
    return None


# ---------------------------------------------------------------------------------------------- loading


def bundled_config(name: str) -> Path:
    """A run config shipped with the package (`gpt-tiny` or `gpt-tiny.yaml`)."""
    path = find_config(name)
    if path is None:
        raise ConfigError(
            f"config file not found: {name} (bundled configs: {', '.join(bundled_config_names())})"
        )
    return path


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_files: bool = True) -> RunConfig:
    """Read, merge, validate and resolve; raises ConfigError naming the first problem.

    `check_files=False` skips what lies outside the config (data sources, the DeepSpeed JSON, a W&B login):
    export reads a saved config whose data may be gone and needs none of them.
    """
    path = bundled_config(str(path))
    raw = {k: v for k, v in read_yaml(path).items() if v is not None}  # `train:` left empty = defaults
    for key, value in parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    run = raw.setdefault("run", {})
    if isinstance(run, dict) and run.get("dir") is None:
        run["dir"] = str(Path("runs") / path.stem)
    cfg = config_from_dict(raw)
    if check_files:
        _check_sources(cfg.data, cfg.modality)
        _ = cfg.engine_spec  # resolve the DeepSpeed JSON now: its errors are config errors
        _check_wandb(cfg.wandb)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw config tree (as read from YAML) into a RunConfig."""
    raw = dict(raw)
    _refuse_renamed_keys(raw)
    if "model" not in raw:
        raise ConfigError("model: required section is missing (model.preset names a preset)")
    raw["model"] = resolve_model(raw["model"])
    _refuse_unused_engine_settings(raw.get("engine"))
    try:
        return _RUN_ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


_RUN_ADAPTER = TypeAdapter(RunConfig)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file") from None
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(
            f"config file {path} must be a YAML mapping of sections (model:, data:, train:, ...), got {kind}"
        )
    return raw


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` strings -> {dotted key: value parsed as a YAML scalar}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not key.path=value (e.g. train.max_steps=100)")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {key}: value {text!r} is not a valid YAML scalar") from None
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {key}: {where} is a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------------- model


def resolve_model(section: Any) -> ModelSection:
    """`model:` -> the preset's (or init_from's) config class built with the given fields (validated by it)."""
    if not isinstance(section, dict):
        raise ConfigError(f"model: expected a section (model.preset, model.<field>), got {section!r}")
    given = dict(section)
    preset = given.pop("preset", None)
    init_from = given.pop("init_from", None)
    family = given.pop("family", None)
    if init_from is not None:
        if preset is not None:
            raise ConfigError(
                f"model.preset: not with model.init_from (the architecture is read from {init_from}); remove it"
            )
        return _resolve_init_from(str(init_from), family, given)
    if family is not None:
        raise ConfigError("model.family: set only with model.init_from (a preset names its family)")
    if preset is None:
        raise ConfigError(
            "model.preset: required key is missing (or model.init_from: a directory to start from)"
        )
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"model.preset: unknown preset {preset!r}; {hint}accepted: {', '.join(PRESETS)}")
    cls, values = PRESETS[preset]
    return ModelSection(preset=preset, given=given, config=_model_config(cls, values, given, "preset"))


def _resolve_init_from(init_from: str, family: Any, given: dict[str, Any]) -> ModelSection:
    """The architecture read from the source; given fields may change only what leaves the weights' shapes."""
    from pretrain import init_from as sources

    try:
        source = sources.read_source(init_from)
    except ConfigError:
        if family not in CONFIG_CLASSES:  # a run's own saved config has it all, so it outlives its source
            raise
        cls = CONFIG_CLASSES[family]
        return ModelSection(
            preset=None, given=given, config=_model_config(cls, {}, given, "init_from"), init_from=init_from
        )
    if family is not None and family != source.family:
        raise ConfigError(
            f"model.family: {family!r}, but model.init_from {init_from} holds a {source.family} model"
        )
    problem = sources.conflicts(source, given)
    if problem is not None:
        raise ConfigError(problem)
    cls = CONFIG_CLASSES[source.family]
    return ModelSection(
        preset=None,
        given=given,
        config=_model_config(cls, source.fields, given, "init_from"),
        init_from=init_from,
        source_fields=source.fields,
        source_tokenizer=None if source.tokenizer is None else str(source.tokenizer),
    )


def _model_config(
    cls: type[ModelConfig], values: Mapping[str, Any], given: dict[str, Any], origin: str
) -> ModelConfig:
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    for name in given:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean model.{close[0]}? " if close else ""
            raise ConfigError(
                f"unknown config key model.{name}; {hint}accepted here: {', '.join([origin, *accepted])}"
            )
    try:
        return _model_adapter(cls).validate_python({**values, **given})
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "value_error":  # the class's own check: its message names the field
            message = str(first["ctx"]["error"]).removeprefix("model config: ")
            raise ConfigError(f"model: {message}") from None
        name = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"model.{name}: {first['msg']} (got {first.get('input')!r})") from None


@functools.cache
def _model_adapter(cls: type[ModelConfig]) -> TypeAdapter:
    return TypeAdapter(cls)


# ---------------------------------------------------------------------------------------- renamed keys

_RENAMED = {
    "engine.zero_stage": "engine.deepspeed.zero_stage",
    "engine.offload": "engine.deepspeed.offload",
    "engine.deepspeed_config": "engine.deepspeed.config",
}


def _refuse_renamed_keys(raw: dict[str, Any]) -> None:
    """Keys of earlier releases answer with the key that replaced them."""
    engine = raw.get("engine")
    if not isinstance(engine, dict):
        return
    for old, new in _RENAMED.items():
        if old.split(".", 1)[1] in engine:
            raise ConfigError(f"{old} was renamed: use {new}")
    if "accelerate" in engine or engine.get("backend") == "accelerate":
        raise ConfigError(
            "engine.backend=accelerate / engine.accelerate.strategy were replaced by what runs: "
            "use engine.backend=ddp (PyTorch DDP through Accelerate) or engine.backend=fsdp (PyTorch FSDP2)"
        )


def _refuse_unused_engine_settings(engine: Any) -> None:
    """A setting for an engine the run does not use is an error naming the key, never silently ignored."""
    if not isinstance(engine, dict):
        return
    backend = engine.get("backend", "deepspeed")
    for section in ("deepspeed", "fsdp"):
        settings = engine.get(section)
        if settings is None or section == backend:
            continue
        keys = sorted(settings) if isinstance(settings, dict) and settings else [""]
        key = ".".join(filter(None, ["engine", section, keys[0]]))
        raise ConfigError(
            f"{key}: set, but engine.backend={backend} does not use it "
            f"(engine.{section}.* applies to engine.backend={section}; remove it, or override engine.{section}=null)"
        )


# ------------------------------------------------------------------------------------------ error text

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


def _describe(error: ValidationError) -> str:
    """First pydantic error as one line: `dotted.key: what is wrong (got X)`, with a suggestion for typos."""
    first = error.errors()[0]
    loc = [p for p in first["loc"] if isinstance(p, int) or not _is_tag(p)]
    key = ".".join(f"[{p}]" if isinstance(p, int) else p for p in loc).replace(".[", "[")
    more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        accepted = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}? " if close else ""
        return f"unknown config key {key}; {hint}accepted here: {', '.join(accepted)}{more}"
    if first["type"] in ("missing", "missing_keyword_argument"):
        return f"{key}: required key is missing{more}"
    if first["type"] == "value_error":  # a section's own check: its message names the key
        message = str(first["ctx"]["error"])
        return message if not key or message.startswith(f"{key}") else f"{key}: {message}"
    got = first.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{key}: {first['msg']}{shown}{more}"


def _is_tag(part: str) -> bool:
    """pydantic's union/type tags inside an error location (not config keys)."""
    return part in _TYPE_TAGS or "[" in part or "-" in part or part.endswith("Config")


def _fields_at(loc: Sequence[Any]) -> list[str]:
    cls: Any = RunConfig
    for part in loc:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        sub = _dataclass_in(hints.get(part)) if isinstance(part, str) else None
        if sub is None:
            return []
        cls = sub
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation holds (`X`, `X | None`, `Annotated[X, ...]`), or None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


# -------------------------------------------------------------------------------- cross-component checks


def _check_sources(data: DataConfig, modality: Modality | None) -> None:
    """Globs, empty files, prepared indexes: cheap, reads no data."""
    from data import DataError, check_sources

    try:
        check_sources(data, modality)
    except DataError as e:
        raise ConfigError(" ".join(str(e).split())) from None


def _check_wandb(section: WandbConfig) -> None:
    """Online mode with no key hangs or fails deep inside wandb; say so up front (without printing any key)."""
    if section.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        has_login = False
    if not has_login:
        raise ConfigError(
            "wandb.mode: 'online' needs a W&B API key (set WANDB_API_KEY or run `wandb login`); "
            "accepted without a key: offline, disabled"
        )

"""The run configuration: one typed tree, validated in full before anything expensive starts.

Precedence is defaults < YAML file < `key.path=value` overrides. Every problem becomes one `ConfigError` whose
message names the dotted key and what is accepted, so a typo fails in a second instead of after the queue wait.
The `model` and `data` sections mirror the component dataclasses (`models.config`, `data.config.DataConfig`)
instead of repeating their fields here, so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import netrc
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from data import DataError, check_sources
from data.config import DataConfig

if TYPE_CHECKING:  # pretrain.engines imports torch (~1.5 s): a config error must not wait for it
    from pretrain.engines.base import EngineSpec, OptimizerSpec

FAMILY_OBJECTIVE = {"gpt": "clm", "bert": "mlm", "t5": "span"}


class ConfigError(ValueError):
    """Bad user input (config file, override, value); the CLI prints it as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _mirror(
    cls: type, *, name: str, constraints: dict[str, dict[str, Any]], all_optional: bool = False
) -> type[BaseModel]:
    """A pydantic model with the fields, types and defaults of the dataclass `cls` (extra keys forbidden)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if all_optional:
            default: Any = None
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (hints[f.name], Field(default, **constraints.get(f.name, {})))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


DataSection = _mirror(
    DataConfig,
    name="DataSection",
    constraints={name: {"gt": 0} for name in ("seq_len", "vocab_size", "shuffle_buffer")}
    | {"num_workers": {"ge": 0}},
)


class ModelSection(BaseModel):
    """`preset` plus any field of that preset's config class (checked against it in `_check_model`)."""

    model_config = ConfigDict(extra="allow")

    preset: str
    attention: Literal["auto", "eager", "sdpa", "chunked"] = "auto"
    gradient_checkpointing: bool = False

    def overrides(self) -> dict[str, Any]:
        """Keyword overrides for `models.get_config` / `models.build_model`."""
        return {"attention": self.attention, "gradient_checkpointing": self.gradient_checkpointing} | dict(
            self.model_extra or {}
        )


class TrainSection(Section):
    max_steps: int = Field(1000, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = Field(
        False, description="torch.compile each transformer block (for GPU runs; the first step compiles)"
    )
    eval_every: int = Field(0, ge=0, description="validation loss every N steps; 0 = never")
    eval_batches: int = Field(4, gt=0)
    max_skips: int = Field(10, ge=0, description="non-finite steps tolerated before the run stops")


class AccelerateSection(Section):
    strategy: Literal["ddp", "fsdp"] = "ddp"


class EngineSection(Section):
    backend: Literal["deepspeed", "accelerate"] = "deepspeed"
    zero_stage: int = Field(0, ge=0, le=3)
    offload: Literal["none", "optimizer", "params"] = "none"
    deepspeed_config: Path | None = None
    accelerate: AccelerateSection = AccelerateSection()
    dist_timeout_s: float = Field(600.0, gt=0)


class CheckpointSection(Section):
    every: int = Field(100, gt=0)
    keep: int = Field(3, ge=1)


class LogSection(Section):
    every: int = Field(10, gt=0)
    progress: bool = True
    peak_flops: float | None = Field(
        None, gt=0, description="per-device peak FLOP/s for MFU; None: look it up"
    )


class WandbSection(Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "pretrain"
    entity: str | None = None
    name: str | None = None


class RunSection(Section):
    dir: Path | None = Field(None, description="None: runs/<config file name>")


class RunConfig(Section):
    """The whole run, as `pretrain train` sees it."""

    model: ModelSection
    data: DataSection = DataSection()  # type: ignore[valid-type]
    objective: Literal["clm", "mlm", "span"] | None = Field(None, description="None: the model family's")
    train: TrainSection = TrainSection()
    engine: EngineSection = EngineSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    wandb: WandbSection = WandbSection()
    run: RunSection = RunSection()

    @property
    def run_dir(self) -> Path:
        assert self.run.dir is not None, "load_config fills run.dir"
        return self.run.dir

    def data_config(self) -> DataConfig:
        return DataConfig(**{name: getattr(self.data, name) for name in type(self.data).model_fields})

    def engine_spec(self) -> EngineSpec:
        from pretrain.engines.base import EngineSpec

        e, t = self.engine, self.train
        return EngineSpec(
            backend=e.backend,
            zero_stage=e.zero_stage,
            offload=e.offload,
            deepspeed_config=e.deepspeed_config,
            strategy=e.accelerate.strategy,
            precision=t.precision,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            seed=t.seed,
        )

    def optimizer_spec(self) -> OptimizerSpec:
        from pretrain.engines.base import OptimizerSpec

        t = self.train
        return OptimizerSpec(
            lr=t.lr,
            weight_decay=t.weight_decay,
            betas=t.betas,
            eps=t.eps,
            schedule=t.schedule,
            warmup_steps=t.warmup_steps,
            max_steps=t.max_steps,
            min_lr_ratio=t.min_lr_ratio,
            clip_grad=t.clip_grad,
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def warnings(self) -> list[str]:
        """What will not stop training but will stop a later command; `pretrain train` prints these first."""
        problem = export_problem(self)
        if problem is None:
            return []
        return [f"{problem}, so `pretrain export` will refuse this run; set both to the same value"]


def export_problem(cfg: RunConfig) -> str | None:
    """Why the model cannot be converted to transformers, or None. Export is a separate command, so the
    config check only warns and `pretrain export` refuses up front, before reading any weights."""
    from models.config import get_config

    model = get_config(cfg.model.preset, **cfg.model.overrides())
    if model.family == "t5" and model.dropout != model.attention_dropout:
        return (
            f"transformers' T5 has one dropout_rate, but model.dropout={model.dropout} and "
            f"model.attention_dropout={model.attention_dropout}"
        )
    return None


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read, merge and validate; raises ConfigError naming the first problem."""
    raw = {k: v for k, v in _read_yaml(Path(path)).items() if v is not None}  # `train:` left empty = defaults
    for key, value in parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    run = raw.setdefault("run", {})
    if isinstance(run, dict) and run.get("dir") is None:
        run["dir"] = str(Path("runs") / Path(path).stem)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    return check_config(cfg)


def _read_yaml(path: Path) -> dict[str, Any]:
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


def parse_overrides(items: typing.Sequence[str]) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------ error text

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


def _describe(error: ValidationError) -> str:
    """First pydantic error as one line: `dotted.key: what is wrong (got X)`, with a suggestion for typos."""
    first = error.errors()[0]
    loc = [p for p in first["loc"] if isinstance(p, int) or not (p in _TYPE_TAGS or "[" in p or "-" in p)]
    key = ".".join(f"[{p}]" if isinstance(p, int) else p for p in loc).replace(".[", "[")
    more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        accepted = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}? " if close else ""
        return f"unknown config key {key}; {hint}accepted here: {', '.join(accepted)}{more}"
    if first["type"] == "missing":
        return f"{key}: required key is missing{more}"
    got = first.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{key}: {first['msg']}{shown}{more}"


def _fields_at(loc: typing.Sequence[Any]) -> list[str]:
    cls: Any = RunConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        cls = field.annotation
    return list(cls.model_fields)


# -------------------------------------------------------------------------------- cross-component checks


def check_config(cfg: RunConfig) -> RunConfig:
    """Checks that need the component libraries or the file system; fills the derived defaults."""
    family = _check_model(cfg.model)
    objective = cfg.objective or FAMILY_OBJECTIVE[family]
    if objective != FAMILY_OBJECTIVE[family]:
        raise ConfigError(
            f"objective: {objective!r} does not fit model.preset {cfg.model.preset!r} (family {family}); "
            f"accepted: {FAMILY_OBJECTIVE[family]!r} (clm<->gpt, mlm<->bert, span<->t5)"
        )
    try:
        data_config = cfg.data_config()
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if str(e).startswith("data.") else f"data: {e}") from None
    try:
        check_sources(data_config)  # globs, empty files, prepared indexes: cheap, reads no data
    except DataError as e:
        raise ConfigError(" ".join(str(e).split())) from None
    _check_engine(cfg)
    _check_wandb(cfg.wandb)
    return cfg.model_copy(update={"objective": objective})


def _check_model(model: ModelSection) -> str:
    from models.config import PRESETS, get_config

    if model.preset not in PRESETS:
        close = difflib.get_close_matches(model.preset, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"model.preset: unknown preset {model.preset!r}; {hint}accepted: {', '.join(PRESETS)}"
        )
    cls = PRESETS[model.preset][0]
    fields = _mirror(cls, name=f"{cls.__name__}Fields", constraints={}, all_optional=True)
    extra = model.model_extra or {}
    try:
        fields.model_validate(extra)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        if first["type"] == "extra_forbidden":
            accepted = ["preset", *fields.model_fields]
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean model.{close[0]}? " if close else ""
            raise ConfigError(
                f"unknown config key model.{name}; {hint}accepted here: {', '.join(accepted)}"
            ) from None
        raise ConfigError(f"model.{name}: {first['msg']} (got {first.get('input')!r})") from None
    try:
        return get_config(model.preset, **model.overrides()).family
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def _check_engine(cfg: RunConfig) -> None:
    """The DeepSpeed JSON must parse and agree with the run config (the engine fills its "auto" fields)."""
    shards_params = cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3
    shards_params |= cfg.engine.backend == "accelerate" and cfg.engine.accelerate.strategy == "fsdp"
    if cfg.train.compile and shards_params:
        raise ConfigError(
            "train.compile: not supported (not tested) with sharded parameters (engine.zero_stage=3 or "
            "engine.accelerate.strategy=fsdp); accepted with: engine.zero_stage 0-2, engine.accelerate.strategy=ddp"
        )
    if cfg.engine.backend != "deepspeed":
        return
    from pretrain.engines.base import DistInfo
    from pretrain.engines.ds_config import resolve_config

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        resolve_config(cfg.engine_spec(), cfg.optimizer_spec(), DistInfo(world_size=world_size))
    except ValueError as e:
        message = str(e)
        raise ConfigError(
            message if message.startswith("engine.") else f"engine.deepspeed_config: {message}"
        ) from None


def _check_wandb(section: WandbSection) -> None:
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

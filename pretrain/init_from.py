"""`model.init_from`: a run that starts from existing weights (continued pretraining, a second phase).

A source is a `transformers` directory (config.json + weights of GPT2LMHeadModel, BertForMaskedLM or
T5ForConditionalGeneration) or one of our runs: a run directory (its newest intact checkpoint) or one
`checkpoints/step_N`. The architecture is read from the source, so no preset is needed; the tokenizer is the
source's unless `data.tokenizer` names another; only the weights are taken (optimizer, schedule and data start
afresh). At config time only small files are read (config.json, config.yaml, the safetensors header), so
`pretrain check` stays fast. The weights are read by the engine's build (pretrain/engines/build.py), one tensor
at a time into each parameter as the engine holds it: on ZeRO-3 and FSDP each rank copies only its own slice,
so no rank ever holds the whole model, or the whole source.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import Tensor, nn

    from models.hf import Rule

# Fields a continued run may change: they do not change the shapes or the function of the weights.
RUNTIME_FIELDS = frozenset(
    {
        "attention",
        "attention_block",
        "attention_window",
        "gradient_checkpointing",
        "dropout",
        "attention_dropout",
        "init_std",
        "vocab_multiple",  # padding rows only: the tables are resized (SourceWeights)
    }
)
# Filled from the run's tokenizer, as for a preset.
TOKEN_ID_FIELDS = frozenset({"pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"})
_WEIGHTS = "model.safetensors"
_BIN = "pytorch_model.bin"  # older transformers' pickle: read whole, through transformers
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded checkpoints


@dataclass(frozen=True, kw_only=True)
class InitSource:
    """What `model.init_from` points at, read far enough to build the run's config."""

    path: Path
    kind: Literal["transformers", "run"]
    family: str
    fields: dict[str, Any]  # the architecture as our model config's fields (token ids left to the tokenizer)
    tokenizer: Path | None  # a directory AutoTokenizer loads, or None when the source has none
    weights: Path  # the transformers directory, or a checkpoint's model.safetensors


def read_source(init_from: str | Path) -> InitSource:
    """The source's architecture, tokenizer and weights file; ConfigError (one line) if unusable."""
    path = Path(init_from).expanduser()
    if not path.exists():
        raise ConfigError(f"model.init_from: no such directory: {path}")
    if not path.is_dir():
        raise ConfigError(
            f"model.init_from: {path} is not a directory (a transformers directory, a run directory or a checkpoint)"
        )
    if (path / "config.json").is_file():
        return _transformers_source(path)
    if (path / "config.yaml").is_file():
        return _run_source(path, _newest_checkpoint(path))
    if (path / _WEIGHTS).is_file() and (path.parent.parent / "config.yaml").is_file():
        return _run_source(path.parent.parent, path)
    raise ConfigError(
        f"model.init_from: {path} is neither a transformers directory (config.json) nor a run directory "
        f"(config.yaml) nor a checkpoint (checkpoints/step_N/{_WEIGHTS})"
    )


def _transformers_source(path: Path) -> InitSource:
    from models.hf import HF_CLASSES, HF_MODEL_TYPES

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from: {path / 'config.json'} is not readable JSON: {e}") from None
    family = HF_MODEL_TYPES.get(raw.get("model_type", ""))
    if family is None:
        accepted = ", ".join(f"{t} ({HF_CLASSES[f]})" for t, f in HF_MODEL_TYPES.items())
        raise ConfigError(
            f"model.init_from: {path} holds model_type {raw.get('model_type')!r}; accepted: {accepted}"
        )
    architectures = raw.get("architectures") or [HF_CLASSES[family]]
    if HF_CLASSES[family] not in architectures:
        raise ConfigError(
            f"model.init_from: {path} holds {', '.join(architectures)}; accepted: {HF_CLASSES[family]} "
            "(the pretraining head's weights are needed)"
        )
    if not any((path / name).is_file() for name in (_WEIGHTS, *_INDEXES, _BIN)):
        raise ConfigError(f"model.init_from: {path} has no {_WEIGHTS} (save it with save_pretrained)")
    import transformers

    from models.hf import config_from_hf

    try:
        config = config_from_hf(transformers.AutoConfig.from_pretrained(path))
    except ValueError as e:
        raise ConfigError(f"model.init_from: {path}: {str(e).splitlines()[0]}") from None
    has_tokenizer = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    return InitSource(
        path=path,
        kind="transformers",
        family=family,
        fields=_architecture(config),
        tokenizer=path if has_tokenizer else None,
        weights=path,
    )


def _newest_checkpoint(run_dir: Path) -> Path:
    from pretrain.checkpoint import find_checkpoint
    from pretrain.errors import CheckpointError

    try:
        return find_checkpoint(run_dir / "checkpoints", say=lambda _: None)
    except CheckpointError as e:
        raise ConfigError(f"model.init_from: {e}") from None


def _run_source(run_dir: Path, checkpoint: Path) -> InitSource:
    from pretrain.config import read_yaml, resolve_model

    raw = read_yaml(run_dir / "config.yaml")
    try:
        section = resolve_model(raw.get("model"))
    except ConfigError as e:
        raise ConfigError(f"model.init_from: {run_dir / 'config.yaml'}: {e}") from None
    fields = _architecture(section.config)
    fields["vocab_size"] = _vocabulary_size(checkpoint / _WEIGHTS)  # the tokenizer set it in that run
    tokenizer = run_dir / "tokenizer"
    return InitSource(
        path=checkpoint,
        kind="run",
        family=section.family,
        fields=fields,
        tokenizer=tokenizer if (tokenizer / "tokenizer.json").is_file() else None,
        weights=checkpoint / _WEIGHTS,
    )


def _architecture(config: Any) -> dict[str, Any]:
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.init and f.name not in TOKEN_ID_FIELDS
    }


def _vocabulary_size(weights: Path) -> int:
    """The vocabulary a checkpoint's model had, from the safetensors header alone (no tensor is read): as the
    run recorded it (`pretrain.checkpoint.VOCAB_SIZE_KEY`), or, in a checkpoint from before it did (no padded
    tables then), the rows of `embed.tokens.weight`."""
    from pretrain.checkpoint import VOCAB_SIZE_KEY, safetensors_header
    from pretrain.errors import CheckpointError

    try:
        shapes, metadata = safetensors_header(weights)
        return int(metadata.get(VOCAB_SIZE_KEY) or shapes["embed.tokens.weight"][0])
    except (CheckpointError, ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {weights} is not a readable checkpoint ({e})") from None


def conflicts(source: InitSource, given: dict[str, Any]) -> str | None:
    """Why the given model fields cannot apply to the source's weights, or None."""
    for name, value in given.items():
        if name in RUNTIME_FIELDS or name in TOKEN_ID_FIELDS or name not in source.fields:
            continue
        have = source.fields[name]
        if name == "vocab_size" and value >= have:
            continue  # growing the vocabulary is an explicit resize: new rows are initialised
        if name == "max_seq_len" and source.family == "t5":
            continue  # relative positions: a cap on the data, not a shape
        if value != have:
            return (
                f"model.{name}: {value!r} conflicts with model.init_from {source.path} ({have!r}); "
                f"its weights have that shape: remove model.{name}"
            )
    return None


# ----------------------------------------------------------------------------------------------- weights


class _SafetensorsFiles:
    """The tensors of safetensors files (one, or a sharded checkpoint's), each read only when asked for.

    A file is opened for one tensor at a time: safetensors maps the file, and the pages a read touches stay in
    the process's resident set while the mapping lives, so a handle kept open across the whole load would
    end up holding the whole file. Re-opening costs one header parse per tensor.
    """

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                stored = f.keys()  # a safe_open handle is not iterable
                for key in stored:
                    self._file[key] = file
                    self._shape[key] = tuple(f.get_slice(key).get_shape())

    def names(self) -> set[str]:
        return set(self._file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def get(self, key: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file[key]), framework="pt") as f:
            return f.get_tensor(key)


class _Loaded:
    """A whole state dict already in memory (a source that cannot be read one tensor at a time)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self._state = state

    def names(self) -> set[str]:
        return set(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def get(self, key: str) -> Tensor:
        return self._state[key]


class SourceWeights:
    """`model.init_from`'s tensors under our parameter names, read one at a time when a build asks for them.

    Opening reads only file headers and checks names and shapes against the model's (ConfigError, one line),
    so a rank that fills its shards from here holds its shards plus one source tensor, never the model.
    """

    def __init__(
        self, label: str, store: _SafetensorsFiles | _Loaded, rules: dict[str, Rule], family: str
    ) -> None:
        from models.hf import assembled_shape, vocabulary_tensors

        self._label = label
        self._store = store
        self._rules = rules  # our name -> the rule that assembles it from the store's tensors
        self._vocabulary = vocabulary_tensors(family)  # the tables model.vocab_size and vocab_multiple resize
        self.shapes = {n: assembled_shape(r, [store.shape(k) for k in r.theirs]) for n, r in rules.items()}
        self.notes: list[str] = []  # for the run's log: resized tables, a source read whole

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a model (its parameters' shapes by name) the source cannot fill; note the resized tables."""
        missing = sorted(set(shapes) - set(self.shapes))
        if missing:
            raise ConfigError(f"model.init_from: {self._label} lacks {', '.join(missing[:3])}")
        extra = sorted(set(self.shapes) - set(shapes))
        if extra:
            raise ConfigError(
                f"model.init_from: {self._label} has {', '.join(extra[:3])}, which this run's model has not"
            )
        for name, shape in shapes.items():
            if self._resized(name, shape):
                have = self.shapes[name][0]
                what = "new rows initialised" if shape[0] > have else "padding rows left out"
                self.notes.append(f"init_from resized {name}: {have} -> {shape[0]} rows ({what})")

    def _resized(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether `name` is a table with a row per token whose rows differ from the source's: a vocabulary
        grown by model.vocab_size, or padded to another model.vocab_multiple. Fewer rows than the source's
        drop only padding: the config refuses a vocab_size below the source's (`conflicts`)."""
        have = self.shapes[name]
        if have == tuple(shape):
            return False
        if name in self._vocabulary and have[1:] == tuple(shape[1:]):
            return True
        raise ConfigError(
            f"model.init_from: {name} has shape {have} in {self._label}, {tuple(shape)} in this run's model"
        )

    def value(self, name: str, shape: Sequence[int], initial: Callable[[], Tensor]) -> Tensor:
        """Parameter `name`'s whole starting value (CPU, the source's dtype): the source's tensor or, for a
        resized table, `initial()` with the rows both have copied from the source. Contiguous (ZeRO-3
        flattens it)."""
        from models.hf import assemble

        rule = self._rules[name]
        tensor = assemble(rule, [self._store.get(k) for k in rule.theirs]).contiguous()
        if not self._resized(name, tuple(shape)):
            return tensor
        full = initial()
        rows = min(tensor.shape[0], full.shape[0])
        full[:rows].copy_(tensor[:rows])
        return full


def open_weights(init_from: str | Path, model: nn.Module) -> SourceWeights:
    """The source's weights, checked against `model`'s parameters (the meta device will do) and ready to be
    read one tensor at a time: only headers are read here."""
    weights = _open(init_from)
    weights.check({name: tuple(p.shape) for name, p in model.named_parameters()})
    return weights


def check_weights(init_from: str | Path, model: nn.Module) -> None:
    """`open_weights`'s check, for `pretrain check`: headers only, so a pytorch_model.bin (which only
    loading the whole model can check) is left to the run."""
    source = read_source(init_from)
    if source.kind == "run" or _safetensors_files(source.weights):
        open_weights(init_from, model)


def _open(init_from: str | Path) -> SourceWeights:
    source = read_source(init_from)
    label = str(init_from)
    if source.kind == "run":
        store = _SafetensorsFiles([source.weights])
        return SourceWeights(label, store, {k: _identity(k) for k in store.names()}, source.family)
    files = _safetensors_files(source.weights)
    if files:
        return _transformers_weights(label, source, files)
    state = _read_whole(source)
    weights = SourceWeights(label, _Loaded(state), {k: _identity(k) for k in state}, source.family)
    why = f"{_BIN} cannot be read one tensor at a time"
    weights.notes.append(f"init_from reads {label} whole on every rank ({why})")
    return weights


def _identity(key: str) -> Rule:
    from models.hf import Rule

    return Rule(key, (key,))


def _safetensors_files(directory: Path) -> list[Path]:
    """A transformers directory's safetensors files (several for a sharded checkpoint), or [] for a .bin."""
    index = directory / _INDEXES[0]
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model.init_from: {index} is not a readable index ({e})") from None
        return [directory / name for name in sorted(shards)]
    return [directory / _WEIGHTS] if (directory / _WEIGHTS).is_file() else []


def _transformers_weights(label: str, source: InitSource, files: list[Path]) -> SourceWeights:
    """Our tensors mapped onto the checkpoint's by `from_hf`'s rules (ConfigError if one is not stored).
    Stored tensors no rule reads are ignored, as `from_pretrained` ignores them (buffers older transformers
    saved, such as GPT-2's `attn.bias`)."""
    import torch
    import transformers

    from models.hf import config_from_hf, weight_map

    mapping = weight_map(config_from_hf(transformers.AutoConfig.from_pretrained(source.path)))
    store = _SafetensorsFiles(files)
    stored = store.names()

    def find(key: str) -> str | None:
        return next((n for n in mapping.stored_names(key) if n in stored), None)

    def find_part(key: str) -> str | None:
        """A tied alias the checkpoint does not store holds its source's values, as in the transformers model
        (transformers >= 5 ties T5's head even in an untied v1.1 config, and saves `shared.weight` alone)."""
        return find(key) or (find(mapping.tied[key]) if key in mapping.tied else None)

    rules = {}
    for rule in mapping.rules:
        keys = tuple(find_part(k) for k in rule.theirs)
        missing = [k for k, found in zip(rule.theirs, keys, strict=True) if found is None]
        if missing:
            raise ConfigError(f"model.init_from: {label} lacks {missing[0]}")
        rules[rule.ours] = dataclasses.replace(rule, theirs=keys)
    read = {k for r in rules.values() for k in r.theirs}
    for alias, tied_to in mapping.tied.items():
        # as from_hf: an alias we do not read must really be tied, or we would silently drop its values
        stored_alias, stored_source = find(alias), find(tied_to)
        if stored_alias is None or stored_alias in read or stored_source is None:
            continue
        if not torch.equal(store.get(stored_alias), store.get(stored_source)):
            raise ConfigError(
                f"model.init_from: {label}: {alias} differs from {tied_to}; this untied variant is not supported"
            )
    return SourceWeights(label, store, rules, source.family)


def _read_whole(source: InitSource) -> dict[str, Tensor]:
    """The transformers model loaded whole and converted (a source without safetensors files)."""
    import transformers

    from models.hf import HF_CLASSES, from_hf

    hf_class = getattr(transformers, HF_CLASSES[source.family])
    try:
        hf_model, info = hf_class.from_pretrained(source.weights, dtype="auto", output_loading_info=True)
        state = from_hf(hf_model, attention="eager").state_dict()
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from: {source.path}: {str(e).splitlines()[0]}") from None
    missing = sorted(info["missing_keys"])  # transformers would start these from its own random init
    if missing:
        raise ConfigError(f"model.init_from: {source.path} lacks {', '.join(missing[:3])}")
    return state

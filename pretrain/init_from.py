"""`model.init_from`: a run that starts from existing weights (continued pretraining, a second phase).

A source is a `transformers` directory (config.json + weights of GPT2LMHeadModel, BertForMaskedLM or
T5ForConditionalGeneration) or one of our runs: a run directory (its newest intact checkpoint) or one
`checkpoints/step_N`. The architecture is read from the source, so no preset is needed; the tokenizer is the
source's unless `data.tokenizer` names another; only the weights are taken (optimizer, schedule and data start
afresh). At config time only small files are read (config.json, config.yaml, the safetensors header), so
`pretrain check` stays fast; `load_weights` reads the weights once the model exists.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

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
    }
)
# Filled from the run's tokenizer, as for a preset.
TOKEN_ID_FIELDS = frozenset({"pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"})
_WEIGHTS = "model.safetensors"


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
    if not any((path / name).is_file() for name in (_WEIGHTS, "model.safetensors.index.json")):
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
    fields["vocab_size"] = _embedding_rows(checkpoint / _WEIGHTS)  # the tokenizer set it in that run
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


def _embedding_rows(weights: Path) -> int:
    """Rows of `embed.tokens.weight`, from the safetensors header alone (no tensor is read)."""
    try:
        with weights.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return int(header["embed.tokens.weight"]["shape"][0])
    except (OSError, ValueError, KeyError, struct.error) as e:
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


def read_weights(init_from: str | Path) -> dict[str, Tensor]:
    """The source's weights under our parameter names, on CPU, in the dtype they were saved in."""
    source = read_source(init_from)
    if source.kind == "run":
        from safetensors.torch import load_file

        return load_file(str(source.weights))
    import transformers

    from models.hf import HF_CLASSES, from_hf

    hf_class = getattr(transformers, HF_CLASSES[source.family])
    hf_model = hf_class.from_pretrained(source.weights, dtype="auto")
    return from_hf(hf_model, attention="eager").state_dict()


def load_weights(model: nn.Module, init_from: str | Path) -> list[str]:
    """Copy the source's weights into `model` (a plain module, before an engine wraps it); notes to print.

    Tensors whose first dimension is the vocabulary may be larger in `model` (an explicit `model.vocab_size`
    resize): the source fills the first rows and the rest keep their initialisation.
    """
    import torch

    source = read_weights(init_from)
    own = model.state_dict()
    notes = []
    with torch.no_grad():
        for name, tensor in source.items():
            target = own[name]
            if target.shape == tensor.shape:
                target.copy_(tensor)
            elif target.shape[1:] == tensor.shape[1:] and target.shape[0] > tensor.shape[0]:
                target[: tensor.shape[0]].copy_(tensor)
                notes.append(f"{name}: {tensor.shape[0]} -> {target.shape[0]} rows (new rows initialised)")
            else:
                raise ConfigError(
                    f"model.init_from: {name} has shape {tuple(tensor.shape)} in {init_from}, "
                    f"{tuple(target.shape)} in this run's model"
                )
    missing = sorted(set(own) - set(source))
    if missing:
        raise ConfigError(f"model.init_from: {init_from} lacks {', '.join(missing[:3])}")
    return notes

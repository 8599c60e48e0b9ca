"""`pretrain config`: the resolved run config, one line per key with its value, default and documentation.

Everything comes from the dataclasses themselves (each field's `metadata["doc"]` and default), so the listing
cannot drift from what the loader accepts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from models.config import PRESETS
from pretrain.config import RunConfig

_FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def describe(cfg: RunConfig) -> str:
    """The listing: `key: value  # doc (default: X)`, sections in the order of the file."""
    lines = [f"# resolved run config (family {cfg.model.family}, objective {cfg.objective})"]
    model = cfg.model.config
    # "default" for a model field is the preset's (or init_from's) value (display only: already resolved)
    preset_defaults = {f.name: f.default for f in dataclasses.fields(model)}
    if cfg.model.init_from is None:
        lines.append(
            _line("model.preset", cfg.model.preset, "a name from models/config.py", dataclasses.MISSING)
        )
        preset_defaults |= PRESETS[cfg.model.preset][1]
    else:
        doc = "start from these weights (a transformers directory, a run directory or a checkpoint)"
        lines.append(_line("model.init_from", cfg.model.init_from, doc, None))
        preset_defaults |= cfg.model.source_fields
    for f in dataclasses.fields(model):
        if not f.init:
            continue
        doc = f.metadata.get("doc", "")
        if f.name in _FROM_TOKENIZER and f.name not in cfg.model.given and cfg.modality is None:
            doc = f"{doc}; filled from the tokenizer at training start".lstrip("; ")
        lines.append(_line(f"model.{f.name}", getattr(model, f.name), doc, preset_defaults[f.name]))
    for f in dataclasses.fields(cfg):
        if f.name == "model":
            continue
        value = getattr(cfg, f.name)
        if f.name == "data":  # only the keys this objective reads (text, image or speech settings)
            lines += _section(f.name, value, skip=_unread_data_keys(str(cfg.objective)))
        elif dataclasses.is_dataclass(value):
            lines += _section(f.name, value)
        else:
            lines.append(_line(f.name, value, f.metadata.get("doc", ""), f.default))
    return "\n".join(lines)


def _unread_data_keys(objective: str) -> set[str]:
    from data.config import FIELD_OBJECTIVES

    return {name for name, users in FIELD_OBJECTIVES.items() if objective not in users}


def _section(prefix: str, section: Any, skip: set[str] = frozenset()) -> list[str]:
    lines = []
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if not f.init or f.name in skip:
            continue
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(_unwrap(hints.get(f.name))):
            lines += _section(key, value)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(_line(key, value, f.metadata.get("doc", ""), default))
    return lines


def _unwrap(annotation: Any) -> Any:
    for arg in typing.get_args(annotation) or (annotation,):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _line(key: str, value: Any, doc: str, default: Any) -> str:
    shown = f"{key}: {_show(value)}"
    notes = [doc] if doc else []
    if default is not dataclasses.MISSING and default is not None and _show(default) != _show(value):
        notes.append(f"default: {_show(default)}")
    elif default is None and value is not None:
        notes.append("default: null")
    return f"{shown:<44} # {'; '.join(notes)}" if notes else shown


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value) if not isinstance(value, str) else value
    except TypeError:
        return str(value)

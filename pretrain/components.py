"""The run config -> the components' own inputs (tokenizer, model), shared by training and export.

The tokenizer decides the vocabulary size and special-token ids, so the model is always built from both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from pretrain.config import ConfigError, RunConfig

TOKENIZER_DIR = "tokenizer"


def model_overrides(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """`models.get_config` overrides: the config's model fields, plus vocabulary and ids from the tokenizer."""
    from models.config import PRESETS

    fields = {f.name for f in dataclasses.fields(PRESETS[cfg.model.preset][0])}
    overrides = cfg.model.overrides()
    vocab_size = overrides.get("vocab_size", len(tokenizer))
    if vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    ids = {
        "vocab_size": vocab_size,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    return overrides | {k: v for k, v in ids.items() if k in fields and v is not None}


def model_family(cfg: RunConfig) -> str:
    from models.config import PRESETS

    return PRESETS[cfg.model.preset][0].family


def build_tokenizer(cfg: RunConfig, run_dir: Path) -> PreTrainedTokenizerFast:
    """Train (or load) the run's tokenizer and keep it in RUN_DIR/tokenizer, so resume and export reuse it."""
    import data

    return data.build_tokenizer(cfg.data_config(), family=model_family(cfg), out_dir=run_dir / TOKENIZER_DIR)


def build_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast, *, init: bool = True) -> Any:
    """The run's model (initialised from torch's current seed unless `init=False`)."""
    import models

    config = models.get_config(cfg.model.preset, **model_overrides(cfg, tokenizer))
    return models.build_from_config(config, init=init)

"""`build_model(preset, **overrides)`: the one way the rest of the system makes a model."""

from __future__ import annotations

from typing import Any

from models.base import LanguageModel
from models.config import ModelConfig, get_config


def model_class(family: str) -> type[LanguageModel]:
    from models.bert import BERT
    from models.gpt import GPT
    from models.t5 import T5

    return {"gpt": GPT, "bert": BERT, "t5": T5}[family]


def build_from_config(config: ModelConfig, *, init: bool = True) -> LanguageModel:
    """The model for `config`, initialised (deterministic given torch's seed) unless `init=False`."""
    model = model_class(config.family)(config)
    if init:
        model.init_weights()
    return model


def build_model(preset: str, **overrides: Any) -> LanguageModel:
    """The preset's model with config fields overridden; unknown preset/field -> ValueError naming it."""
    return build_from_config(get_config(preset, **overrides))

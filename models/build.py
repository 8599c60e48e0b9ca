"""`build_model(preset, **overrides)`: the one way the rest of the system makes a model."""

from __future__ import annotations

from typing import Any

import torch

from models.base import LanguageModel
from models.config import ModelConfig, get_config


def model_class(family: str) -> type[LanguageModel]:
    from models.bert import BERT
    from models.conformer import Conformer
    from models.gpt import GPT
    from models.swin import Swin
    from models.t5 import T5
    from models.vit import ViTMAE, ViTSimMIM

    classes = {"gpt": GPT, "bert": BERT, "t5": T5}
    classes.update(vit_mae=ViTMAE, vit_simmim=ViTSimMIM, swin=Swin, conformer=Conformer)
    return classes[family]


def build_from_config(config: ModelConfig, *, init: bool = True, seed: int | None = None) -> LanguageModel:
    """The model for `config`, initialised by `init_weights(seed)` unless `init=False` (then PyTorch's defaults).

    With `init`, the modules are created on the meta device first: no time is spent on default
    initialisation that `init_weights` overwrites. The weights depend only on `seed` (None: one drawn from
    torch's global RNG), exactly as a sharded engine's meta build that initialises only its own slices.
    """
    cls = model_class(config.family)
    if not init:
        return cls(config)
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device=torch.get_default_device())
    model.init_weights(seed)
    return model


def build_model(preset: str, **overrides: Any) -> LanguageModel:
    """The preset's model with config fields overridden; unknown preset/field -> ValueError naming it."""
    return build_from_config(get_config(preset, **overrides))

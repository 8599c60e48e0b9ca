"""The run config's resolved parts -> the components (tokenizer, model), shared by training and export.

The tokenizer decides the vocabulary size and special-token ids, so the model is always built from both:
`ModelSection.for_tokenizer` is the one place that fills them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.config import ModelSection, RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from data import DataConfig
    from models.base import LanguageModel
    from models.config import ModelConfig
    from pretrain.engines import ModelRecipe

TOKENIZER_DIR = "tokenizer"


def build_tokenizer(data: DataConfig, family: str, run_dir: Path) -> PreTrainedTokenizerFast:
    """Train (or load) the run's tokenizer and keep it in RUN_DIR/tokenizer, so resume and export reuse it."""
    import data as data_lib

    return data_lib.build_tokenizer(data, family=family, out_dir=run_dir / TOKENIZER_DIR)


def build_model(
    model: ModelSection, tokenizer: PreTrainedTokenizerFast, *, init: bool = True
) -> LanguageModel:
    """The run's model (initialised from torch's current seed unless `init=False`)."""
    import models

    return models.build_from_config(model.for_tokenizer(tokenizer), init=init)


def model_recipe(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerFast, *, init_from: bool = True
) -> ModelRecipe:
    """What the engine builds the run's model from: weights seeded by train.seed (per parameter name, so
    they do not depend on the engine or the world size), or `model.init_from`'s (unless `init_from=False`: a
    resumed run restores its own), checked against the model's shapes before anything is built."""
    from pretrain.engines import ModelRecipe

    config = cfg.model.for_tokenizer(tokenizer)
    weights = None
    if init_from and cfg.model.init_from is not None:
        from pretrain.init_from import open_weights

        weights = open_weights(cfg.model.init_from, meta_model(config))
    return ModelRecipe(config=config, seed=cfg.train.seed, compile=cfg.train.compile, weights=weights)


def meta_model(config: ModelConfig) -> LanguageModel:
    """The model's modules on the meta device: shapes, parameter counts and FLOPs, no memory."""
    import torch

    import models

    with torch.device("meta"):
        return models.build_from_config(config, init=False)

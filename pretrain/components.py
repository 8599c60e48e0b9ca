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


def load_init_weights(model: LanguageModel, section: ModelSection) -> list[str]:
    """`model.init_from`'s weights copied into the freshly built model, before an engine wraps it; notes to print.

    A separate step so that an engine which builds its model sharded can apply the same state dict itself.
    """
    from pretrain.init_from import load_weights

    assert section.init_from is not None
    return load_weights(model, section.init_from)


def model_recipe(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> ModelRecipe:
    """What the engine builds the run's model from: weights seeded by train.seed (per parameter name, so
    they do not depend on the engine or the world size)."""
    from pretrain.engines import ModelRecipe

    return ModelRecipe(
        config=cfg.model.for_tokenizer(tokenizer), seed=cfg.train.seed, compile=cfg.train.compile
    )


def meta_model(config: ModelConfig) -> LanguageModel:
    """The model's modules on the meta device: shapes, parameter counts and FLOPs, no memory."""
    import torch

    import models

    with torch.device("meta"):
        return models.build_from_config(config, init=False)

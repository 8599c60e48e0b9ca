"""Model library: GPT, BERT and T5 built from shared blocks, numerically identical to transformers."""

from models.build import build_from_config, build_model
from models.config import PRESETS, BERTConfig, GPTConfig, ModelConfig, T5Config, get_config
from models.hf import from_hf, to_hf
from models.outputs import ModelOutput

__all__ = [
    "PRESETS",
    "BERTConfig",
    "GPTConfig",
    "ModelConfig",
    "ModelOutput",
    "T5Config",
    "build_from_config",
    "build_model",
    "from_hf",
    "get_config",
    "to_hf",
]

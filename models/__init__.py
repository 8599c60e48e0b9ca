"""Model library: GPT, BERT and T5 built from shared blocks, numerically identical to transformers.

The configs import without torch, and the rest loads on first use, so that a run config is validated (presets,
field names, values) before torch is imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from models.config import PRESETS, BERTConfig, GPTConfig, ModelConfig, T5Config, get_config

if TYPE_CHECKING:
    from models.base import SampleShape
    from models.build import build_from_config, build_model
    from models.hf import from_hf, to_hf
    from models.outputs import ModelOutput

_LAZY = {
    "SampleShape": "models.base",
    "build_from_config": "models.build",
    "build_model": "models.build",
    "from_hf": "models.hf",
    "to_hf": "models.hf",
    "ModelOutput": "models.outputs",
}

__all__ = [
    "PRESETS",
    "BERTConfig",
    "GPTConfig",
    "ModelConfig",
    "ModelOutput",
    "SampleShape",
    "T5Config",
    "build_from_config",
    "build_model",
    "from_hf",
    "get_config",
    "to_hf",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

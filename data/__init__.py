"""Data pipeline: sources -> shards per rank/worker -> tokenizer -> packing -> objectives -> resumable batches.

The heavy parts (torch, transformers) load on first use, so that `data.check_sources`, the resume checks
(`plan_resume`, `merge_states`, `check_fingerprint`) and the config classes are cheap to import for
validating a run config or a resume before anything starts.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from data.config import DataConfig, MixtureComponent
from data.errors import DataError
from data.fingerprint import check_fingerprint, data_fingerprint
from data.layout import Layout, merge_states, plan_resume
from data.sources import check_sources

if TYPE_CHECKING:
    from data.loader import DataPipeline, build_loader
    from data.media_loader import MediaOptions, build_media_loader
    from data.tokenizer import build_tokenizer

_LAZY = {
    "DataPipeline": "data.loader",
    "build_loader": "data.loader",
    "build_tokenizer": "data.tokenizer",
}
_LAZY.update(MediaOptions="data.media_loader", build_media_loader="data.media_loader")

__all__ = [
    "DataConfig",
    "DataError",
    "DataPipeline",
    "Layout",
    "MediaOptions",
    "MixtureComponent",
    "build_loader",
    "build_media_loader",
    "build_tokenizer",
    "check_fingerprint",
    "check_sources",
    "data_fingerprint",
    "merge_states",
    "plan_resume",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")

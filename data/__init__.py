"""Data pipeline: sources -> shards per rank/worker -> tokenizer -> packing -> objectives -> resumable batches."""

from data.config import DataConfig, MixtureComponent
from data.errors import DataError
from data.loader import DataPipeline, build_loader
from data.tokenizer import build_tokenizer

__all__ = ["DataConfig", "DataError", "DataPipeline", "MixtureComponent", "build_loader", "build_tokenizer"]

"""`pretrain data prepare CONFIG OUT_DIR`: pre-tokenise the config's corpus into shards a run can stream."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pretrain.components import build_tokenizer
from pretrain.config import RunConfig


def prepare(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Train (or load) the family's tokenizer, then write the shards; prints and returns the summary."""
    from data.prepare import prepare_shards
    from pretrain.errors import ConfigError

    if cfg.modality is not None:
        raise ConfigError(
            f"data prepare: prepared shards hold tokenised text; {cfg.model.origin} reads {cfg.modality} files, which "
            "its loader decodes from data.source as it trains (nothing to prepare)"
        )
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(cfg.data, cfg.model.family, Path(scratch))
    summary = prepare_shards(cfg.data, out_dir, tokenizer=tokenizer, num_procs=max(1, os.cpu_count() or 1))
    print(json.dumps(summary, indent=1))
    print(f"use it with: data.source={out_dir}")
    return summary

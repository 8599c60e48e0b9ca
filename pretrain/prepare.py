"""`pretrain data prepare CONFIG OUT_DIR`: pre-tokenise the config's corpus into shards a run can stream."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pretrain.components import model_family
from pretrain.config import RunConfig


def prepare(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Train (or load) the family's tokenizer, then write the shards; prints and returns the summary."""
    import data
    from data.prepare import prepare_shards

    data_cfg = cfg.data_config()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = data.build_tokenizer(data_cfg, family=model_family(cfg), out_dir=Path(scratch))
    summary = prepare_shards(data_cfg, out_dir, tokenizer=tokenizer, num_procs=max(1, os.cpu_count() or 1))
    print(json.dumps(summary, indent=1))
    print(f"use it with: data.source={out_dir}")
    return summary

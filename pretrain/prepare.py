"""`pretrain data prepare CONFIG OUT_DIR`: pre-tokenise the config's corpus, or decode its images or audio,
into shards a run can stream."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pretrain.components import build_tokenizer
from pretrain.config import RunConfig


def prepare(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Train (or load) the family's tokenizer, then write the shards (text), or decode the images / audio
    for the model's channels, image size or sample rate; prints and returns the summary."""
    from data.prepare import prepare_shards

    num_procs = max(1, os.cpu_count() or 1)
    if cfg.modality is not None:
        summary = _prepare_media(cfg, out_dir, num_procs)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = build_tokenizer(cfg.data, cfg.model.family, Path(scratch))
        summary = prepare_shards(cfg.data, out_dir, tokenizer=tokenizer, num_procs=num_procs)
    print(json.dumps(summary, indent=1))
    print(f"use it with: data.source={out_dir}")
    return summary


def _prepare_media(cfg: RunConfig, out_dir: Path, num_procs: int) -> dict[str, Any]:
    from data.media_prepare import MediaSettings, default_short_side, prepare_media_shards
    from pretrain.errors import ConfigError

    model: Any = cfg.model.config
    if cfg.modality == "audio":
        settings = MediaSettings(modality="audio", sample_rate=model.sample_rate)
    else:
        side = cfg.data.prepared_image_size or default_short_side(model.image_size)
        if side < model.image_size:
            raise ConfigError(
                f"data.prepared_image_size: {side} is smaller than the model's image ({model.image_size}, "
                f"from {cfg.model.origin}); accepted: >= {model.image_size}"
            )
        settings = MediaSettings(modality="image", channels=model.num_channels, short_side=side)
    return prepare_media_shards(cfg.data, out_dir, settings=settings, num_procs=num_procs)

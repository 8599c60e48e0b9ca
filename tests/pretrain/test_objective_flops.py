"""The FLOPs per token behind `pretrain train`'s MFU follow the objective's data settings.

The tiny models and their hand counts are those of tests/models/test_flops.py (seq_len 16).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import models
from pretrain.config import load_config
from pretrain.loop import objective_flops_per_token
from tests.pretrain.helpers import write_yaml

TINY = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, d_ff=8)


@pytest.mark.parametrize(
    ("preset", "model_fields", "data", "expected"),
    [
        ("gpt-tiny", {"max_seq_len": 16}, [], 2088),  # unchanged: the head runs at every position
        ("bert-tiny", {"max_seq_len": 16}, ["data.mlm_probability=0.25"], 1965),  # head at 25% of positions
        ("t5-tiny", {"d_kv": 3, "relative_buckets": 5}, [], 3439.5),  # span targets: 5 tokens for 16 inputs
    ],
)
def test_mfu_flops_follow_the_objective(
    preset: str, model_fields: dict, data: list[str], expected: float, tmp_path: Path
) -> None:
    config = write_yaml(tmp_path / "run.yaml", f"model:\n  preset: {preset}\n")
    cfg = load_config(config, ["data.seq_len=16", *data])
    model = models.build_model(preset, **TINY, **model_fields)
    assert objective_flops_per_token(model, cfg) == expected


@pytest.mark.parametrize(
    ("preset", "clip"),
    [("vit-tiny-mae", []), ("swin-tiny-simmim", []), ("conformer-tiny", ["data.clip_seconds=0.5"])],
)
def test_media_flops_per_patch_or_frame_match_what_torch_counts(
    preset: str, clip: list[str], tmp_path: Path
) -> None:
    """Image models: FLOPs per patch of the whole grid; speech: per frame of a data.clip_seconds clip (what
    tokens/s counts for them), within 8% of torch's own count of one training step's forward and backward
    (eager attention: the whole score matrix, as the FLOPs convention counts it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(
        write_yaml(tmp_path / "run.yaml", f"model:\n  preset: {preset}\n"), ["model.attention=eager", *clip]
    )
    torch.manual_seed(0)
    model = models.build_from_config(cfg.model.config)
    c, batch = model.config, 2
    if cfg.modality == "audio":
        frames = c.num_frames(8000)
        masked = torch.rand(batch, frames) < 0.3
        labels = torch.where(masked, torch.randint(0, c.vocab_size, (batch, frames)), -100)
        inputs = dict(input_values=torch.randn(batch, 8000), mask_time_indices=masked, labels=labels)
    else:
        patches, pixels = c.grid_size**2, torch.randn(batch, 3, c.image_size, c.image_size)
        inputs = dict(pixel_values=pixels, bool_masked_pos=torch.rand(batch, patches) < 0.5)
        if c.family == "vit_mae":
            inputs = dict(pixel_values=pixels, noise=torch.rand(batch, patches))
    assert cfg.sample_len == (c.num_frames(8000) if cfg.modality == "audio" else c.grid_size**2)
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    counted = counter.get_total_flops() / (batch * cfg.sample_len)
    assert objective_flops_per_token(model, cfg) == pytest.approx(counted, rel=0.08)

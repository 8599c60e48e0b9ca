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

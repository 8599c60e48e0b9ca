"""Initial weights built by each engine from a recipe, gathered to rank 0: run alone or under torchrun.

`python init_worker.py OUT_DIR ENGINE:FAMILY [...]` (ENGINE an `engines_worker.CASES` name, e.g. ds-z3:bert):
the engine builds the family's tiny model from `ModelRecipe(seed=SEED)` and rank 0 writes
OUT_DIR/ENGINE-FAMILY-wWORLD.safetensors (the gathered initial weights) and .json (the share of parameter
elements rank 0 holds).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from models import get_config
from pretrain.engines import ModelRecipe, build_engine, end_process, init_distributed, shutdown
from tests.pretrain import engines_worker as cases

SEED = 7


def recipe(family: str) -> ModelRecipe:
    overrides = (
        cases.MODEL_OVERRIDES if family == "t5" else {**cases.MODEL_OVERRIDES, "max_seq_len": cases.SEQ}
    )
    return ModelRecipe(config=get_config(f"{family}-tiny", **overrides), seed=SEED)


def main(out_dir: Path, names: list[str]) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    dist = init_distributed(timeout_s=120)
    try:
        for name in names:
            case, family = name.split(":")
            spec, _ = cases.case_spec(case)
            engine = build_engine(spec, recipe(family), dist)
            fraction = cases.local_param_fraction(engine.model)
            state = engine.full_state_dict()
            if dist.is_main:
                stem = out_dir / f"{case}-{family}-w{dist.world_size}"
                save_file({k: v.contiguous() for k, v in state.items()}, f"{stem}.safetensors")
                stem.with_suffix(".json").write_text(json.dumps({"local_param_fraction": fraction}))
            del engine
    finally:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    end_process()

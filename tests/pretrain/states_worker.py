"""Each engine's own report of what a rank holds between steps: `python states_worker.py OUT CASE [CASE ...]`.

Under torchrun: every engine case (`engines_worker.CASES`) builds the tiny GPT from a recipe, runs one step
(so the optimizer's tensors exist), and rank 0 writes OUT/CASE.json with `Engine.model_state_bytes()`,
`Engine.gradient_bytes()` as the AdamW update starts, and the parameter count, for the test to compare with
`pretrain.plan`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import Tensor

from pretrain.engines import Engine, build_engine, end_process, init_distributed, shutdown
from tests.pretrain import engines_worker as cases
from tests.pretrain import init_worker


def step_gradient_bytes(engine: Engine, batches: list[dict[str, Tensor]]) -> int:
    """Train one step; the most gradient bytes the engine held as an AdamW update started (DeepSpeed may call
    AdamW once per parameter group)."""
    held: list[int] = []
    hook = engine._optimizer.register_step_pre_hook(lambda *_: held.append(engine.gradient_bytes()))
    engine.train_step(batches)
    hook.remove()
    return max(held)


def main(out: Path, names: list[str]) -> None:
    dist = init_distributed(timeout_s=120)
    try:
        for case in names:
            spec, family = cases.case_spec(case)
            recipe = init_worker.recipe(family)
            engine = build_engine(spec, recipe, dist)
            grads = step_gradient_bytes(engine, cases.micro_batches(family, 0, dist.rank))
            held = {**engine.model_state_bytes(), "grads": grads}
            n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.model.parameters())  # ZeRO-3: own size
            if dist.is_main:
                (out / f"{case}.json").write_text(json.dumps({"n": n, "world": dist.world_size, **held}))
            del engine
    finally:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    end_process()

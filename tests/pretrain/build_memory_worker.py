"""How much memory each rank allocates while an engine builds the model: `python build_memory_worker.py OUT`.

Run under torchrun with glibc told to serve every allocation of 64 KiB or more from mmap and to give freed
memory back at once (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so the resident set follows
the live tensors. For each engine the process first builds a tiny model (paying the engine's one-time
set-up), then resets the kernel's high-water mark and builds MODEL: the growth of the high-water mark over
the resident set before the build is what building took. Each rank writes OUT/rank{R}.json.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from models import get_config
from pretrain.engines import ModelRecipe, build_model, init_distributed, shutdown
from tests.pretrain import engines_worker as cases

ENGINES = ("ds-z3", "fsdp", "ddp")
MODEL = dict(vocab_size=1024, n_layers=6, d_model=512, n_heads=8, d_ff=2048, max_seq_len=64)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(out: Path) -> None:
    dist = init_distributed(timeout_s=120)
    result: dict[str, int] = {}
    try:
        for case in ENGINES:
            spec, _ = cases.case_spec(case)
            warm = build_model(spec, ModelRecipe(config=get_config("gpt-tiny", vocab_size=64), seed=0), dist)
            del warm
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
            before = _status_kib("VmRSS")
            model = build_model(spec, ModelRecipe(config=get_config("gpt-tiny", **MODEL), seed=0), dist)
            result[case] = (_status_kib("VmHWM") - before) * 1024
            result["full_model_bytes"] = 4 * sum(
                getattr(p, "ds_numel", p.numel()) for p in model.parameters()
            )
            del model
            gc.collect()
    finally:
        shutdown()
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

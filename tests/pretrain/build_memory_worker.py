"""How much memory each rank allocates while an engine builds the model: `python build_memory_worker.py OUT
[LABEL=SOURCE ...]`, each SOURCE a `model.init_from` directory (`make_sources` writes two).

Run under torchrun with glibc told to serve every allocation of 64 KiB or more from mmap and to give freed
memory back at once (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so the resident set follows
the live tensors. For each engine the process first builds a tiny model (paying the engine's one-time
set-up), then resets the kernel's high-water mark and builds MODEL, seeded and then from each source
(opening the source included): the growth of the high-water mark over the resident set before the build is
what building (and loading) took. Pages of a mapped safetensors file count in the resident set like
allocations. Each rank writes OUT/rank{R}.json: {"full_model_bytes": N, "largest_parameter_bytes": M,
LABEL: {engine: bytes}}, LABEL "seeded" for the build without a source.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import yaml

from models import build_from_config, get_config
from models.config import ModelConfig
from pretrain.components import meta_model
from pretrain.config import resolve_model
from pretrain.engines import ModelRecipe, build_model, end_process, init_distributed, shutdown
from pretrain.init_from import open_weights
from tests.pretrain import engines_worker as cases

ENGINES = ("ds-z3", "fsdp", "ddp")
MODEL = dict(vocab_size=1024, n_layers=6, d_model=512, n_heads=8, d_ff=2048, max_seq_len=64)


def make_sources(root: Path) -> dict[str, Path]:
    """MODEL's architecture as a transformers GPT-2 directory and as one of our checkpoints."""
    import torch
    import transformers
    from safetensors.torch import save_file

    hf_config = transformers.GPT2Config(
        vocab_size=MODEL["vocab_size"], n_embd=MODEL["d_model"], n_layer=MODEL["n_layers"],
        n_head=MODEL["n_heads"], n_inner=MODEL["d_ff"], n_positions=MODEL["max_seq_len"], bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(root / "transformers")
    run = root / "run"
    checkpoint = run / "checkpoints" / "step_0"
    checkpoint.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "gpt-tiny", **MODEL}}))
    model = build_from_config(get_config("gpt-tiny", **MODEL), seed=1)
    save_file(model.state_dict(), str(checkpoint / "model.safetensors"))
    return {"transformers": root / "transformers", "run": checkpoint}


def _recipe(source: str | None, config: ModelConfig) -> ModelRecipe:
    """Opening the source (headers only) is part of what is measured."""
    weights = None if source is None else open_weights(source, meta_model(config))
    return ModelRecipe(config=config, seed=0, weights=weights)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(out: Path, sources: dict[str, str | None]) -> None:
    dist = init_distributed(timeout_s=120)
    result: dict = {label: {} for label in sources}
    # read once before measuring: the first reading imports transformers' config code (a fixed ~6 MiB)
    configs = {label: get_config("gpt-tiny", **MODEL) for label in sources}
    for label, source in sources.items():
        if source is not None:
            configs[label] = resolve_model({"init_from": source}).config
            open_weights(source, meta_model(configs[label]))
    try:
        for case in ENGINES:
            spec, _ = cases.case_spec(case)
            warm = build_model(spec, ModelRecipe(config=get_config("gpt-tiny", vocab_size=64), seed=0), dist)
            del warm
            for label, source in sources.items():
                gc.collect()
                Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
                before = _status_kib("VmRSS")
                model = build_model(spec, _recipe(source, configs[label]), dist)
                result[label][case] = (_status_kib("VmHWM") - before) * 1024
                sizes = [4 * getattr(p, "ds_numel", p.numel()) for p in model.parameters()]
                result["full_model_bytes"], result["largest_parameter_bytes"] = sum(sizes), max(sizes)
                del model
    finally:
        shutdown()
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    given = dict(arg.split("=", 1) for arg in sys.argv[2:])
    main(Path(sys.argv[1]), {"seeded": None, **given})
    end_process()

"""Training-step time of our models against transformers' on the same weights, batch and optimizer.

For each family a randomly initialised transformers model (dropout 0) is converted with
`models.from_hf` (attention "auto", as `pretrain train` uses); both get the AdamW `pretrain train` builds,
and full steps (forward, backward, AdamW update) alternate in one process on the same batch. The table
shows median seconds per step and transformers' time / ours (> 1 = ours faster).

    .venv/bin/python -m bench.train_step                  # fp32 + bf16 autocast, 3 warmup + 10 timed
    .venv/bin/python -m bench.train_step --quick          # smaller models, fewer steps
    .venv/bin/python -m bench.train_step --compile        # adds compiled rows (regional; whole models)
    .venv/bin/python -m bench.train_step --profile gpt    # top ops of each model, and the matmul floor
"""

from __future__ import annotations

import argparse

import torch

from bench._common import (
    FAMILIES,
    QUICK,
    SMALL,
    adamw,
    hf_model,
    interleaved,
    make_batch,
    median,
    print_table,
    train_step_fn,
)
from models import from_hf


def model_pair(family: str, shape) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(ours, theirs, |loss difference| before training): the same weights in both."""
    theirs = hf_model(family, shape)
    ours = from_hf(theirs)
    theirs.train(), ours.train()
    batch = make_batch(family, shape)
    with torch.no_grad():
        diff = abs(ours(**batch).loss.item() - theirs(**batch).loss.item())
    return ours, theirs, diff


COMPILE_LABELS = {
    None: "",
    "blocks": " ours train.compile",  # ours as `pretrain train train.compile=true` runs it, theirs eager
    "both": " both torch.compile",  # each whole model compiled
}


def run_row(
    family: str, shape, precision: str, *, compiled: str | None, warmup: int, steps: int
) -> list[str]:
    label = precision + COMPILE_LABELS[compiled]
    try:
        return _time_row(family, shape, precision, compiled=compiled, warmup=warmup, steps=steps, label=label)
    except Exception as exc:  # one broken row should not hide the others
        return [family, label, "error", "", "", f"{type(exc).__name__}: {str(exc)[:60]}"]


def _time_row(family, shape, precision, *, compiled, warmup, steps, label) -> list[str]:
    ours, theirs, diff = model_pair(family, shape)
    if compiled == "blocks":
        ours.compile_blocks()
    elif compiled == "both":
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    batch = make_batch(family, shape)
    fns = {
        "ours": train_step_fn(ours, batch, precision, adamw(ours)),
        "theirs": train_step_fn(theirs, batch, precision, adamw(theirs)),
    }
    times = interleaved(fns, warmup=warmup, steps=steps)
    t_ours, t_theirs = median(times["ours"]), median(times["theirs"])
    return [
        family,
        label,
        f"{t_ours * 1e3:.0f}",
        f"{t_theirs * 1e3:.0f}",
        f"{t_theirs / t_ours:.2f}x",
        f"{diff:.1e}",
    ]


# The kernels both models run with the same FLOPs: matmuls and the attention kernels (SDPA's fused ones,
# our chunked kernel's tile products, transformers' eager attention's bmm).
FLOOR_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::baddbmm_",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
)


def profile(family: str, shape, precision: str, rows: int) -> None:
    """torch.profiler's top ops (by self CPU time) for one step of ours and of transformers', then the
    floor: the time ours spends in matmul and attention kernels, which no rewrite of the rest can remove.

    The profiler slows op-heavy steps down, so the floor is the profiled share of matmul + attention
    time applied to an unprofiled step's median time.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ours, theirs, _ = model_pair(family, shape)
    batch = make_batch(family, shape)
    step_ms, floor_ms = {}, {}
    for name, model in (("ours", ours), ("transformers", theirs)):
        step = train_step_fn(model, batch, precision, adamw(model))
        step_ms[name] = 1e3 * median(interleaved({name: step}, warmup=2, steps=3)[name])
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        floor = sum(e.self_cpu_time_total for e in events if e.key in FLOOR_OPS)
        floor_ms[name] = step_ms[name] * floor / total
        print(f"\n=== {family} {precision} {name} ===")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    print(f"\n{family} {precision}, median of 3 unprofiled steps:")
    for name in step_ms:
        print(
            f"  {name}: {step_ms[name]:.0f} ms per step, {floor_ms[name]:.0f} ms of it matmul + attention kernels"
        )
    print(
        f"  speed-up now {step_ms['transformers'] / step_ms['ours']:.2f}x; if everything but ours' matmul + "
        f"attention kernels were free: {step_ms['transformers'] / floor_ms['ours']:.2f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2-layer width-128 models, 1 + 3 steps")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--bf16-shape", choices=("quick", "small"), default="quick",
        help="shape of the bf16 rows (default quick: on a CPU without bf16 matrix units they are slow)",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="add fp32 rows: ours with train.compile (regional) vs theirs eager, and both models torch.compile'd",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--profile", metavar="FAMILY", help="print profiler tables instead of timing")
    parser.add_argument("--rows", type=int, default=25, help="ops per profiler table")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (3 if args.quick else 6)
    families, precisions = args.families.split(","), args.precisions.split(",")
    for family in families:
        if family not in FAMILIES:
            parser.error(f"--families: {family!r}; accepted: {', '.join(FAMILIES)}")
    shapes = {"fp32": QUICK if args.quick else SMALL}
    shapes["bf16"] = QUICK if args.quick or args.bf16_shape == "quick" else SMALL
    if args.profile:
        profile(args.profile, shapes[precisions[0]], precisions[0], args.rows)
        return

    print(f"threads: {torch.get_num_threads()}, {warmup} warmup + {steps} timed steps per row")
    for precision in precisions:
        print(f"{precision} shape: {shapes[precision]}")
    rows = []
    for family in families:
        for precision in precisions:
            row = run_row(family, shapes[precision], precision, compiled=None, warmup=warmup, steps=steps)
            rows.append(row + ["quick" if shapes[precision] is QUICK else "small"])
            print(" | ".join(rows[-1]), flush=True)
        if args.compile:
            for mode in ("blocks", "both"):
                row = run_row(family, shapes["fp32"], "fp32", compiled=mode, warmup=warmup, steps=steps)
                rows.append(row + ["quick" if shapes["fp32"] is QUICK else "small"])
                print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(HEADERS, rows)


HEADERS = ["family", "precision", "ours ms", "transformers ms", "speed-up", "|dloss| step 0", "shape"]

if __name__ == "__main__":
    main()

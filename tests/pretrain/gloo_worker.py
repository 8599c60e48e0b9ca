"""torchrun worker: pretrain/engines/gloo.py's in-place reduce-scatter and all-gather (as ZeRO-3 and FSDP2 call
them) against gloo's own, bitwise, on the default group and on a subgroup. Rank 0 writes the comparisons to
OUT_FILE."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from pretrain.engines import end_process, init_distributed
from pretrain.engines.gloo import (
    FSDPAllGather,
    FSDPReduceScatter,
    all_gather_in_place,
    reduce_scatter_in_place,
)

if __name__ == "__main__":
    info = init_distributed(timeout_s=60)
    world = info.world_size
    results = {}
    for name, group in (("default", None), ("subgroup", dist.new_group(list(range(world))))):
        gen = torch.Generator().manual_seed(info.rank)
        full = torch.randn(world * 1000, generator=gen)
        theirs = torch.empty(1000)
        dist.reduce_scatter_tensor(theirs, full.clone(), group=group)
        scratch = full.clone()
        mine = scratch.view(-1).chunk(world)[info.rank]  # DeepSpeed's way: the output is the input's chunk
        reduce_scatter_in_place(mine, scratch, group)
        separate = torch.empty(1000)  # a separate output
        reduce_scatter_in_place(separate, full.clone(), group)
        part = torch.randn(777, generator=gen)
        gathered = torch.empty(world * 777)
        dist.all_gather_into_tensor(gathered, part, group=group)
        out = torch.empty(world * 777)
        out.chunk(world)[info.rank].copy_(part)  # DeepSpeed's way: this rank's part already in place
        all_gather_in_place(out, out.chunk(world)[info.rank], group).wait()
        out2 = torch.full((world * 777,), float("nan"))
        all_gather_in_place(out2, part, group).wait()
        # FSDP2's way: a fresh input, given back once reduced; the all-gather input inside the output
        fsdp_input, fsdp_output = full.clone(), torch.empty(1000)
        FSDPReduceScatter()(fsdp_output, fsdp_input, group or dist.group.WORLD, dist.ReduceOp.SUM)
        fsdp_gathered = torch.full((world * 777,), float("nan"))
        fsdp_gathered.chunk(world)[info.rank].copy_(part)
        FSDPAllGather()(fsdp_gathered, fsdp_gathered.chunk(world)[info.rank], group or dist.group.WORLD)
        results[name] = {
            "reduce_scatter_in_input": torch.equal(mine, theirs),
            "reduce_scatter_separate": torch.equal(separate, theirs),
            "all_gather_in_place": torch.equal(out, gathered),
            "all_gather_separate": torch.equal(out2, gathered),
            "fsdp_reduce_scatter": torch.equal(fsdp_output, theirs),
            "fsdp_reduce_scatter_input_given_back": fsdp_input.untyped_storage().nbytes() == 0,
            "fsdp_all_gather": torch.equal(fsdp_gathered, gathered),
        }
    flags = torch.tensor([all(all(r.values()) for r in results.values())], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if info.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": world, "rank0": results, "all_ranks_equal": bool(flags.item())}, f)
    end_process()

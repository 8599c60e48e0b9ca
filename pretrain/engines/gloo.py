"""ZeRO-3's collectives on gloo (CPU), without gloo's full-size copies.

torch's ProcessGroupGloo reduce-scatters by cloning the whole input, all-reducing the clone and copying this
rank's chunk out (`reduce_scatter_tensor_coalesced`), and all-gathers into a temporary as large as the
output before copying it into place (`allgather`). For ZeRO-3 that is one more copy of the largest
gradient or parameter at the top of a step: GPT-2's 147 MiB tied table (bench/NOTES.md, "The tied table's
gradient, once"). DeepSpeed's buffers are scratch space, so the same results can be computed
in place: an all-reduce of the reduce-scatter input (the traffic gloo sends anyway), and a broadcast of
each rank's chunk into the all-gather output (the same bytes received per rank). Results are bitwise the
same as gloo's: the same all-reduce, and copies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def reduce_scatter_in_place(
    output: Tensor, scratch_input: Tensor, group: dist.ProcessGroup | None = None
) -> None:
    """`output` = this rank's chunk of the reduction of `scratch_input`, which is overwritten."""
    dist.all_reduce(scratch_input, group=group)
    chunks = scratch_input.view(-1).chunk(dist.get_world_size(group=group))
    mine = chunks[dist.get_rank(group=group)]
    if output.data_ptr() != mine.data_ptr():  # DeepSpeed's output is that chunk itself
        output.view(-1).copy_(mine)


def all_gather_in_place(
    output: Tensor, chunk: Tensor, group: dist.ProcessGroup | None = None
) -> torch.Future:
    """All-gather `chunk` into `output` (this rank's part may already be in place): every rank broadcasts
    its part into its slot of `output`. Returns one future for all of them (DeepSpeed calls `wait()`)."""
    parts = output.view(-1).chunk(dist.get_world_size(group=group))
    mine = parts[dist.get_rank(group=group)]
    if mine.data_ptr() != chunk.data_ptr():
        mine.copy_(chunk.view(-1))
    works = [
        dist.broadcast(part, group=group, group_src=src, async_op=True) for src, part in enumerate(parts)
    ]
    return torch.futures.collect_all([work.get_future() for work in works])

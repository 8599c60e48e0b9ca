"""ZeRO-3's and FSDP2's collectives on gloo (CPU), without gloo's full-size copies.

torch's ProcessGroupGloo reduce-scatters by cloning the whole input, all-reducing the clone and copying this
rank's chunk out (`reduce_scatter_tensor_coalesced`), and all-gathers into a temporary as large as the
output before copying it into place (`allgather`). For ZeRO-3 that is one more copy of the largest
gradient or parameter at the top of a step: GPT-2's 147 MiB tied table (bench/NOTES.md, "The tied table's
gradient, once"). DeepSpeed's buffers are scratch space, so the same results can be computed
in place: an all-reduce of the reduce-scatter input (the traffic gloo sends anyway), and a broadcast of
each rank's chunk into the all-gather output (the same bytes received per rank). Results are bitwise the
same as gloo's: the same all-reduce, and copies. FSDP2 takes both through its custom-comm hooks
(`FSDPAllGather`, `FSDPReduceScatter`): its all-gather of the next block, prefetched in backward, is at the top
of an FSDP step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter


def reduce_scatter_in_place(
    output: Tensor,
    scratch_input: Tensor,
    group: dist.ProcessGroup | None = None,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> None:
    """`output` = this rank's chunk of the reduction of `scratch_input`, which is overwritten."""
    dist.all_reduce(scratch_input, op=op, group=group)
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


class FSDPAllGather(DefaultAllGather):
    """FSDP2's parameter all-gather as `all_gather_in_place` (`FSDPModule.set_custom_all_gather`; buffers as
    FSDP2's default allocates them); it returns once the parameters are in place, as FSDP2's own does when not
    asked for an asynchronous one."""

    def __call__(
        self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False
    ) -> None:
        all_gather_in_place(output_tensor, input_tensor, group).wait()


class FSDPReduceScatter(DefaultReduceScatter):
    """FSDP2's gradient reduce-scatter as `reduce_scatter_in_place` (`FSDPModule.set_custom_reduce_scatter`;
    buffers as FSDP2's default allocates them).

    FSDP2 copies a unit's gradients into a fresh input for each reduce-scatter and, for its streams, keeps
    that input until the next unit's reduce-scatter: on CPU, where there are no streams, the input's storage
    is given back here, once this rank's chunk is out of it."""

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp.RedOpType,
        async_op: bool = False,
    ) -> None:
        reduce_scatter_in_place(output_tensor, input_tensor, group, op=op)
        input_tensor.untyped_storage().resize_(0)

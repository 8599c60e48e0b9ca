"""Process-group set-up and the few collectives the loop needs.

One process needs no environment at all. Under torchrun the group is built on the elastic agent's TCPStore
with a prefix per restart attempt: re-joining a plain env:// group after a restart is flaky on gloo
(3 of 12 restarts re-joined on CPU, the others refused connections or hung), a fresh prefix per attempt is not
(12 of 12). Under `srun` without torchrun the SLURM
variables give rank and world size, and rank 0 hosts the store at MASTER_ADDR:MASTER_PORT.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from pretrain.errors import LaunchEnvironmentError


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, kw_only=True)
class _LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent hosts the store; workers are clients
    restart_count: int


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvironmentError(f"environment variable {name}={value!r} is not an integer") from None


def _launch_env() -> _LaunchEnv | None:
    """Rank/world/store address from torchrun's variables, else SLURM's, else None (one process)."""
    if _int_env("WORLD_SIZE") is not None and _int_env("RANK") is not None:
        rank, world_size = _int_env("RANK"), _int_env("WORLD_SIZE")
        local_rank = _int_env("LOCAL_RANK") or 0
    elif _int_env("SLURM_NTASKS") is not None and _int_env("SLURM_PROCID") is not None:
        rank, world_size = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        local_rank = _int_env("SLURM_LOCALID") or 0
        if world_size == 1:
            return None
    else:
        return None
    addr = os.environ.get("MASTER_ADDR")
    port = _int_env("MASTER_PORT")
    if not addr or port is None:
        raise LaunchEnvironmentError(
            f"rank {rank} of {world_size}: MASTER_ADDR and MASTER_PORT must be set "
            "(torchrun sets them; under srun export them in the batch script)"
        )
    return _LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=addr,
        master_port=port,
        agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        restart_count=_int_env("TORCHELASTIC_RESTART_COUNT") or 0,
    )


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(*, timeout_s: float = 600) -> DistInfo:
    """Join the job's process group (idempotent); a lone process gets rank 0 of 1 and no group."""
    env = _launch_env()
    if env is None:
        return DistInfo(device=_device(0))
    device = _device(env.local_rank)
    info = DistInfo(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device=device)
    if dist.is_initialized():
        return info
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=not env.agent_store and env.rank == 0,
        timeout=timeout,
    )
    dist.init_process_group(
        _backend(device),
        store=dist.PrefixStore(f"attempt_{env.restart_count}", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return info


def ensure_process_group(info: DistInfo, *, timeout_s: float = 600) -> None:
    """A one-rank group for a lone process: DeepSpeed and FSDP need one even with nobody to talk to."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError(
            f"world size {info.world_size} but no process group: call init_distributed() first"
        )
    dist.init_process_group(
        _backend(info.device),
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=timeout_s),
    )


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks in one collective (identity in a single process)."""
    if not _active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on at least one rank."""
    return all_reduce_sum([float(flag)])[0] > 0


def broadcast_int(value: int, *, src: int = 0) -> int:
    """Rank `src`'s `value` on every rank (`value` itself in a single process): one rank decides, e.g. after
    reading shared files once for the whole job, and the others follow its answer."""
    if not _active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.broadcast(tensor, src=src)
    return int(tensor.item())


def broadcast_tensors(tensors: list[torch.Tensor], *, src: int = 0) -> None:
    """Rank `src`'s values copied into `tensors` in place on every rank (a no-op in a single process), one
    collective per dtype."""
    if not _active() or not tensors:
        return
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(_collective_device())
        dist.broadcast(flat, src=src)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.data.copy_(part.view_as(t))


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group so the process exits cleanly (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int = 0) -> NoReturn:
    """End a finished worker of a multi-process job (group destroyed, files closed) without the interpreter's
    teardown, where torch's C++ threads occasionally abort it ("terminate called without an active
    exception", SIGABRT) and turn a completed job into a failed one: 6 of 20 two-process gloo runs that
    imported torch._dynamo after creating their group, and several DeepSpeed runs (its import compiles a
    function) did (bench/NOTES.md). Output is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

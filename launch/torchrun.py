"""torchrun command lines: standalone on one machine, or one node of a multi-node c10d rendezvous."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from launch.job import Endpoint, LaunchError, TrainJob

TORCHRUN = [sys.executable, "-m", "launch.agent"]  # torchrun itself, ending in our own line (launch/agent.py)

# torchrun relays these to its workers before it stops them; SIGUSR1 is SLURM's pre-timeout signal, which by
# default would kill the agent and orphan the workers mid-step.
SIGNAL_ENV = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
# After passing a signal on, torchrun waits this long for the workers (which checkpoint first) before SIGKILL; its
# default, 30 s, is shorter than a large model's checkpoint. The SLURM script sets it from --signal-lead instead.
SHUTDOWN_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}

_NNODES = re.compile(r"^[1-9][0-9]*(:[1-9][0-9]*)?$")


def check_nnodes(text: str) -> str:
    """`N` or elastic `MIN:MAX` with 1 <= MIN <= MAX."""
    if not _NNODES.match(text):
        raise LaunchError(f"--nnodes must be N or MIN:MAX (positive integers), got {text!r}")
    low, _, high = text.partition(":")
    if high and int(low) > int(high):
        raise LaunchError(f"--nnodes {text}: MIN must not exceed MAX")
    return text


@dataclass(frozen=True, kw_only=True)
class Torchrun:
    """One torchrun agent. `rendezvous=None` means standalone (a private rendezvous on this machine)."""

    nproc_per_node: int
    max_restarts: int = 0
    nnodes: str = "1"
    node_rank: int = 0
    rendezvous: Endpoint | None = None
    rdzv_id: str = "pretrain"

    def __post_init__(self) -> None:
        check_nnodes(self.nnodes)
        if self.nproc_per_node < 1 or self.max_restarts < 0 or self.node_rank < 0:
            raise LaunchError("torchrun needs nproc >= 1, max-restarts >= 0 and node-rank >= 0")

    def args(self) -> list[str]:
        """torchrun's own options (after `python -m launch.agent`, which is torchrun)."""
        out = [f"--nproc-per-node={self.nproc_per_node}", f"--max-restarts={self.max_restarts}"]
        if self.rendezvous is None:
            return ["--standalone", "--nnodes=1", *out]
        # With c10d the agents agree on node ranks themselves; --node-rank picks which agent hosts the
        # rendezvous store (rank 0, at --master), so nobody depends on host-name matching.
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.rendezvous}",
            f"--rdzv-id={self.rdzv_id}",
            f"--rdzv-conf=is_host={int(self.node_rank == 0)}",
            *out,
        ]

    def command(self, job: TrainJob) -> list[str]:
        return [*TORCHRUN, *self.args(), *job.module_args()]

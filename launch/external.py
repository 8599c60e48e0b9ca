"""The DeepSpeed and Accelerate launchers, for users whose clusters are set up around them.

Both start the same `python -m pretrain train CONFIG [overrides]` on every process; only the process placement
differs (a DeepSpeed hostfile over pdsh/ssh, or an `accelerate config` YAML).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.job import Endpoint, LaunchError, TrainJob, read_yaml

_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>[1-9][0-9]*)$")


def read_hostfile(path: Path) -> dict[str, int]:
    """DeepSpeed's format: one `HOST slots=N` per line, `#` comments; returns host -> slots."""
    if not path.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    hosts: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise LaunchError(f"hostfile {path} line {number}: expected 'HOST slots=N', got {line!r}")
        if match["host"] in hosts:
            raise LaunchError(f"hostfile {path} line {number}: host {match['host']} listed twice")
        hosts[match["host"]] = int(match["slots"])
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts")
    return hosts


@dataclass(frozen=True, kw_only=True)
class DeepSpeedLaunch:
    hostfile: Path | None = None  # None: this machine only
    master: Endpoint | None = None
    num_gpus: int | None = None  # per host; None: the hostfile's slots (or all local devices)
    launcher: str = "pdsh"

    def command(self, job: TrainJob) -> list[str]:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if self.hostfile is not None:
            read_hostfile(self.hostfile)
            cmd += [f"--hostfile={self.hostfile.resolve()}", f"--launcher={self.launcher}"]
        if self.num_gpus is not None:
            cmd.append(f"--num_gpus={self.num_gpus}")
        if self.master is not None:
            cmd += [f"--master_addr={self.master.host}", f"--master_port={self.master.port}"]
        # Each process runs `python -m pretrain ...` like torchrun's workers, without the `--local_rank=N`
        # argument DeepSpeed would otherwise put first (LOCAL_RANK is in the environment).
        return [*cmd, "--no_local_rank", "--module", *job.module_args()[1:]]


@dataclass(frozen=True, kw_only=True)
class AccelerateLaunch:
    config_file: Path
    machine_rank: int | None = None  # multi-node: this machine's rank, overriding the YAML's

    def command(self, job: TrainJob) -> list[str]:
        if not self.config_file.is_file():
            raise LaunchError(f"accelerate config not found: {self.config_file}")
        raw = read_yaml(self.config_file, what="accelerate config")
        if not isinstance(raw, dict) or "distributed_type" not in raw:
            raise LaunchError(
                f"accelerate config {self.config_file} has no distributed_type (see launch/accelerate/)"
            )
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            f"--config_file={self.config_file.resolve()}",
        ]
        if self.machine_rank is not None:
            cmd.append(f"--machine_rank={self.machine_rank}")
        return [*cmd, *job.module_args()]

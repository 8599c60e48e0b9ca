"""What every launcher runs: `python -m pretrain train CONFIG [overrides]`, plus the checks done before launching.

Launchers validate their own arguments and find the run directory here with plain YAML, so a typo fails in a
second on the login node, and `launch` never imports the training stack (it must start on machines and in
shells where CUDA or DeepSpeed would be slow or absent). The run config itself is checked by `pretrain check`
in a subprocess before torchrun or sbatch start: otherwise its one-line error would reach the user from every
worker, under torchrun's traceback, or only once the job left the queue.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pretrain.bundled import find_config


class LaunchError(ValueError):
    """Bad launcher input; the CLI prints it as one line and exits with 2."""


def read_yaml(path: Path, *, what: str) -> object:
    """The YAML file `path` parsed; a one-line LaunchError naming `what` and the file if it does not parse."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LaunchError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise LaunchError(f"{what} {path} is not a text (YAML) file") from None


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """The training command the launchers start on every worker."""

    config: Path
    overrides: tuple[str, ...] = ()
    train_options: tuple[str, ...] = ()  # `pretrain train` options, e.g. ("--wait-lock", "120")

    def __post_init__(self) -> None:
        found = find_config(self.config)  # a path, or the name of a config bundled with the package
        if found is None:
            raise LaunchError(f"config file not found: {self.config}")
        object.__setattr__(self, "config", found)
        for item in self.overrides:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise LaunchError(f"override {item!r} is not key.path=value (e.g. train.max_steps=100)")

    def module_args(self, command: str = "train") -> list[str]:
        """Arguments after the interpreter: `-m pretrain train [options] CONFIG overrides...` (config made
        absolute)."""
        options = list(self.train_options) if command == "train" else []
        return ["-m", "pretrain", command, *options, str(self.config.resolve()), *self.overrides]

    def check(self, *, world_size: int) -> str | None:
        """`pretrain check` for `world_size` processes; its one-line error as a LaunchError. Returns how the
        job will resume the run dir's checkpoint when that changes the world size (the check's note), else None."""
        proc = subprocess.run(
            [sys.executable, *self.module_args("check")],
            env={**os.environ, "WORLD_SIZE": str(world_size)},
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            problem = said[-1].removeprefix("error: ") if said else proc.stderr.strip()[-500:]
            raise LaunchError(f"run config {self.config}: {problem}")
        _, sep, note = proc.stdout.strip().partition("; ")
        return note if sep and " at world size " in note else None

    def plan(self, *, nodes: int, gpus_per_node: int) -> str:
        """`pretrain plan`'s table for this job (memory per GPU per engine), or a one-line note if it failed."""
        args = [*self.module_args("plan"), "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)]
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            return f"(no memory plan: {said[-1] if said else proc.stderr.strip()[-300:]})"
        return proc.stdout.rstrip()

    def run_dir(self) -> Path:
        """`run.dir` as `pretrain train` will resolve it (last override > YAML > runs/<config name>), absolute."""
        return Path(self.setting("run.dir") or Path("runs") / self.config.stem).resolve()

    def rank_log_dir(self) -> Path:
        """Where the ranks keep their own log files (`launch slurm`: a folder per job id inside it)."""
        return self.run_dir() / "logs"

    def setting(self, dotted: str) -> object:
        """A config value as `pretrain train` reads it (last override > YAML), or None when neither sets it."""
        value = None
        for item in self.overrides:
            key, _, text = item.partition("=")
            if key.strip() == dotted:
                value = yaml.safe_load(text)
        if value is not None:
            return value
        node = read_yaml(self.config, what="config file")
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


@dataclass(frozen=True)
class Endpoint:
    """HOST:PORT of a rendezvous or master process."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


def parse_endpoint(text: str, *, what: str = "--master") -> Endpoint:
    """`host:port` or `[ipv6]:port` -> Endpoint; a one-line LaunchError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(f"{what} must be HOST:PORT with a port in 1-65535, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise LaunchError(f"{what}: {host!r} is not a host name or IP address") from None
    return Endpoint(host, int(port))

"""`launch slurm`: write an sbatch script into the run directory and submit it.

The script is rendered from `templates/sbatch.sh.j2` (the whole script is readable in one place); this module only
checks the arguments and fills the values.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jinja2

from launch.job import LaunchError, TrainJob
from launch.torchrun import SIGNAL_ENV, TORCHRUN
from pretrain.console import RANK_LOG_DIR_ENV

SCRIPT_NAME = "launch-slurm.sbatch"
DEFAULT_NUM_WORKERS = (
    1  # data.num_workers' default (launch reads configs as plain YAML; a test keeps them equal)
)

_MEM = re.compile(r"^\d+[KMGT]?$")
# sbatch's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    nproc_per_node: int | None = None  # None: one process per GPU, or 1 for a CPU job
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # None: (data.num_workers + 1) per process, for each node's torchrun
    mem: str | None = None
    setup: Path | None = (
        None  # shell lines run on every node before torchrun (module load, conda activate, ...)
    )
    max_restarts: int = 0
    signal_lead_s: int = 180  # SLURM delivers it to about 30 s; a checkpoint must fit in the rest
    job_name: str | None = None
    sbatch_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.time is not None and not _TIME.match(self.time):
            raise LaunchError(
                f"--time must be a SLURM time (MINUTES, HH:MM:SS or D-HH:MM:SS), got {self.time!r}"
            )
        if not 1 <= self.signal_lead_s <= 65535:
            raise LaunchError(f"--signal-lead must be 1-65535 seconds, got {self.signal_lead_s}")
        if self.mem is not None and not _MEM.match(self.mem):
            raise LaunchError(f"--mem must be a SLURM size such as 64G, 500000M or 0 (all), got {self.mem!r}")
        if self.setup is not None and not Path(self.setup).is_file():
            raise LaunchError(f"--setup: no such file: {self.setup}")
        for extra in self.sbatch_args:
            if not extra.startswith("--"):
                raise LaunchError(f"--sbatch-arg must be a long sbatch option like --mem=64G, got {extra!r}")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def cpus(self, job: TrainJob) -> int:
        """CPUs for each node's torchrun: --cpus-per-task, else each process and its data.num_workers loaders."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        workers = job.setting("data.num_workers")
        workers = DEFAULT_NUM_WORKERS if workers is None else workers
        if not isinstance(workers, int) or workers < 0:
            raise LaunchError(f"data.num_workers must be an integer >= 0, got {workers!r}")
        return self.procs_per_node * (workers + 1)

    def render(self, job: TrainJob, *, launch_command: str = "launch slurm") -> str:
        """The sbatch script (a pure function of the arguments; nothing is written)."""
        run_dir = job.run_dir()
        torchrun = [
            *TORCHRUN,
            f"--nnodes={self.nodes}",
            f"--nproc-per-node={self.procs_per_node}",
            f"--max-restarts={self.max_restarts}",
            "--rdzv-backend=c10d",
        ]
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("launch", "templates"),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,
        )
        return env.get_template("sbatch.sh.j2").render(
            launch_command=launch_command,
            job_name=self.job_name or f"pretrain-{run_dir.name}",
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            cpus_per_task=self.cpus(job),
            mem=self.mem,
            setup=None if self.setup is None else Path(self.setup).read_text().rstrip("\n"),
            setup_name=None if self.setup is None else str(self.setup),
            rank_log_env=RANK_LOG_DIR_ENV,
            rank_logs=shlex.quote(str(job.rank_log_dir())),
            time=self.time,
            partition=self.partition,
            account=self.account,
            workdir=shlex.quote(str(Path.cwd())),
            log=run_dir / "slurm-%j.out",
            signal_lead=self.signal_lead_s,
            sbatch_args=self.sbatch_args,
            torchelastic_signals=SIGNAL_ENV["TORCHELASTIC_SIGNALS_TO_HANDLE"],
            torchrun=shlex.join(torchrun),
            train=shlex.join(job.module_args()),
        )

    def write(self, job: TrainJob, *, launch_command: str = "launch slurm") -> Path:
        """Write the script into the run directory (created if needed); returns its path."""
        run_dir = job.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / SCRIPT_NAME
        path.write_text(self.render(job, launch_command=launch_command))
        return path


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT` -> the job id; a LaunchError with sbatch's own message if it refuses."""
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise LaunchError(
            "sbatch not found: run `launch slurm` on a SLURM login node (or use --dry-run)"
        ) from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise LaunchError(f"sbatch refused {script}: {reason}")
    return done.stdout.strip().split(";")[0]

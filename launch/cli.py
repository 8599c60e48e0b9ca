"""`launch`: start `python -m pretrain train CONFIG [overrides]` under torchrun, SLURM, DeepSpeed or Accelerate.

Bad arguments end as ONE line on stderr and exit code 2, before anything is started or submitted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from launch.external import AccelerateLaunch, DeepSpeedLaunch
from launch.job import LaunchError, TrainJob, parse_endpoint
from launch.slurm import SlurmJob, submit
from launch.torchrun import SHUTDOWN_ENV, SIGNAL_ENV, Torchrun, check_nnodes
from pretrain.bundled import package_version
from pretrain.cli import add_command, seconds
from pretrain.console import RANK_LOG_DIR_ENV

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _checked(check: Callable[[str], object]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            check(text)
        except LaunchError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


positive, non_negative = _int_at_least(1), _int_at_least(0)


def _seconds(text: str) -> str:
    """`pretrain train --wait-lock`'s check, the value kept as typed (it is passed on to that flag)."""
    seconds(text)
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--debug", action="store_true", help="show tracebacks, also for errors in the input")
    job.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, print the command (or sbatch script) and exit",
    )
    job.add_argument(
        "--no-check", action="store_true",
        help="skip `pretrain check` of the run config here (e.g. data only visible on the compute nodes)",
    )  # fmt: skip
    job.add_argument(
        "--wait-lock", type=_seconds, default=None, metavar="SECONDS",
        help="passed to `pretrain train`: wait this long for another trainer on the run directory to end",
    )  # fmt: skip
    job.add_argument(
        "config", type=Path, help="run config YAML (or the name of a bundled one, e.g. gpt-tiny.yaml)"
    )
    job.add_argument(
        "overrides", nargs="*", metavar="key.path=value",
        help="overrides of the run config (dotted keys, YAML values), e.g. train.max_steps=100",
    )  # fmt: skip

    local = add_command(
        commands,
        "local",
        job,
        "torchrun --standalone on this machine",
        "launch local --nproc 2 gpt-tiny.yaml engine.deepspeed.zero_stage=2",
    )
    local.add_argument(
        "--nproc", type=positive, required=True, help="processes (one per GPU, or CPU workers)"
    )
    local.add_argument(
        "--max-restarts", type=non_negative, default=0, help="restart the group after a failure"
    )

    multi = add_command(
        commands,
        "torchrun",
        job,
        "one node of a multi-node torchrun (c10d)",
        "launch torchrun --nnodes 2 --node-rank 0 --master node1:29500 --nproc 8 configs/gpt2-small.yaml",
    )
    multi.add_argument("--nnodes", type=_checked(check_nnodes), required=True, help="N, or MIN:MAX (elastic)")
    multi.add_argument("--node-rank", type=non_negative, required=True, help="0 on the node at --master")
    multi.add_argument("--master", type=_checked(parse_endpoint), required=True, help="HOST:PORT of node 0")
    multi.add_argument("--nproc", type=positive, required=True, help="processes per node")
    multi.add_argument("--rdzv-id", default="pretrain", help="job id shared by all nodes (default: pretrain)")
    multi.add_argument("--max-restarts", type=non_negative, default=0)

    slurm = add_command(
        commands, "slurm", job, "write an sbatch script into the run dir and submit it",
        "launch slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 configs/gpt2-small.yaml",
    )  # fmt: skip
    slurm.add_argument("--nodes", type=positive, required=True)
    slurm.add_argument("--gpus-per-node", type=non_negative, required=True, help="0: a CPU job (gloo)")
    slurm.add_argument("--nproc-per-node", type=positive, default=None, help="default: GPUs per node, or 1")
    slurm.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the partition's)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument(
        "--cpus-per-task", type=positive, default=None,
        help="CPUs for each node's torchrun (default: processes per node x (data.num_workers + 1))",
    )  # fmt: skip
    slurm.add_argument("--mem", default=None, help="memory per node, e.g. 256G (0: all of it)")
    slurm.add_argument(
        "--setup", type=Path, default=None,
        help="shell lines run on every node before torchrun (module load, conda activate, NCCL variables)",
    )  # fmt: skip
    slurm.add_argument(
        "--max-restarts", type=non_negative, default=0, help="torchrun restarts within one job"
    )
    slurm.add_argument(
        "--signal-lead",
        type=positive,
        default=180,
        help="seconds before the time limit to checkpoint and requeue",
    )
    slurm.add_argument("--job-name", default=None, help="default: pretrain-<run dir name>")
    slurm.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="extra #SBATCH line (repeatable)",
    )

    ds = add_command(
        commands,
        "deepspeed",
        job,
        "the DeepSpeed launcher (over a hostfile)",
        "launch deepspeed --hostfile launch/examples/hostfile configs/gpt2-small.yaml",
    )
    ds.add_argument(
        "--hostfile",
        type=Path,
        default=None,
        help="'HOST slots=N' lines (launch/examples/hostfile); none: this machine",
    )
    ds.add_argument(
        "--master", type=_checked(parse_endpoint), default=None, help="HOST:PORT (default: first host)"
    )
    ds.add_argument(
        "--num-gpus", type=positive, default=None, help="per host (default: the hostfile's slots)"
    )
    ds.add_argument(
        "--launcher", default="pdsh", choices=["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"]
    )

    acc = add_command(
        commands,
        "accelerate",
        job,
        "accelerate launch with a config YAML",
        "launch accelerate --config launch/accelerate/single-node.yaml configs/gpt2-small.yaml engine.backend=ddp",
    )
    acc.add_argument(
        "--config", dest="accelerate_config", type=Path, required=True, help="see launch/accelerate/"
    )
    acc.add_argument("--machine-rank", type=non_negative, default=None, help="this machine (multi-node)")
    return parser


def exec_command(args: argparse.Namespace, job: TrainJob) -> list[str]:
    """The launcher command line for `local`, `torchrun`, `deepspeed` and `accelerate`."""
    if args.command == "local":
        return Torchrun(nproc_per_node=args.nproc, max_restarts=args.max_restarts).command(job)
    if args.command == "torchrun":
        return Torchrun(
            nproc_per_node=args.nproc,
            max_restarts=args.max_restarts,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rendezvous=parse_endpoint(args.master),
            rdzv_id=args.rdzv_id,
        ).command(job)
    if args.command == "deepspeed":
        master = parse_endpoint(args.master) if args.master else None
        launcher = DeepSpeedLaunch(
            hostfile=args.hostfile, master=master, num_gpus=args.num_gpus, launcher=args.launcher
        )
        return launcher.command(job)
    accelerate = AccelerateLaunch(config_file=args.accelerate_config, machine_rank=args.machine_rank)
    return accelerate.command(job)


def slurm_job(args: argparse.Namespace) -> SlurmJob:
    return SlurmJob(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        setup=args.setup,
        max_restarts=args.max_restarts,
        signal_lead_s=args.signal_lead,
        job_name=args.job_name,
        sbatch_args=tuple(args.sbatch_arg),
    )


def _check(job: TrainJob, world_size: int) -> None:
    """`pretrain check` before anything starts; a resume at another world size is said here already."""
    note = job.check(world_size=world_size)
    if note:
        print(f"launch: {note}", file=sys.stderr)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print (--dry-run), submit (slurm) or exec (the others); LaunchError for bad input."""
    options = ("--wait-lock", args.wait_lock) if args.wait_lock is not None else ()
    job = TrainJob(config=args.config, overrides=tuple(args.overrides), train_options=options)
    if args.command == "slurm":
        slurm, launch_command = slurm_job(args), shlex.join(["launch", *argv])
        world_size = slurm.nodes * slurm.procs_per_node
        if args.dry_run:  # checked too: it shows what the job would do, a refusal included
            script = slurm.render(job, launch_command=launch_command)
            if not args.no_check:
                _check(job, world_size)
            print(script, end="")
            return 0
        if not args.no_check:
            _check(job, world_size)
            if slurm.gpus_per_node > 0:
                print(job.plan(nodes=slurm.nodes, gpus_per_node=slurm.gpus_per_node), file=sys.stderr)
        script = slurm.write(job, launch_command=launch_command)
        job_id = submit(script)
        print(f"launch: submitted {script}; log: {job.run_dir() / f'slurm-{job_id}.out'}", file=sys.stderr)
        print(job_id)
        return 0
    command = exec_command(args, job)
    if args.command in ("local", "torchrun") and not args.no_check:
        nodes = int(args.nnodes.split(":")[-1]) if args.command == "torchrun" else 1  # elastic MIN:MAX: MAX
        _check(job, args.nproc * nodes)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    env = {**SIGNAL_ENV, **SHUTDOWN_ENV, **os.environ}
    env[RANK_LOG_DIR_ENV] = str(job.rank_log_dir())  # each rank also writes RUN_DIR/logs/rank-R.log
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # signals reach torchrun directly


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return run(args, argv)
    except LaunchError as e:
        if args.debug:
            raise
        print(f"error: launch {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE

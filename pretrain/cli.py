"""`pretrain` command line: train / check / config / plan / export / sample / data prepare / plot.

Bad input of any kind (a `UserError`) ends as ONE line on stderr (`error: ...`) and exit code 2; `--debug` shows
the traceback. Any other exception is a bug and keeps its traceback.
Under a launcher every rank meets the same bad config, usage or checkpoint verdict (agreed across ranks): only
rank 0 prints those; any other error may be one rank's own (its data shard, its files), so every rank that meets
it prints it, prefixed with its rank. Every rank exits with the code.
Heavy imports happen inside the commands so that `pretrain --help` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pretrain.bundled import package_version
from pretrain.console import open_rank_log
from pretrain.errors import UserError

EXIT_USAGE = 2


def _rank() -> int:
    """The rank a launcher gave this process (torchrun's RANK, else srun's SLURM_PROCID), 0 without one;
    a value that is not a number counts as 0, so its error is shown rather than hidden."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "").strip()
        if value:
            return int(value) if value.isdigit() else 0
    return 0


def _error(message: str, *, agreed: bool = True) -> None:
    """The one `error: ...` line: said by rank 0 alone when every rank met the same problem (`agreed`),
    else by whichever rank met it."""
    rank = _rank()
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif not agreed:
        print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str) -> NoReturn:
        _error(f"{self.prog}: {message}")
        raise SystemExit(EXIT_USAGE)


_OVERRIDES_HELP = (
    "key.path=value overrides (dotted keys, YAML values) win over the file, e.g. train.max_steps=100 "
    "engine.deepspeed.zero_stage=2 data.source='corpus/*.jsonl'"
)


_CONFIG_COMMANDS = (  # (name, what it does, an example): the subcommands that take CONFIG [overrides]
    ("train", "train (or resume) the run a config describes",
     "pretrain train gpt-tiny.yaml train.max_steps=200 run.dir=runs/first"),
    ("check", "validate a run config (what `launch` does before starting workers)",
     "pretrain check configs/gpt2-small.yaml engine.backend=fsdp"),
    ("config", "print the resolved config: every key with its value, doc and default",
     "pretrain config gpt-tiny.yaml train.lr=1e-3"),
    ("plan", "predicted memory per GPU for each engine, and which one to use",
     "pretrain plan configs/gpt2-large.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80"),
)  # fmt: skip


def add_command(subparsers: Any, name: str, parent: argparse.ArgumentParser, what: str, example: str) -> Any:
    """A subcommand whose --help says what it does and ends with an example (shared with `launch`)."""
    return subparsers.add_parser(
        name,
        parents=[parent],
        help=what,
        description=what,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0 (`--wait-lock`, here and in `launch`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text!r}")
    return value


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "config", type=Path, help="run config YAML (or the name of a bundled one, e.g. gpt-tiny.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help=_OVERRIDES_HELP)
    return parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite `pretrain --debug train ...`
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks, also for errors in the input",
    )
    parser = _Parser(prog="pretrain", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, what, example in _CONFIG_COMMANDS:
        command = _with_config(add_command(commands, name, common, what, example))
        if name == "train":
            command.add_argument(
                "--wait-lock",
                type=seconds,
                default=0.0,
                metavar="SECONDS",
                help="if another trainer holds the run directory, wait up to this long for it to end (default: refuse)",
            )
        elif name == "plan":
            command.add_argument("--nodes", type=_positive(int), required=True, help="nodes in the job")
            command.add_argument(
                "--gpus-per-node", type=_positive(int), required=True, help="GPUs (processes) per node"
            )
            command.add_argument(
                "--gpu-memory-gib",
                type=_positive(float),
                default=80.0,
                help="memory of one GPU (default: 80)",
            )
    export = add_command(
        commands, "export", common, "write a transformers directory from a checkpoint",
        "pretrain export runs/gpt-tiny out/gpt-tiny-hf --step 200",
    )  # fmt: skip
    export.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    export.add_argument("out_dir", type=Path, help="the transformers directory to write")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")

    sample = add_command(
        commands, "sample", common,
        "generate from a checkpoint, no export needed (GPT continues, T5 fills sentinels, BERT fills masks)",
        "pretrain sample runs/gpt-tiny --prompt 'def main(' --max-new-tokens 40",
    )  # fmt: skip
    sample.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    sample.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    given = sample.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    given.add_argument("--file", type=Path, default=None, help="a text file: one prompt per line")
    sample.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated (GPT, T5)")
    sample.add_argument("--top-k", type=int, default=5, help="candidates shown per mask (BERT)")

    data = add_command(
        commands, "data", common, "data tools", "pretrain data prepare gpt-tiny.yaml prepared/gpt-tiny"
    )
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    prepare = add_command(
        data_commands, "prepare", common,
        "pre-tokenise the corpus (text) or decode the images / audio (vit, swin, conformer) into shards",
        "pretrain data prepare gpt-tiny.yaml prepared/gpt-tiny data.source='corpus/*.jsonl'",
    )  # fmt: skip
    prepare.add_argument("config", type=Path, help="run config YAML (or a bundled one's name)")
    prepare.add_argument("out_dir", type=Path, help="where the shards go (then: data.source=OUT_DIR)")
    prepare.add_argument("overrides", nargs="*", metavar="key.path=value", help=_OVERRIDES_HELP)

    plot = add_command(
        commands,
        "plot",
        common,
        "draw loss, lr, throughput, grad-norm and MFU curves to a PNG (several runs: overlaid)",
        "pretrain plot runs/gpt-tiny runs/gpt-tiny-long --out compare.png",
    )
    plot.add_argument(
        "run_dirs", type=Path, nargs="+", metavar="run_dir", help="the run.dir of a training run"
    )
    plot.add_argument(
        "--out", type=Path, default=None,
        help="PNG path (default: RUN_DIR/metrics.png; several runs: ./metrics-compare.png)",
    )  # fmt: skip
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command in ("train", "check", "config", "data", "plan"):
        from pretrain.config import load_config

        # before anything expensive is imported or started; a plan reads no data
        cfg = load_config(args.config, args.overrides, check_files=args.command != "plan")
    if args.command == "train":
        from pretrain.loop import train

        train(cfg, wait_lock_s=args.wait_lock)
    elif args.command == "check":
        from pretrain.check import check_run

        for note in check_run(cfg):
            print(f"note: {note}", file=sys.stderr)
        print(f"ok: {args.config} (run dir {cfg.run_dir}){_check_resume(cfg)}")
    elif args.command == "config":
        from pretrain.describe import describe

        print(describe(cfg))
    elif args.command == "plan":
        from pretrain.plan import plan_run, render

        print(render(plan_run(cfg, gpus=args.nodes * args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib)))
    elif args.command == "export":
        from pretrain.export import export

        export(args.run_dir, args.out_dir, step=args.step)
    elif args.command == "sample":
        _sample(args)
    elif args.command == "data":
        from pretrain.prepare import prepare

        prepare(cfg, args.out_dir)
    elif args.command == "plot":
        from pretrain.plot import plot_runs

        print(f"wrote {plot_runs(args.run_dirs, args.out)}")


def _sample(args: argparse.Namespace) -> None:
    from pretrain.errors import ConfigError
    from pretrain.sample import sample_run

    prompts = args.prompt
    if args.file is not None:
        if not args.file.is_file():
            raise ConfigError(f"--file: no such file: {args.file}")
        prompts = [line for line in args.file.read_text().splitlines() if line.strip()]
    if args.max_new_tokens < 1 or args.top_k < 1:
        raise ConfigError("--max-new-tokens and --top-k must be >= 1")
    try:
        checkpoint, samples = sample_run(
            args.run_dir, prompts, step=args.step, max_new_tokens=args.max_new_tokens, top_k=args.top_k
        )
    except ValueError as e:  # a prompt the family cannot use (a BERT prompt without a mask)
        raise ConfigError(str(e)) from None
    print(f"# {checkpoint}")
    for item in samples:
        print(item)


def _check_resume(cfg: Any) -> str:
    """What a resume of the run dir's checkpoint by `WORLD_SIZE` processes (set by `launch`) would do, checked
    as rank 0 will (hashes included); a one-line error if it cannot. Data warnings go to stderr."""
    from pretrain.resume import plan_resume

    text = os.environ.get("WORLD_SIZE", "").strip()
    world_size = int(text) if text.isdigit() and int(text) > 0 else 1
    plan = plan_resume(cfg, world_size, verify=True, say=lambda line: print(line, file=sys.stderr))
    if plan is None:
        return ""
    if plan.data_warning:
        print(plan.data_warning, file=sys.stderr)
    return f"; {plan.note() or f'resuming at step {plan.step}'}"


def _user_error(error: BaseException) -> bool:
    """Bad input rather than a bug: our UserError family, or the data pipeline's DataError (data/ cannot
    import pretrain/, so its one error type is recognised here; it is looked up only once `data` is loaded,
    since a config error must not wait for torch)."""
    data = sys.modules.get("data.errors")
    return isinstance(error, UserError) or (data is not None and isinstance(error, data.DataError))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Each rank's own copy of its output, when a launcher asks for one. Closed (with the exit code) on a
    # return; a bug's traceback, printed once main has raised, still goes to the file.
    rank_log = open_rank_log(_rank()) if args.command == "train" else None
    code = _answer(args)
    if rank_log is not None:
        rank_log.close(code)
    return code


def _answer(args: argparse.Namespace) -> int:
    """Run the command; a user error as its one line and exit code."""
    try:
        _run(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:
        if getattr(args, "debug", False) or not _user_error(e):
            raise
        from pretrain.redaction import redact, secret_values

        message = redact(" ".join(str(e).split()) or type(e).__name__, secret_values())
        agreed = getattr(e, "agreed", False)
        _error(message, agreed=agreed)
        if agreed:
            _let_rank_zero_speak()
        return getattr(e, "exit_code", EXIT_USAGE)
    return 0


RANK_ZERO_GRACE_S = 30.0


def _let_rank_zero_speak() -> None:
    """A rank other than 0 that met the problem every rank meets waits before exiting: its exit makes the
    launcher (torchrun) stop the other workers, which could take rank 0 down before it says the one line.
    Rank 0's own exit ends the wait (the launcher stops this worker then)."""
    if _rank() != 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        time.sleep(RANK_ZERO_GRACE_S)


if __name__ == "__main__":
    raise SystemExit(main())

"""`pretrain` command line: train / check / config / plan / export / data prepare / plot.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pretrain.bundled import package_version
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


def _command(commands: Any, name: str, common: argparse.ArgumentParser, help: str, example: str) -> Any:
    return commands.add_parser(
        name,
        parents=[common],
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


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


def _with_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", type=Path, help="run config YAML (or the name of a bundled one, e.g. gpt-tiny.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help=_OVERRIDES_HELP)


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

    train = _command(
        commands, "train", common, "train (or resume) the run a config describes",
        "pretrain train gpt-tiny.yaml train.max_steps=200 run.dir=runs/first",
    )  # fmt: skip
    _with_config(train)
    check = _command(
        commands, "check", common, "validate a run config (what `launch` does before starting workers)",
        "pretrain check configs/gpt2-small.yaml engine.backend=fsdp",
    )  # fmt: skip
    _with_config(check)
    config = _command(
        commands, "config", common, "print the resolved config: every key with its value, doc and default",
        "pretrain config gpt-tiny.yaml train.lr=1e-3",
    )  # fmt: skip
    _with_config(config)
    plan = _command(
        commands, "plan", common, "predicted memory per GPU for each engine, and which one to use",
        "pretrain plan configs/gpt2-large.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80",
    )  # fmt: skip
    _with_config(plan)
    plan.add_argument("--nodes", type=_positive(int), required=True, help="nodes in the job")
    plan.add_argument("--gpus-per-node", type=_positive(int), required=True, help="GPUs (processes) per node")
    plan.add_argument(
        "--gpu-memory-gib", type=_positive(float), default=80.0, help="memory of one GPU (default: 80)"
    )
    export = _command(
        commands, "export", common, "write a transformers directory from a checkpoint",
        "pretrain export runs/gpt-tiny out/gpt-tiny-hf --step 200",
    )  # fmt: skip
    export.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    export.add_argument("out_dir", type=Path, help="the transformers directory to write")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")

    data = _command(
        commands, "data", common, "data tools", "pretrain data prepare gpt-tiny.yaml prepared/gpt-tiny"
    )
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    prepare = _command(
        data_commands, "prepare", common, "pre-tokenise the corpus into shards",
        "pretrain data prepare gpt-tiny.yaml prepared/gpt-tiny data.source='corpus/*.jsonl'",
    )  # fmt: skip
    prepare.add_argument("config", type=Path, help="run config YAML (or a bundled one's name)")
    prepare.add_argument("out_dir", type=Path, help="where the shards go (then: data.source=OUT_DIR)")
    prepare.add_argument("overrides", nargs="*", metavar="key.path=value", help=_OVERRIDES_HELP)

    plot = _command(
        commands, "plot", common, "draw loss / lr / throughput curves to a PNG", "pretrain plot runs/gpt-tiny"
    )
    plot.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command in ("train", "check", "config", "data", "plan"):
        from pretrain.config import load_config

        # before anything expensive is imported or started; a plan reads no data
        cfg = load_config(args.config, args.overrides, check_files=args.command != "plan")
    if args.command == "train":
        from pretrain.loop import train

        train(cfg)
    elif args.command == "check":
        print(f"ok: {args.config} (run dir {cfg.run_dir})")
    elif args.command == "config":
        from pretrain.describe import describe

        print(describe(cfg))
    elif args.command == "plan":
        from pretrain.plan import plan_run, render

        print(render(plan_run(cfg, gpus=args.nodes * args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib)))
    elif args.command == "export":
        from pretrain.export import export

        export(args.run_dir, args.out_dir, step=args.step)
    elif args.command == "data":
        from pretrain.prepare import prepare

        prepare(cfg, args.out_dir)
    elif args.command == "plot":
        from pretrain.plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.out)}")


def _user_error(error: BaseException) -> bool:
    """Bad input rather than a bug: our UserError family, or the data pipeline's DataError (data/ cannot
    import pretrain/, so its one error type is recognised here; it is looked up only once `data` is loaded,
    since a config error must not wait for torch)."""
    data = sys.modules.get("data.errors")
    return isinstance(error, UserError) or (data is not None and isinstance(error, data.DataError))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        _error(message, agreed=getattr(e, "agreed", False))
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`pretrain` command line: train / export / data prepare / plot.

Bad input of any kind ends as ONE line on stderr (`error: ...`) and exit code 2; `--debug` shows the traceback.
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
from typing import NoReturn

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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite `pretrain --debug train ...`
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks instead of one-line errors",
    )
    parser = _Parser(prog="pretrain", description=__doc__.splitlines()[0], parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train", parents=[common], help="train (or resume) the run a config describes"
    )
    train.add_argument("config", type=Path)
    train.add_argument("overrides", nargs="*", metavar="key.path=value")

    check = commands.add_parser(
        "check", parents=[common], help="validate a run config (what `launch` does before starting workers)"
    )
    check.add_argument("config", type=Path)
    check.add_argument("overrides", nargs="*", metavar="key.path=value")

    export = commands.add_parser(
        "export", parents=[common], help="write a transformers directory from a checkpoint"
    )
    export.add_argument("run_dir", type=Path)
    export.add_argument("out_dir", type=Path)
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")

    data = commands.add_parser("data", parents=[common], help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    prepare = data_commands.add_parser(
        "prepare", parents=[common], help="pre-tokenise the corpus into shards"
    )
    prepare.add_argument("config", type=Path)
    prepare.add_argument("out_dir", type=Path)
    prepare.add_argument("overrides", nargs="*", metavar="key.path=value")

    plot = commands.add_parser("plot", parents=[common], help="draw loss / lr / throughput curves to a PNG")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    return parser


# Error types that mean bad input or a bad file, not a bug in this program, by the module defining them.
_USER_ERRORS = {
    "pretrain.config": ("ConfigError",),
    "pretrain.checkpoint": ("CheckpointError",),
    "pretrain.safety": ("UnsafeCheckpointError", "CorruptCheckpointError"),
    "pretrain.faults": ("DivergenceError",),
}
# Raised identically on every rank: the config is the same everywhere, and checkpoint and divergence verdicts
# are agreed across ranks before anyone raises.
_AGREED_ERRORS = {
    "pretrain.config": ("ConfigError",),
    "pretrain.checkpoint": ("CheckpointError",),
    "pretrain.faults": ("DivergenceError",),
}


def _loaded(types: dict[str, tuple[str, ...]]) -> tuple[type[BaseException], ...]:
    """Error types looked up only in modules already loaded: a type never imported cannot have been raised,
    and importing its module here would make a config error wait for torch."""
    return tuple(
        getattr(sys.modules[m], name) for m, names in types.items() if m in sys.modules for name in names
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError, *_loaded(_USER_ERRORS))


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from pretrain.config import load_config

        cfg = load_config(args.config, args.overrides)  # before anything expensive is imported or started
        from pretrain.loop import train

        train(cfg)
    elif args.command == "check":
        from pretrain.config import load_config

        cfg = load_config(args.config, args.overrides)
        print(f"ok: {args.config} (run dir {cfg.run_dir})")
    elif args.command == "export":
        from pretrain.export import export

        export(args.run_dir, args.out_dir, step=args.step)
    elif args.command == "data":
        from pretrain.config import load_config

        cfg = load_config(args.config, args.overrides)
        from pretrain.prepare import prepare

        prepare(cfg, args.out_dir)
    elif args.command == "plot":
        from pretrain.plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.out)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:
        if getattr(args, "debug", False) or not isinstance(e, _user_errors()):
            raise
        from pretrain.redaction import redact, secret_values

        message = redact(" ".join(str(e).split()) or type(e).__name__, secret_values())
        _error(message, agreed=isinstance(e, _loaded(_AGREED_ERRORS)))
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

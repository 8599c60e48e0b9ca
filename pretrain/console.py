"""Human-facing console lines: each carries the time (HH:MM:SS), so a log shows where a run spent its time.

Under a launcher each rank of `pretrain train` also keeps its own copy of what it prints: with
`PRETRAIN_RANK_LOG_DIR=DIR` set (`launch` sets it), its stdout and stderr go to the console as before and to
`DIR/rank-<RANK>.log`. The copy is made in this process, line by line as each line is printed (no tail thread as
torchrun's `--tee` has, which dropped a stopped job's last lines), appended (a requeued job or a torchrun restart
adds to the first attempt's file), and flushed at once, so a SIGTERM or SIGKILL loses no line already printed.
`faulthandler` writes a hard crash's Python stack (segfault, abort) to the same file.
"""

from __future__ import annotations

import faulthandler
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

RANK_LOG_DIR_ENV = "PRETRAIN_RANK_LOG_DIR"


def stamp(message: str) -> str:
    return f"{time.strftime('%H:%M:%S')} {message}"


def say(message: str) -> None:
    """One timestamped line on stderr (the channel launchers and SLURM logs keep)."""
    print(stamp(message), file=sys.stderr, flush=True)


# Terminal control a console may get (colours, cursor moves, a live progress bar's redraws), kept out of the file.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_LONGEST_LINE = 1 << 16  # a line without an end yet is written out at this length


def _plain_line(line: str) -> str:
    """A console line as a terminal ends up showing it: without control sequences, and after a carriage
    return only what overwrote the line (a progress bar's last state, not every redraw)."""
    return _ANSI.sub("", line).rstrip("\r").rsplit("\r", 1)[-1]


class _Tee:
    """A console stream that also writes its text to a rank's log file, line by line as each line ends (each
    flushed at once). The console is written first and exactly as before; the file's failures (disk full) never
    reach the program. Everything else (isatty, fileno, encoding, buffer) is the console's, so rich and friends
    see the console they saw before; a live progress bar's redraws on a terminal leave only plain lines."""

    def __init__(self, console: TextIO, file: TextIO) -> None:
        self.console = console
        self._file = file
        self._pending = ""  # the line being written, until it ends

    def write(self, text: str) -> int:
        written = self.console.write(text)
        pending = self._pending + text
        if "\n" in pending:
            done, _, pending = pending.rpartition("\n")
            self._to_file("".join(_plain_line(line) + "\n" for line in done.split("\n")))
        redrawn = pending.rfind("\r", 0, len(pending) - 1)  # a carriage return, then more of the line
        if redrawn >= 0:
            pending = pending[redrawn + 1 :]  # overwritten: keeps a live bar from growing this without end
        if len(pending) > _LONGEST_LINE:
            self._to_file(_plain_line(pending) + "\n")
            pending = ""
        self._pending = pending
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.console.flush()

    def finish(self) -> None:
        """Write the line that has not ended (at the end of the run)."""
        line, self._pending = _plain_line(self._pending), ""
        if line:
            self._to_file(line + "\n")

    def _to_file(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


class RankLog:
    """This rank's log file, teed from stdout and stderr until `close`."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - until close()
        # in the file only (the console stays as it was): which process, which start
        self._file.write(stamp(f"rank log: {_whoami(rank)}\n"))
        self._file.flush()
        sys.stdout = _Tee(sys.stdout, self._file)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self._file)  # type: ignore[assignment]
        self._faults = not faulthandler.is_enabled()  # PYTHONFAULTHANDLER: the user's choice (stderr) wins
        if self._faults:
            faulthandler.enable(file=self._file)

    def close(self, code: int) -> None:
        """Back to the plain console; the file ends with the exit code (a killed attempt's file has none)."""
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, _Tee):
                stream.flush()
                stream.finish()
                setattr(sys, name, stream.console)
        if self._faults:
            faulthandler.disable()
        try:
            self._file.write(stamp(f"rank log: exit {code}\n"))
            self._file.close()
        except OSError:
            pass


def _whoami(rank: int) -> str:
    """Which process this is: rank, world size, pid, host, and the restart it belongs to."""
    env = os.environ.get
    world = env("WORLD_SIZE") or env("SLURM_NTASKS") or "1"
    out = f"rank {rank} of {world}, pid {os.getpid()} on {socket.gethostname()}"
    if env("SLURM_JOB_ID"):
        out += f", SLURM job {env('SLURM_JOB_ID')} restart {env('SLURM_RESTART_COUNT') or 0}"
        out += f" on node {env('SLURMD_NODENAME')}" if env("SLURMD_NODENAME") else ""
    if env("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        out += f", torchrun restart {env('TORCHELASTIC_RESTART_COUNT')}"
    return out


def open_rank_log(rank: int) -> RankLog | None:
    """Tee this process's output into `$PRETRAIN_RANK_LOG_DIR/rank-<rank>.log`; None when the variable is unset.
    A directory that cannot be written is one warning line, and the run goes on without the file."""
    directory = os.environ.get(RANK_LOG_DIR_ENV, "").strip()
    if not directory:
        return None
    path = Path(directory) / f"rank-{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return RankLog(path, rank)
    except OSError as e:
        say(f"warning: no rank log file {path} ({e.strerror or e}); output goes to the console only")
        return None

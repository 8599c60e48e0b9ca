"""Human-facing console lines: each carries the time (HH:MM:SS), so a log shows where a run spent its time."""

from __future__ import annotations

import sys
import time


def stamp(message: str) -> str:
    return f"{time.strftime('%H:%M:%S')} {message}"


def say(message: str) -> None:
    """One timestamped line on stderr (the channel launchers and SLURM logs keep)."""
    print(stamp(message), file=sys.stderr, flush=True)

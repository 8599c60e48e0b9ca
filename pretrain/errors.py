"""The errors that mean bad input, not a bug: the CLI prints them as one line; everything else keeps its traceback.

Torch-free, so the CLI's error path answers without importing the training stack. `agreed` says whether every
rank meets the error alike (the config is the same everywhere; checkpoint and divergence verdicts are agreed
across ranks before anyone raises): then rank 0 alone prints it, else every rank that meets it does.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """Bad input (config, override, checkpoint, data, command-line argument); the message says what to do."""

    agreed: bool = False
    exit_code: int = 2


class ConfigError(UserError):
    """A bad run config, override or value: the message names the dotted key and what is accepted."""

    agreed = True


class CheckpointError(UserError):
    """A checkpoint that is missing, unusable or must not be loaded; the message says where and what to do."""

    agreed = True

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(message)


class LaunchEnvironmentError(UserError):
    """The environment a launcher gave this process is unusable (ranks, addresses, a launcher that started
    the processes unconnected); met by the process that reads it, so not agreed."""


class DivergenceError(UserError):
    """Too many steps had a non-finite loss or gradient; the last checkpoint on disk is still a good one."""

    agreed = True


class Interrupted(UserError):
    """Ctrl-C stopped the run at a step boundary, after its checkpoint; the message says where to resume."""

    agreed = True
    exit_code = 130

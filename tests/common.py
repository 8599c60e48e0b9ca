"""What every test package shares: where the repository is, and an environment for subprocesses that import
the tests' own helper modules (`tests.*`) from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository on PYTHONPATH (worker scripts import `tests.<package>.<module>`)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env

"""The embedded default corpus: the Python standard library's own source files.

It exists on every machine with Python, needs no download, and is several MB of real text that no one on
this project wrote. Tests and site-packages are left out (tests hold deliberately broken encodings, and
site-packages differs between machines).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(os.path.dirname(os.__file__))


@cache
def builtin_files() -> tuple[Path, ...]:
    """The corpus files (empty ones left out) in a machine-independent order (sorted relative paths)."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        found.extend(
            Path(dirpath, f) for f in filenames if f.endswith(".py") and os.path.getsize(Path(dirpath, f))
        )
    return tuple(sorted(found, key=lambda p: p.relative_to(root).as_posix()))

"""What ships with the package: its version, the run configs and DeepSpeed JSONs (`configs/`, `deepspeed_configs/`).

The repository keeps them at the top level; `pretrain/configs` and `pretrain/deepspeed_configs` link there, so a
wheel carries them as package data and `importlib.resources` finds them in a source tree, an editable install
and a plain `pip install .` alike. Imports nothing else, so `launch` can use it without the training stack.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def package_version() -> str:
    """The installed distribution's version (`pretrain --version`, `launch --version`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pretrain")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def bundled_dir(name: str) -> Path:
    """`configs` or `deepspeed_configs` inside the installed package."""
    return Path(str(importlib.resources.files("pretrain") / name))


def bundled_config_names() -> list[str]:
    return sorted(p.name for p in bundled_dir("configs").glob("*.yaml"))


def find_config(path: str | Path) -> Path | None:
    """`path` if it is a file; else the bundled run config of that name (`gpt-tiny` or `gpt-tiny.yaml`), so
    `pretrain train gpt-tiny.yaml` works from any directory after `pip install`; else None."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent != Path("."):
        return None
    bundled = bundled_dir("configs") / f"{path.name.removesuffix('.yaml')}.yaml"
    return bundled if bundled.is_file() else None

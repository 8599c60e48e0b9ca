"""models/ is plain PyTorch: no distributed, launcher or logging frameworks, and no transformers at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"
FORBIDDEN = ("deepspeed", "accelerate", "wandb", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(
                f"{node.module}.{alias.name}" for alias in node.names
            )  # from torch import distributed
    return names


def test_models_source_imports_nothing_forbidden() -> None:
    files = sorted(MODELS.rglob("*.py"))
    assert len(files) >= 10  # the walk really saw the package
    offenders = {
        f"{path.relative_to(MODELS.parent)}: {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not offenders
    assert not any("torch.distributed" in path.read_text() for path in files)  # attribute use without import


def test_importing_models_loads_no_forbidden_package() -> None:
    code = (
        "import sys, models, models.hf, models.attention, models.blocks;"
        "bad = [m for m in ('deepspeed', 'accelerate', 'wandb', 'transformers') if m in sys.modules];"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=MODELS.parent, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_walk_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from torch import distributed as d\nimport wandb\n")
    assert {"torch.distributed", "wandb"} <= imported_modules(bad)

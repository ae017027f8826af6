"""The code passes the linter and the type checker the project is configured with (`[tool.ruff]` and `[tool.mypy]`
in pyproject.toml), so that the README's test command is also the style and type gate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", "launcher", "virtualizers", "tests", "bench"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_finds_nothing(tmp_path: Path) -> None:
    """`mypy --strict` over launcher/ and virtualizers/ (`[tool.mypy]` in pyproject.toml)."""
    mypy = Path(sys.executable).with_name("mypy")
    done = subprocess.run([str(mypy), "--cache-dir", str(tmp_path / "mypy-cache")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

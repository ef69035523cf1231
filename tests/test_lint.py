"""The lint: `ruff check .` over the repo ([tool.ruff] in pyproject.toml) finds nothing. Skipped
where ruff is not installed (it is in the `test` extra); about a second where it is."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff_command() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    return [exe] if exe else None


def test_ruff_check_passes():
    ruff = ruff_command()
    if ruff is None:
        pytest.skip("ruff is not installed")
    # --no-cache: nothing written into the checkout
    r = subprocess.run([*ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}{r.stderr}"

"""scripts/check (ruff format, ruff lint, mypy --strict on raftkv/) must pass."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scripts_check_passes() -> None:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "check")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

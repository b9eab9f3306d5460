"""The committed generated code in raftkv/_pb must match proto/ (run scripts/genproto)."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "genproto"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    committed = ROOT / "raftkv" / "_pb" / "raftkv" / "v1"
    fresh = tmp_path / "raftkv" / "v1"
    names = sorted(p.name for p in fresh.glob("*.py*"))
    assert names, "genproto produced nothing"
    _match, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, (
        f"stale generated code: {mismatch + errors}; run scripts/genproto"
    )

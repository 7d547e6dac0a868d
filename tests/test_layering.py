"""The import contract of DEVELOPERS.md holds: ``lint-imports`` over the ``[tool.importlinter]``
contracts in pyproject.toml (the runtime imports nothing of this repo, models imports neither
exporters nor quant nor validate nor training, validate imports no exporter, ... and one layers
contract over the whole flow). grimp reads function-local imports too, so a cycle hidden inside a
function fails here as well."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports_command() -> list[str]:
    """The ``lint-imports`` of the interpreter running the tests (the venv's, not one on PATH)."""
    beside = Path(sys.executable).parent / "lint-imports"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("lint-imports")
    assert found, "lint-imports not installed: pip install -c constraints.txt -e '.[test]'"
    return [found]


def test_import_contracts_hold():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    r = subprocess.run(lint_imports_command() + ["--no-cache"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "0 broken" in out and "kept" in out.lower(), out

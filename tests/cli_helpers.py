"""Run the package's commands as a user would: a subprocess, its exit status and output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def run_cli(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = os.environ.copy() | (env or {})
    return subprocess.run([sys.executable, "-m", f"kdig_study.{module}", *args],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd or REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]

"""Run the package's commands as a user would: a subprocess, its exit status and output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna

from kdig_study.store import open_storage

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


def trials_of(url: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """A study's trials, read while a command may still be creating the store: through the
    package's own opener, whose schema lock serialises table creation with the command's
    (optuna.load_study on a bare URL raced it: "table trial_intermediate_values already
    exists"). KeyError when the study does not exist yet."""
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(
            deepcopy=False)
    finally:
        storage.engine.dispose()

"""Run the package's commands as a user would, and read what they wrote.

``run_cli`` runs a command in this process (argv, environment and working folder patched,
its output captured, ``SystemExit`` caught): the same entry point and exit status as
``python -m kdig_study.<command>`` without a new interpreter importing torch, Optuna and
SciPy for every call (about 4 s each). ``run_process`` starts a real process: for what
needs a process boundary (signals, kills, concurrent workers, a server), and for the one
``python -m`` smoke test per command."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import optuna

from kdig_study.store import open_storage

from conftest import REPO


@contextlib.contextmanager
def _patched(argv: list[str], env: dict[str, str] | None, cwd: Path) -> Iterator[None]:
    import torch

    saved_env, saved_argv, saved_cwd = os.environ.copy(), sys.argv, os.getcwd()
    threads = torch.get_num_threads()
    os.environ.update(env or {})
    sys.argv = argv
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)  # a command may set its own (KDIG_THREADS)


def run_cli(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m kdig_study.<module> args`` in this process: its exit status, stdout and
    stderr as a subprocess would give them (an uncaught exception prints its traceback to
    stderr and exits 1, as the interpreter does). ``timeout`` is accepted for the
    subprocess form's signature; an in-process command is not interrupted."""
    from kdig_study.cli import run

    argv = [f"kdig_study.{module}", *args]
    out, err = io.StringIO(), io.StringIO()
    with _patched(argv, env, cwd or REPO), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        command = importlib.import_module(f"kdig_study.{module}")
        try:
            run(command.main)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # sys.exit("message"): the interpreter prints it and exits 1
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:  # what the interpreter would do with it
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([sys.executable, "-m", *argv], code, out.getvalue(),
                                       err.getvalue())


def run_process(module: str, *args: str, env: dict[str, str] | None = None,
                timeout: float = 600, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``python -m kdig_study.<module> args`` as a real process."""
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
        if hasattr(storage, "engine"):  # a journal file has no connections to close
            storage.engine.dispose()

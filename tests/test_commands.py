"""Every command starts as ``python -m kdig_study.<command>`` (one real process each; the
other command-line tests run the same entry points in-process), and none imports the heavy
libraries before its arguments are parsed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_helpers import run_process
from conftest import REPO

COMMANDS = ("ablate", "attribute", "bench", "dashboard", "export", "gpu_check", "optimize",
            "pruning", "report", "train")
HEAVY = ("torch", "torchvision", "captum", "optuna", "optuna_dashboard", "scipy",
         "statsmodels", "plotly", "onnx", "onnxruntime")


def test_the_command_list_is_every_command_module() -> None:
    with_main = sorted(p.stem for p in (REPO / "kdig_study").glob("*.py")
                       if "\nif __name__ == \"__main__\":\n    run(main)" in p.read_text())
    assert with_main == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_as_python_m(command: str) -> None:
    proc = run_process(command, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m kdig_study.{command}"), proc.stdout[:200]
    assert "Traceback" not in proc.stderr


def test_commands_parse_their_arguments_before_importing_heavy_libraries() -> None:
    """`--help` and a bad argument answer at once: the command modules import torch, Optuna,
    SciPy and the rest inside the work that needs them, not at import time."""
    code = ("import importlib, sys\n"
            f"for c in {COMMANDS!r}:\n"
            "    importlib.import_module('kdig_study.' + c)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_children_run_a_few_at_a_time_with_their_lines_labelled(
        capsys: pytest.CaptureFixture[str]) -> None:
    """run_children (ablate's tuning searches, --workers at once): each child's lines
    prefixed with its label, torch threads split between those running at once, and no
    child started after one failed."""
    from kdig_study.cli import run_children
    from kdig_study.measure import default_threads

    def child(text: str, code: int = 0) -> list[str]:
        return [sys.executable, "-c", f"import os, sys, time; time.sleep(0.3); "
                f"print({text!r}, os.environ['KDIG_THREADS']); sys.exit({code})"]

    ended: list[tuple[str, int]] = []
    codes = run_children([("a", child("one")), ("b", child("two", 3)), ("c", child("no"))], 2,
                         lambda label, code: ended.append((label, code)))
    assert codes == {"a": 0, "b": 3}  # c was still waiting when b failed
    assert sorted(ended) == [("a", 0), ("b", 3)]
    out = capsys.readouterr().out.splitlines()
    threads = max(1, default_threads() // 2)
    assert sorted(out) == [f"[a] one {threads}", f"[b] two {threads}"]
    assert run_children([("x", child("alone"))], 1) == {"x": 0}
    assert capsys.readouterr().out == f"[x] alone {default_threads()}\n"

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

"""Shared command-line plumbing: one-line errors, the common flags, the default scale."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

import torch

from kdig_study.config import SCALES, StudyConfig, load_study
from kdig_study.errors import KdigError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True,
                   help="study name in studies/ (e.g. kd_ig) or a path to a .toml file")
    p.add_argument("--scale", default=None,
                   help=f"{' | '.join(SCALES)}; default: paper with a GPU, cpu without")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 folder or archive (default: $KDIG_DATA, ./data, ../shared/data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def default_scale() -> str:
    return "paper" if torch.cuda.is_available() else "cpu"


def load_from_args(args: argparse.Namespace) -> StudyConfig:
    return load_study(args.study, args.scale or default_scale())


def run(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI entry point: a KdigError becomes one line on stderr and exit status 2;
    Ctrl-C exits with 130 after the entry point's own cleanup ran."""
    try:
        code = main() or 0
    except KdigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)

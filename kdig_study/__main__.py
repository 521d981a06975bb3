"""kdig: the harness's commands behind one entry point.

    kdig COMMAND [ARGS...]              (installed with the package)
    python -m kdig_study COMMAND [ARGS...]

is the same as ``python -m kdig_study.COMMAND [ARGS...]``, which keeps working. Without a
command it lists them; ``kdig COMMAND --help`` shows one command's flags.
"""

from __future__ import annotations

import importlib
import runpy
import sys

# The commands, in the order a study uses them: each is the module kdig_study.<name>.
COMMANDS = ("optimize", "ablate", "report", "export", "dashboard", "train", "attribute",
            "pruning", "bench", "gpu_check")


def summary(command: str) -> str:
    """The first sentence of the command module's docstring (importing it is cheap: the
    command modules import torch and Optuna only inside main)."""
    doc = importlib.import_module(f"kdig_study.{command}").__doc__ or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.split("; ")[0].split(". ")[0].rstrip(".")


def listing() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {c:<{width}}  {summary(c)}" for c in COMMANDS)
    return (f"usage: kdig COMMAND [ARGS...]  (or python -m kdig_study COMMAND ...)\n\n"
            f"commands:\n{rows}\n\n`kdig COMMAND --help` lists a command's flags.")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(listing())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; allowed: {', '.join(COMMANDS)} "
              f"(kdig --help lists them)", file=sys.stderr)
        return 2
    # The command's own module runs as if started with python -m, so its parser, its
    # one-line errors and its exit status are exactly those of that form.
    from kdig_study import cli

    cli.invoked_as = f"kdig {command}"
    sys.argv = [cli.invoked_as, *rest]
    runpy.run_module(f"kdig_study.{command}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

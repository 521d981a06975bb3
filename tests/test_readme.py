"""README.md's set-up commands are the ones CI runs, word for word."""

from __future__ import annotations

import re

from conftest import REPO


def _setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [ln.strip() for ln in section.splitlines() if ln.startswith("    ")]


def test_readme_opens_with_install_and_test_commands() -> None:
    install, test = _setup_commands()[:2]
    assert "pip install -e" in install and "pytest" in test


def test_ci_runs_exactly_the_readme_commands() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install, test = _setup_commands()[:2]
    assert install in ci and test in ci
    assert re.search(r"^export KDIG_SLOW=1$", "\n".join(ci), re.M)


def test_readme_commands_name_real_modules() -> None:
    text = (REPO / "README.md").read_text()
    for module in set(re.findall(r"python -m kdig_study\.(\w+)", text)):
        assert (REPO / "kdig_study" / f"{module}.py").is_file(), module

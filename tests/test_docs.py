"""README and docs/ say only what the code does, where a test can check it: the flags each
command is said to take, the study-file keys the docs name, the one entry point."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from functools import cache

import pytest

from kdig_study.__main__ import COMMANDS, listing
from kdig_study.__main__ import main as kdig_main
from kdig_study.config import SEARCH_PARAMETERS, ParamSpec, StudyConfig

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@cache
def _help(command: str) -> str:
    out = subprocess.run([sys.executable, "-m", f"kdig_study.{command}", "--help"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _flags_of(command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", _help(command)))


def _prose(path: typing.Any) -> str:
    """The file's text with indented code blocks and headings dropped, lines joined (a claim
    may wrap) and paragraphs ended (";")."""
    lines = [ln for ln in path.read_text().splitlines()
             if not ln.startswith(("    ", "#"))]
    return " ".join(ln if ln.strip() else ";" for ln in lines)


def _flag_claims(text: str) -> list[tuple[list[str], list[str]]]:
    """Every "`a`, `b` and `c` take `--x`, `--y` ..." clause: (commands, flags). Clauses end
    at ";" and at a sentence's end (". " before a capital or a command in backticks, not
    "e.g. `--set`")."""
    claims = []
    for clause in re.split(r";|\.\s+(?=[A-Z]|`[a-z]+`)", text):
        m = re.match(r"\s*((?:`\w+`(?:, | and ))*`\w+`) takes? (.*)", clause)
        if m:
            commands = re.findall(r"`(\w+)`", m.group(1))
            flags = re.findall(r"`(--[a-z][\w-]*)", m.group(2))
            claims.append((commands, flags))
    return claims


def test_the_claim_parser_reads_the_sentence_form() -> None:
    text = ("`a` and `b` take `--x N`, `--y` (e.g. `--y 2`), `--w`; `c` takes `--z`. Other "
            "text. `d` takes `--v`.")
    assert _flag_claims(text) == [(["a", "b"], ["--x", "--y", "--y", "--w"]), (["c"], ["--z"]),
                                  (["d"], ["--v"])]


@pytest.mark.parametrize("doc", [REPO / "README.md", REPO / "docs" / "usage.md"],
                         ids=lambda p: p.name)
def test_every_flag_the_docs_say_a_command_takes_it_takes(doc: typing.Any) -> None:
    claims = _flag_claims(_prose(doc))
    named = {c for commands, _ in claims for c in commands}
    # the shared flags are checked for each command said to take them
    shared = next(flags for commands, flags in claims if "optimize" in commands)
    assert {"--study", "--scale", "--set", "--data-dir", "--device"} <= set(shared), shared
    if doc.name == "usage.md":  # the --track section's claim too
        assert (["optimize", "ablate"], ["--track"] * 3) in claims
    # the sentence covers every command a user starts a study with
    assert {"optimize", "ablate", "train", "attribute", "export", "report", "pruning",
            "dashboard", "bench"} <= named, named
    for commands, flags in claims:
        assert flags, commands
        for command in commands:
            assert command in COMMANDS, command
            missing = set(flags) - _flags_of(command)
            assert not missing, f"{doc.name}: {command} does not take {sorted(missing)}"


def test_export_does_not_take_a_device_it_would_ignore() -> None:
    assert "--device" not in _flags_of("export")
    assert "--data-dir" in _flags_of("export")


def _sections() -> dict[str, set[str]]:
    hints = typing.get_type_hints(StudyConfig)
    sections = {name: {f.name for f in dataclasses.fields(tp)} for name, tp in hints.items()
                if dataclasses.is_dataclass(tp)}
    # [search.space.NAME]: a search parameter's range or choices
    spec = {f.name for f in dataclasses.fields(ParamSpec)}
    return sections | {f"search.space.{name}": spec for name in SEARCH_PARAMETERS}


_FILES = {"py", "onnx", "json", "csv", "npy", "safetensors", "toml", "html", "db", "md"}


def _named_keys(text: str) -> list[tuple[str, str]]:
    """(section, key) for every study-file key a text names in code spans: `[section] key =
    ...` and `section.key` (also in `--set section.key=...`); `[*_train]` is either role's,
    `[scales.*.expected]` the section `expected`."""
    sections = _sections()
    found = []
    for span in re.findall(r"`([^`]+)`", text):
        m = re.match(r"\[([\w.*]+)\]\s+(\w+)", span)
        if m:
            table = m.group(1)
            found.append((table if table.startswith("search.space.")
                          else table.split(".")[-1], m.group(2)))
            continue
        for sec, key, ext in re.findall(
                r"(?<![\w.])([a-z_*]+)\.([a-z_0-9]+)(?![\w(])(\.[a-z]+)?", span):
            if {key, ext[1:]}.isdisjoint(_FILES) and (sec in sections or sec == "*_train"):
                found.append((sec, key))
    return found


def test_every_study_file_key_the_docs_name_exists() -> None:
    sections = _sections()
    checked = 0
    for doc in DOCS:
        for sec, key in _named_keys(doc.read_text()):
            roles = ("teacher_train", "student_train") if sec == "*_train" else (sec,)
            for role in roles:
                assert role in sections, f"{doc.name}: no section [{role}] (for key {key})"
                assert key in sections[role], (
                    f"{doc.name}: [{role}] has no key '{key}'; it has "
                    f"{', '.join(sorted(sections[role]))}")
                checked += 1
    assert checked >= 20  # the docs name many keys; a broken pattern would find none


def test_the_key_check_catches_a_stale_key() -> None:
    stale = ("`[teacher] stem = \"whiten\"` and `--set student_train.epochs=2` and `kd.nope` "
             "but not `student.int8.onnx`")
    assert _named_keys(stale) == [("teacher", "stem"), ("student_train", "epochs"),
                                  ("kd", "nope")]
    assert "stem" not in _sections()["teacher"]


def test_kdig_lists_every_command_and_refuses_an_unknown_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert kdig_main([]) == 0
    out = capsys.readouterr().out
    assert out.strip() == listing()
    for command in COMMANDS:
        assert re.search(rf"^  {command}\s+\S", out, re.M), command
        assert (REPO / "kdig_study" / f"{command}.py").is_file()
    assert kdig_main(["nope"]) == 2
    assert "unknown command 'nope'; allowed: optimize" in capsys.readouterr().err


def test_kdig_runs_a_command_as_python_m_does() -> None:
    """`python -m kdig_study report ...` is the report command: its own one-line error and
    exit status."""
    args = ["report", "--study", "kd_ig", "--scale", "nope"]
    via_kdig = subprocess.run([sys.executable, "-m", "kdig_study", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    direct = subprocess.run([sys.executable, "-m", "kdig_study.report", *args[1:]], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert via_kdig.returncode == direct.returncode == 2
    assert via_kdig.stderr == direct.stderr == ("error: unknown scale 'nope'; allowed: "
                                                "smoke, cpu, paper\n")
    bad = subprocess.run([sys.executable, "-m", "kdig_study", "report", "--nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "(see kdig report --help)" in bad.stderr


def test_the_kdig_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\[project\.scripts\]\nkdig = "kdig_study\.__main__:main"$', text, re.M)

"""Atomic writes: all or nothing, and the file mode a plain open() would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdig_study.paths import atomic_write


def test_atomic_write_replaces_and_uses_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    old = os.umask(0o022)
    try:
        atomic_write(target, lambda tmp: tmp.write_text("one"))
        assert target.read_text() == "one"
        assert target.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(target, lambda tmp: tmp.write_text("two"))
        assert target.read_text() == "two"
        assert target.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]

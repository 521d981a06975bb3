"""Where things live on disk, and how files are written so that Ctrl-C never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock


def storage_dir() -> Path:
    """$KDIG_STORAGE, else ./storage (the study store, artifacts, checkpoints)."""
    return Path(os.environ.get("KDIG_STORAGE", "storage"))


def cache_dir() -> Path:
    """$KDIG_CACHE, else <storage>/cache: decoded data, teachers, IG maps.

    Workers on several machines point $KDIG_CACHE at one shared folder.
    """
    env = os.environ.get("KDIG_CACHE")
    return Path(env) if env else storage_dir() / "cache"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see the old file or the new one, never a
    partial one, and an interrupt leaves at most a stray ``.tmp`` file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name that ``write`` creates itself: the file gets the mode a plain
    # open() gives (mkstemp's 0600 would make reports and shared caches private).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True,
                                                             default=str)))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An inter-process lock (a ``.lock`` file beside ``path``): one worker computes, the
    others wait and then find the result already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield

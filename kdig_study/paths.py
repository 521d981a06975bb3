"""Where things live on disk, and how files are written so that Ctrl-C never leaves half a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from safetensors import SafetensorError

from kdig_study.errors import KdigError


def storage_dir() -> Path:
    """$KDIG_STORAGE, else ./storage (the study store, artifacts, checkpoints)."""
    return Path(os.environ.get("KDIG_STORAGE", "storage"))


def cache_dir() -> Path:
    """$KDIG_CACHE, else <storage>/cache: decoded data, teachers, IG maps.

    Workers on several machines point $KDIG_CACHE at one shared folder.
    """
    env = os.environ.get("KDIG_CACHE")
    return Path(env) if env else storage_dir() / "cache"


def safe_name(name: str) -> str:
    """A file-name stem for a study name (or any stored string) that stays inside its folder.

    Names of letters, digits, '.', '_' and '-' (not starting with '.') are used as they are.
    Any other name becomes its safe characters with each run of others replaced by '-', plus
    8 hex digits of its hash, so two names never share a file ('a/b' and 'a-b' differ). A
    name with no safe character is refused. Study names come from the command line and from
    shared stores that others write to: '../x', '/', '<script>' must not reach a path.
    """
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) and ".." not in name and \
            len(name) <= 150:
        return name
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name.replace("..", "-")).strip("-")[:120]
    if not re.search(r"[A-Za-z0-9]", slug):
        raise KdigError(f"study name {name!r} has no letter or digit to make a file name of; "
                        f"allowed: letters, digits, '.', '_', '-'")
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see the old file or the new one, never a
    partial one, and an interrupt leaves at most a stray ``.tmp`` file behind. The file gets
    the mode a plain open() gives under the umask (safetensors writes 0600, which made a
    shared cache's teacher unreadable to other users). A folder that cannot be written is
    one line naming it. ``durable``: the file and then its folder are flushed to disk
    (fsync) around the rename, so a power cut or a killed machine leaves the old file or the
    new one, never an empty name (mid-run checkpoints).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except (OSError, SafetensorError) as e:  # safetensors' own error for a full disk
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise KdigError(f"cannot write {path}: {why}; check that the folder is writable and "
                        f"has space (or point KDIG_STORAGE / KDIG_CACHE elsewhere)") from None
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writable_folder(path: Path, what: str) -> Path:
    """``path`` as a folder files can be written to, made if absent, checked before any work
    (an output found unwritable after hours of training loses them): or one line naming
    ``what`` (e.g. "--out")."""
    if path.exists() and not path.is_dir():
        raise KdigError(f"{what} {path} is a file; give a folder (it is made if absent)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KdigError(f"{what} {path} is not writable ({e.strerror or e}); give a writable "
                        f"folder") from None
    return path


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True,
                                                             default=str)))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An inter-process lock (a ``.lock`` file beside ``path``): one worker computes, the
    others wait and then find the result already there.

    In a folder this process cannot write (a read-only shared cache), no lock can be taken
    and none is needed to read what is there: the block runs unlocked, and any write it
    attempts fails with one line (atomic_write)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in 4 MiB blocks (weights and map stores can be large)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

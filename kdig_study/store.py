"""The Optuna study store: storage URLs, study identity, artifacts, and the lock that hands
out trial slots so that any number of workers finish exactly the trials asked for."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from filelock import FileLock
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from kdig_study import __version__
from kdig_study.config import StudyConfig
from kdig_study.errors import KdigError
from kdig_study.paths import storage_dir

_HELP_URL = "e.g. sqlite:///storage/kdig.db or postgresql+psycopg://user@host:5432/db"


class _NoInterruptTraceback(logging.Filter):
    """Ctrl-C fails the running trial (as it should); Optuna would log it with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def quiet_optuna_logs() -> None:
    """Our commands print their own line per trial; Optuna's INFO lines would repeat them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _NoInterruptTraceback) for f in handler.filters):
            handler.addFilter(_NoInterruptTraceback())


def default_url() -> str:
    return f"sqlite:///{storage_dir() / 'kdig.db'}"


def artifacts_dir() -> Path:
    """$KDIG_ARTIFACTS, else <storage>/artifacts (workers on several machines share it)."""
    env = os.environ.get("KDIG_ARTIFACTS")
    return Path(env) if env else storage_dir() / "artifacts"


def artifact_store() -> FileSystemArtifactStore:
    path = artifacts_dir()
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_storage(url: str, heartbeat_interval: int = 60, max_retry: int = 3) -> RDBStorage:
    """An RDBStorage for SQLite or PostgreSQL, with heartbeats: a trial whose worker stops
    beating for 2 x ``heartbeat_interval`` seconds becomes FAIL and is queued again (up to
    ``max_retry`` times)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise KdigError(f"--storage {url!r} is not a database URL; {_HELP_URL}") from None
    backend = parsed.get_backend_name()
    engine_kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise KdigError(f"--storage {url!r}: an SQLite store needs a file; {_HELP_URL}")
        db = Path(parsed.database)
        db.parent.mkdir(parents=True, exist_ok=True)
        try:
            # WAL lets readers (the dashboard, other workers) go on while one worker writes;
            # it is a property of the file, set once.
            with contextlib.closing(sqlite3.connect(db)) as con:
                con.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise KdigError(f"cannot open SQLite store {db}: {e}") from None
        # Wait up to 60 s for a lock instead of failing with "database is locked".
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif backend == "postgresql":
        engine_kwargs["pool_pre_ping"] = True
    else:
        raise KdigError(f"--storage {url!r}: unsupported database '{backend}'; allowed: "
                        f"sqlite, postgresql ({_HELP_URL})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=2 * heartbeat_interval,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retry, inherit_intermediate_values=False))
    except ModuleNotFoundError as e:
        raise KdigError(f"--storage {url!r}: database driver missing ({e}); for PostgreSQL "
                        f"install it with: pip install -e \".[postgres]\"") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise KdigError(f"cannot connect to study store {parsed.render_as_string()}: "
                        f"{_first_line(e)}") from None
    if backend == "sqlite":
        # In WAL mode, synchronous=NORMAL cannot corrupt the file; it skips an fsync per
        # commit (a power cut may lose the last commits, never the store). Each trial writes
        # a few dozen small transactions, so this is most of the store's cost per trial.
        sqlalchemy.event.listen(storage.engine, "connect",
                                lambda con, _: con.execute("PRAGMA synchronous=NORMAL"))
        storage.engine.dispose()  # connections made so far lack the pragma
    return storage


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def study_attrs(cfg: StudyConfig) -> dict[str, Any]:
    config = cfg.to_dict()
    config.pop("source")
    return {"config": config, "config_fingerprint": cfg.fingerprint(), "scale": cfg.scale,
            "study_file": cfg.name, "kdig_version": __version__, "git_commit": git_commit(),
            "torch_version": torch.__version__, "optuna_version": optuna.__version__}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}.{k}" if prefix else k)
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def open_study(storage: RDBStorage, name: str, cfg: StudyConfig,
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
               directions: list[str], url: str) -> optuna.Study:
    """Create the study, or load it if its config is the same one; refuse a changed config."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                pruner=pruner, directions=directions, load_if_exists=True)
    attrs = study.user_attrs
    if "config_fingerprint" not in attrs:
        for k, v in study_attrs(cfg).items():
            study.set_user_attr(k, v)
        return study
    if attrs["config_fingerprint"] != cfg.fingerprint():
        new = study_attrs(cfg)["config"]
        keys = changed_keys(attrs.get("config", {}), new)
        raise KdigError(
            f"study '{name}' in {url} was made with another config (changed: "
            f"{', '.join(keys[:6]) or 'unknown'}{' ...' if len(keys) > 6 else ''}); "
            f"run with --study-name NEW to start a new study, or restore the config")
    if [d.name.lower() for d in study.directions] != directions:
        raise KdigError(f"study '{name}' in {url} optimises {len(study.directions)} "
                        f"objective(s), this config {len(directions)}; use --study-name NEW")
    return study


class SlotLock:
    """Held from 'are trials still wanted?' until the new trial is RUNNING in the store, so
    that N workers never start more trials than asked for. SQLite (one machine): a file lock
    beside the database; PostgreSQL (many machines): a session-level advisory lock."""

    def __init__(self, storage: RDBStorage, study_name: str) -> None:
        self._engine = storage.engine
        self._key = zlib.crc32(f"kdig-slots:{study_name}".encode()) & 0x7FFFFFFF
        self._file: FileLock | None = None
        self._conn: sqlalchemy.Connection | None = None
        if self._engine.dialect.name == "sqlite":
            db = self._engine.url.database
            self._file = FileLock(f"{db}.{self._key}.slots.lock")
        self.held = False

    def acquire(self) -> None:
        if self._file is not None:
            self._file.acquire()
        else:
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._file is not None:
            self._file.release()
        elif self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"),
                               {"k": self._key})
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def held_until_released(self) -> Iterator[SlotLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

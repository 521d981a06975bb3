"""The Optuna study store: storage URLs, study identity, artifacts, and failing the trials of
dead workers (kdig_study.slots hands out the trial slots)."""

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
from filelock import FileLock
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from kdig_study import __version__
from kdig_study.config import StudyConfig, identity
from kdig_study.errors import KdigError
from kdig_study.optuna_adapter import HeartbeatJournalStorage, StaleAwareRDBStorage
from kdig_study.paths import storage_dir, writable_folder

_HELP_URL = ("e.g. sqlite:///storage/kdig.db, postgresql+psycopg://user@host:5432/db or "
             "journal:///shared/kdig.journal")
# a journal file (Optuna's JournalStorage): journal:///abs/path or journal:relative/path
JOURNAL = "journal:"

# what open_storage returns: a database, or a journal file on shared storage
Storage = RDBStorage | HeartbeatJournalStorage


class FailedElsewhere(Exception):
    """Another process failed this worker's trial while it ran (its heartbeat looked stale
    there): its result must not be told."""


class _NoInterruptTraceback(logging.Filter):
    """Ctrl-C fails the running trial (as it should), and so do another process that took it
    for a dead worker's and a KdigError (e.g. a full disk); Optuna would log each with a
    traceback, where the command says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(
            record.exc_info[1], (KeyboardInterrupt, FailedElsewhere, KdigError,
                                 optuna.exceptions.UpdateFinishedTrialError)))


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


def artifact_store(check_writable: bool = False) -> FileSystemArtifactStore:
    """The artifact store; ``check_writable``: prove up front that files can be written
    there (a read-only folder used to fail each trial after it had trained)."""
    path = artifacts_dir()
    try:
        if check_writable:
            writable_folder(path, "artifact folder")
        else:
            path.mkdir(parents=True, exist_ok=True)
    except (OSError, KdigError) as e:
        raise KdigError(f"artifact folder {path} is not writable "
                        f"({getattr(e, 'strerror', None) or e}); point KDIG_ARTIFACTS (or "
                        f"KDIG_STORAGE) at a writable folder") from None
    return FileSystemArtifactStore(path)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# How many times one trial is retried (its worker died, or it was interrupted): each retry
# goes on from the trial's last checkpoint.
MAX_RETRY = 3


def fail_stale(study: optuna.Study) -> None:
    """Fail (and queue again, up to the retry limit) the trials of dead workers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def _schema_lock(backend: str, url: str, db: Path | None, engine_kwargs: dict[str, Any]
                 ) -> Iterator[None]:
    """Serialise the creation of Optuna's tables: two commands starting at once on an empty
    store raced (SQLite: alembic_version UNIQUE; PostgreSQL: pg_type duplicate key), and that
    is how several machines start. SQLite: a file lock beside the database; PostgreSQL: an
    advisory lock held on its own connection while the storage is made."""
    if backend == "sqlite":
        assert db is not None
        with FileLock(f"{db}.schema.lock"):
            yield
        return
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    key = zlib.crc32(b"kdig-schema") & 0x7FFFFFFF
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def _stale_callback(max_retry: int) -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry,
                                                inherit_intermediate_values=True)


def journal_path(url: str) -> Path | None:
    """The file of a journal:... store URL, else None."""
    if not url.startswith(JOURNAL):
        return None
    rest = url[len(JOURNAL):]
    return Path(rest[2:] if rest.startswith("//") else rest)


def _open_journal(path: Path, url: str, heartbeat_interval: int, max_retry: int,
                  existing: bool) -> HeartbeatJournalStorage:
    if not path.name:
        raise KdigError(f"--storage {url!r}: a journal store needs a file; {_HELP_URL}")
    if existing and not path.is_file():  # never an empty store by a typo
        raise KdigError(f"no journal store at {path}: check --storage; `optimize` and "
                        f"`ablate` make one")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(str(path), heartbeat_interval, 2 * heartbeat_interval,
                                       _stale_callback(max_retry))
    except OSError as e:
        raise KdigError(f"cannot open journal store {path}: {e.strerror or e}; choose a "
                        f"writable folder") from None


def open_storage(url: str, heartbeat_interval: int = 60, max_retry: int = MAX_RETRY,
                 read_only: bool = False, existing: bool = False) -> Storage:
    """A store with heartbeats: a trial whose worker stops beating for 2 x
    ``heartbeat_interval`` seconds becomes FAIL and is queued again (up to ``max_retry``
    times). SQLite or PostgreSQL (RDBStorage), or a journal file (``journal:PATH``: Optuna's
    JournalStorage, for clusters with shared storage and no database server). ``read_only``:
    an SQLite file opened for reading only (e.g. a store on a read-only disk, for a report);
    nothing is created or changed. ``existing``: a file that must be there already
    (commands that read a store)."""
    journal = journal_path(url)
    if journal is not None:
        return _open_journal(journal, url, heartbeat_interval, max_retry,
                             existing or read_only)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise KdigError(f"--storage {url!r} is not a database URL; {_HELP_URL}") from None
    backend = parsed.get_backend_name()
    engine_kwargs: dict[str, Any] = {}
    db: Path | None = None
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise KdigError(f"--storage {url!r}: an SQLite store needs a file; {_HELP_URL}")
        db = Path(parsed.database)
        if (existing or read_only) and not db.is_file():  # never an empty store by a typo
            raise KdigError(f"no SQLite store at {db}: check --storage (or KDIG_STORAGE); "
                            f"`optimize` and `ablate` make one")
        if read_only:
            return _read_only_sqlite(db)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            # WAL lets readers (the dashboard, other workers) go on while one worker writes;
            # it is a property of the file, set once.
            with contextlib.closing(sqlite3.connect(db)) as con:
                con.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as e:
            raise KdigError(f"cannot open SQLite store {db}: {getattr(e, 'strerror', None) or e}"
                            f"; choose a writable folder (--storage sqlite:///PATH, or "
                            f"KDIG_STORAGE)") from None
        # Wait up to 60 s for a lock instead of failing with "database is locked".
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif backend == "postgresql":
        engine_kwargs["pool_pre_ping"] = True
    else:
        raise KdigError(f"--storage {url!r}: unsupported database '{backend}'; allowed: "
                        f"sqlite, postgresql, journal ({_HELP_URL})")
    try:
        with warnings.catch_warnings(), _schema_lock(backend, url, db, engine_kwargs):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = StaleAwareRDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=2 * heartbeat_interval,
                heartbeat_stale_trial_callback=_stale_callback(max_retry))
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


def _read_only_sqlite(db: Path) -> RDBStorage:
    """An SQLite store opened read-only. Where its write-ahead log holds transactions not
    yet folded into the file (a search still running, or one that was killed) and the folder
    is writable, SQLite's read-only mode reads them too; otherwise (a read-only disk) the
    immutable mode, which needs no -wal/-shm files, reads the file alone."""
    wal = db.with_name(db.name + "-wal")
    live = wal.is_file() and wal.stat().st_size > 0 and os.access(db.parent, os.W_OK)
    uri = f"sqlite:///file:{db.resolve()}?mode=ro" + ("" if live else "&immutable=1") + \
        "&uri=true"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(uri, skip_table_creation=True, skip_compatibility_check=True)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise KdigError(f"cannot read SQLite store {db}: {_first_line(e)}") from None


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


def use_study_heartbeat(study: optuna.Study, storage: Storage, log: Any = print) -> None:
    """Beat at the interval the study was made with (a study made before it was recorded
    gets this process's)."""
    recorded = study.user_attrs.get("heartbeat_interval")
    if recorded is None:
        study.set_user_attr("heartbeat_interval", storage.heartbeat_interval)
    elif recorded != storage.heartbeat_interval:
        log(f"--heartbeat {storage.heartbeat_interval}: study '{study.study_name}' beats every "
            f"{recorded} s (set when it was made; every worker uses it): using {recorded} s",
            flush=True)
        storage.heartbeat_interval = recorded
        storage.grace_period = 2 * recorded


def study_attrs(cfg: StudyConfig) -> dict[str, Any]:
    import torch  # only for its version: a command that reads the store need not load it

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
    """The keys (``section.key``) whose values differ between two configs, counting only
    what results depend on, compared in JSON's types (a stored list is a config's tuple)."""
    a, b = _flatten(identity(old)), _flatten(identity(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_precision(study: optuna.Study, name: str, url: str, precision: dict[str, str],
                    device: str) -> None:
    """Record the precision on a study made before it was recorded; refuse another one."""
    recorded = study.user_attrs.get("precision")
    if recorded is None:
        study.set_user_attr("precision", precision | {"device": device})
        return
    differ = [k for k in precision if recorded.get(k) != precision[k]]
    if differ:
        raise KdigError(
            f"study '{name}' in {url} was made with {_parts(recorded, differ)} on "
            f"{recorded.get('device', '?')}; here ({device}) the config resolves "
            f"{_parts(precision, differ)}, which would train another teacher and maps for "
            f"one study: run it where the precision resolves the same, or as a study of "
            f"its own (--study-name NEW)")


def _parts(precision: dict[str, str], keys: list[str]) -> str:
    return ", ".join(f"{k} at {precision.get(k, '?')}" for k in keys)


def open_study(storage: Storage, name: str, cfg: StudyConfig,
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
               directions: list[str], url: str, *, data_fingerprint: str,
               data_origin: str, precision: dict[str, str], device: str,
               log: Any = print) -> optuna.Study:
    """Create the study, or load it if its config and data are the same ones; refuse a
    changed config or other data (trials trained on two data sets are not one study).

    ``precision`` is what the teacher, maps and students run at on this machine ("auto"
    resolved on ``device``); the study records it, and a machine where it resolves
    otherwise is refused: its workers would train a second teacher and second maps for the
    same study (their fingerprints hold the precision) and mix fp32 and bf16 trials.

    The heartbeat interval is the study's, recorded when it is made: a process that asks
    for another one uses the study's (said in one line). Two intervals on one study made
    the shorter one fail the other's live trials as stale, destroying their work."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                pruner=pruner, directions=directions, load_if_exists=True)
    attrs = study.user_attrs
    if "config_fingerprint" not in attrs:
        for k, v in study_attrs(cfg).items():
            study.set_user_attr(k, v)
        study.set_user_attr("data_fingerprint", data_fingerprint)
        study.set_user_attr("data_origin", data_origin)
        study.set_user_attr("precision", precision | {"device": device})
        study.set_user_attr("heartbeat_interval", storage.heartbeat_interval)
        # two machines that made the study at once: the last record stands, and the other
        # machine, reading it back, is refused like any later one
        check_precision(study, name, url, precision, device)
        return study
    use_study_heartbeat(study, storage, log)
    check_precision(study, name, url, precision, device)
    recorded = attrs.get("data_fingerprint")
    if recorded is None:  # a study made before data was part of its identity
        study.set_user_attr("data_fingerprint", data_fingerprint)
        study.set_user_attr("data_origin", data_origin)
    elif recorded != data_fingerprint:
        raise KdigError(
            f"study '{name}' in {url} was made on other data ({attrs.get('data_origin', '?')},"
            f" fingerprint {recorded[:12]}); this run's data is {data_origin} (fingerprint "
            f"{data_fingerprint[:12]}): give the study's --data-dir, or --study-name NEW")
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

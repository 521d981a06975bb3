"""Hostile input and awkward moments: study names that try to leave their folder, stored
strings that try to reach a path, bad files, read-only folders, a busy port, a damaged
teacher, two commands starting on an empty store. Each answer is one line, or the right
thing done quietly; never a traceback, never a file outside its folder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch

from kdig_study.config import load_study
from kdig_study.data import load_bundle
from kdig_study.errors import KdigError
from kdig_study.optuna_adapter import storage_of
from kdig_study.paths import safe_name

from cli_helpers import assert_one_line_error, run_cli, run_process
from conftest import REPO

CPU = torch.device("cpu")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` bind-mounted read-only at a new path (root and mount needed, else skip)."""
    target = folder.parent / f"{folder.name}-ro"
    target.mkdir()
    ok = subprocess.run(["mount", "--bind", str(folder), str(target)],
                        capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)],
                       capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(target)], capture_output=True)
        pytest.skip("a read-only folder needs a bind mount (root): not available here")
    try:
        yield target
    finally:
        # lazy: a store the test opened may still hold a file there, and a mount left behind
        # makes every later pytest run fail to clean its temporary folders
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# -- study names and stored strings ---------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped-kdig", "<script>alert(1)</script>", "a/b",
                                  "/etc/passwd", "x\ny", "-rf"])
def test_safe_name_stays_inside_its_folder(name: str, tmp_path: Path) -> None:
    slug = safe_name(name)
    assert "/" not in slug and "\n" not in slug and not slug.startswith(".")
    assert (tmp_path / f"{slug}.html").resolve().parent == tmp_path.resolve()
    assert safe_name(name) == slug and safe_name(name + "x") != slug  # stable, unambiguous


def test_a_name_with_nothing_to_slug_is_refused() -> None:
    with pytest.raises(KdigError, match="no letter or digit"):
        safe_name("../..")


@pytest.mark.slow
def test_study_names_never_write_outside_the_chosen_folder(tmp_path: Path,
                                                           isolated_storage: Path,
                                                           warm_cache: Path) -> None:
    out = tmp_path / "deep" / "out"
    name = "../../escaped-kdig"
    # a real process: the report below opens the store read-only (SQLite's immutable mode,
    # which reads the file, not its write-ahead log), as after a search that has exited
    proc = run_process("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                       "--n-trials", "1", "--study-name", name)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("report", "--study", "kd_ig", "--scale", "smoke", "--study-name", name,
                   "--out", str(out), "--no-dashboard")
    assert proc.returncode == 0, proc.stderr
    params = tmp_path / "p.toml"
    params.write_text("[params]\ntemperature = 4.0\nalpha = 0.5\n")
    proc = run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--seeds", "1", "--factors", "kd", "--params", str(params),
                   "--study-name", "<script>alert(1)</script>", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()
                     and p.suffix in (".html", ".json", ".csv")
                     and not p.is_relative_to(isolated_storage))
    assert all(str(p).startswith("deep/out/") and p.parent == Path("deep/out")
               for p in written), written
    assert any(p.name.startswith("escaped-kdig-") and p.suffix == ".html" for p in written)
    assert not list(tmp_path.glob("escaped*")) and not (tmp_path.parent / "escaped-kdig.html"
                                                        ).exists()


def test_a_stored_artifact_id_cannot_read_outside_the_artifact_store(
        tmp_path: Path, isolated_storage: Path) -> None:
    """A shared store that others write to could hold an artifact id like ../secret.png:
    the report must not inline a file from outside the artifact folder."""
    import base64

    from optuna.trial import create_trial

    from kdig_study.report import build, render

    url = f"sqlite:///{tmp_path}/r.db"
    study = optuna.create_study(study_name="kd_ig-cpu", storage=url, direction="maximize")
    (isolated_storage / "artifacts").mkdir(parents=True)
    secret = b"\x89PNG\r\n\x1a\n secret bytes outside the artifact store"
    (isolated_storage / "secret.png").write_bytes(secret)
    study.add_trial(create_trial(params={}, distributions={}, value=0.5, system_attrs={
        "artifacts:evil": json.dumps({"artifact_id": "../secret.png", "filename": "evil.png",
                                      "mimetype": "image/png", "encoding": None})}))
    html = render(build(storage_of(study), url, "kd_ig-cpu"))
    gallery = html.split("<section id='gallery'>")[1].split("</section>")[0]
    assert base64.b64encode(secret).decode()[:40] not in html
    assert "could not be read" in gallery


# -- bad files and folders ------------------------------------------------------------------

def test_study_file_with_invalid_utf8_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'description = "caf\xe9"\n')
    assert_one_line_error(run_cli("optimize", "--study", str(bad), "--scale", "smoke"),
                          "not valid UTF-8")


def test_storage_folder_that_cannot_be_created_is_one_line() -> None:
    assert_one_line_error(run_cli("optimize", "--study", "kd_ig", "--scale", "smoke",
                                  "--storage", "sqlite:////proc/nosuch/x.db"),
                          "cannot open SQLite store /proc/nosuch/x.db", "writable folder")


def test_unwritable_artifact_folder_is_one_line_before_any_training(tmp_path: Path) -> None:
    blocker = tmp_path / "artifacts"
    blocker.write_text("a file where the folder should be")
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "1", env={"KDIG_ARTIFACTS": str(blocker)})
    assert_one_line_error(proc, f"artifact folder {blocker} is not writable", "KDIG_ARTIFACTS")
    assert "training teacher" not in proc.stdout


def test_a_read_only_cache_is_read_without_locking(tmp_path: Path, isolated_storage: Path,
                                                   warm_teacher: Path) -> None:
    cache = isolated_storage / "cache"
    first = run_cli("train", "--study", "kd_ig", "--scale", "smoke", "--role", "teacher",
                    "--no-progress")
    assert first.returncode == 0, first.stderr
    with read_only(cache) as ro:
        again = run_cli("train", "--study", "kd_ig", "--scale", "smoke", "--role", "teacher",
                        "--no-progress", env={"KDIG_CACHE": str(ro)})
        assert again.returncode == 0, again.stderr
        assert "training teacher" not in again.stdout
        # attribute writes there: one line naming the folder, before any work (it was found
        # after the maps were made)
        missing = run_cli("attribute", "--study", "kd_ig", "--scale", "smoke",
                          "--no-progress", env={"KDIG_CACHE": str(ro)})
        assert_one_line_error(missing, f"cache folder (KDIG_CACHE) {ro} is not writable",
                              "Read-only file system")
        assert "teacher" not in missing.stdout


def test_report_reads_a_read_only_store_without_dashboard(tmp_path: Path) -> None:
    from test_report import _search_study

    folder = tmp_path / "store"
    folder.mkdir()
    _search_study(f"sqlite:///{folder}/s.db")
    with read_only(folder) as ro:
        out = tmp_path / "out"
        proc = run_cli("report", "--study", "kd_ig", "--scale", "cpu", "--storage",
                       f"sqlite:///{ro}/s.db", "--no-dashboard", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert (out / "kd_ig-cpu.html").is_file()


def test_dashboard_on_a_busy_port_is_one_line(isolated_storage: Path) -> None:
    from kdig_study.store import open_storage

    open_storage(f"sqlite:///{isolated_storage}/kdig.db")  # a store to serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run_cli("dashboard", "--port", str(port), timeout=60),
                              f"cannot serve on 127.0.0.1:{port}", "--port")


@pytest.mark.slow
def test_sweep_rerun_with_other_values_is_refused_before_any_run(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    params = tmp_path / "p.toml"
    params.write_text("[params]\ntemperature = 4.0\nalpha = 0.5\n")
    base = ["--study", "kd_ig", "--scale", "smoke", "--no-progress", "--seeds", "1",
            "--factors", "kd", "--params", str(params), "--out", str(tmp_path)]
    assert run_cli("ablate", *base, "--sweep", "width=0.125").returncode == 0
    proc = run_cli("ablate", *base, "--sweep", "width=0.125,0.25")
    assert_one_line_error(proc, "ran with another sweep_values", "--study-name")
    study = optuna.load_study(study_name="kd_ig-smoke.ablation-sweep-width",
                              storage=f"sqlite:///{isolated_storage}/kdig.db")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]


# -- the teacher ----------------------------------------------------------------------------

def test_a_damaged_teacher_checkpoint_is_detected_and_retrained(isolated_storage: Path) -> None:
    from kdig_study.teacher import get_teacher

    cfg = load_study("kd_ig", "smoke", ["teacher_train.epochs=1"])
    data = load_bundle(cfg.data)
    first = get_teacher(cfg, data, CPU, progress=False, log=lambda *a: None)
    assert first.trained_now and len(first.meta["sha256"]) == 64
    # a shared cache: other users must be able to read it (safetensors writes 0600)
    assert oct(first.path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    raw = bytearray(first.path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 2000] = bytes(2000)  # zero 2 KB inside the weights
    first.path.write_bytes(bytes(raw))
    lines: list[str] = []
    again = get_teacher(cfg, data, CPU, progress=False, log=lines.append)
    assert again.trained_now and any("checksum mismatch" in ln for ln in lines)
    third = get_teacher(cfg, data, CPU, progress=False, log=lines.append)
    assert not third.trained_now


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_users_own_teacher_is_loaded_strictly_and_fingerprinted_by_its_file(
        tmp_path: Path, isolated_storage: Path) -> None:
    from safetensors.torch import save_file

    from kdig_study.models import build_model
    from kdig_study.teacher import get_teacher, teacher_fingerprint

    cfg = load_study("kd_ig", "smoke")
    data = load_bundle(cfg.data)
    model = build_model(cfg.teacher)
    mine = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(mine))
    given = load_study("kd_ig", "smoke", [f'teacher.weights="{mine}"'])
    t = get_teacher(given, data, CPU, progress=False, log=lambda *a: None)
    assert t.meta["given"] == str(mine) and 0 <= t.meta["test_acc"] <= 1
    for a, b in zip(t.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b)
    fp = teacher_fingerprint(given, data, CPU)
    assert fp != teacher_fingerprint(cfg, data, CPU)
    # other weights in the same file name: another teacher
    save_file({k: (v + 1).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, str(mine))
    assert teacher_fingerprint(given, data, CPU) != fp
    # weights of another architecture: one line
    wrong = load_study("kd_ig", "smoke", [f'teacher.weights="{mine}"', "teacher.width=0.5"])
    with pytest.raises(KdigError) as e:
        get_teacher(wrong, data, CPU, progress=False, log=lambda *a: None)
    assert "does not fit a convnet teacher of width 0.5" in str(e.value)
    assert "\n" not in str(e.value)
    proc = run_cli("train", "--study", "kd_ig", "--scale", "smoke", "--role", "teacher",
                   "--set", f'teacher.weights="{tmp_path / "none.safetensors"}"')
    assert_one_line_error(proc, "teacher.weights", "no such file")


# -- two commands on an empty store ---------------------------------------------------------

def _race(url: str, n: int = 4) -> list[subprocess.CompletedProcess[str]]:
    code = ("import sys, optuna; from kdig_study.store import open_storage; "
            "s = open_storage(sys.argv[1]); "
            "optuna.create_study(study_name='race', storage=s, load_if_exists=True)")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate())
            for p in procs]


@pytest.mark.slow  # 12 processes racing (about 12 s)
def test_simultaneous_first_start_on_an_empty_sqlite_store(tmp_path: Path) -> None:
    for attempt in range(3):
        results = _race(f"sqlite:///{tmp_path}/race{attempt}.db")
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]


@pytest.mark.slow  # 4 processes racing (about 5 s)
def test_simultaneous_first_start_on_an_empty_postgresql_database() -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from test_optimize import PG_URL, _postgres_reachable

    why = _postgres_reachable()
    if why:
        pytest.skip(why)
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    db = f"kdig_race_{uuid.uuid4().hex[:8]}"
    with admin.connect() as con:
        con.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
    try:
        url = PG_URL.rsplit("/", 1)[0] + f"/{db}"
        results = _race(url)
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
    finally:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f"DROP DATABASE {db} WITH (FORCE)"))
        admin.dispose()


def test_a_read_only_report_sees_what_a_running_search_has_committed(tmp_path: Path) -> None:
    """SQLite's immutable mode reads the file, not its write-ahead log: a read-only reader
    missed every trial a live (or killed) search had committed but not yet checkpointed."""
    from optuna.trial import create_trial

    from kdig_study.store import open_storage

    url = f"sqlite:///{tmp_path}/live.db"
    writer = open_storage(url)  # WAL mode, held open like a running search
    study = optuna.create_study(study_name="live", storage=writer, direction="maximize")
    study.add_trial(create_trial(params={}, distributions={}, value=0.5))
    assert (tmp_path / "live.db-wal").stat().st_size > 0  # committed, still in the log
    reader = open_storage(url, read_only=True)
    seen = optuna.load_study(study_name="live", storage=reader).get_trials()
    assert [t.value for t in seen] == [0.5]
    writer.engine.dispose()

"""The main job through its command line: real SQLite files, real PostgreSQL where reachable."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdig_study.optuna_adapter import storage_of, trial_id
from kdig_study.store import open_storage

from cli_helpers import assert_one_line_error, run_cli, run_process, trials_of
from conftest import REPO

PG_URL = os.environ.get("KDIG_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory, warm_cache_source: Path) -> Path:
    """One cache for the whole module (as workers share one), holding the session's smoke
    teacher, maps and corrupted splits."""
    cache = tmp_path_factory.mktemp("cache")
    shutil.copytree(warm_cache_source, cache, dirs_exist_ok=True)
    return cache


@pytest.fixture
def env(shared_cache: Path, isolated_storage: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("KDIG_CACHE", str(shared_cache))
    return {"KDIG_CACHE": str(shared_cache), "KDIG_STORAGE": str(isolated_storage)}


# Tests of the command's bookkeeping train their students for one epoch.
ONE_EPOCH = ("--set", "student_train.epochs=1")


def _url(storage: Path) -> str:
    return f"sqlite:///{storage / 'kdig.db'}"


def _optimize(*args: str, env: dict | None = None, timeout: float = 600, process: bool = False):
    """The command in-process, or (``process``) as a real process: worker subprocesses
    write to the real stdout, which only a parent process's pipe collects."""
    return (run_process if process else run_cli)(
        "optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress", *args, env=env,
        timeout=timeout)


def _trials(url: str, name: str = "kd_ig-smoke") -> list[optuna.trial.FrozenTrial]:
    return trials_of(url, name)


def _states(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_smoke_study_end_to_end_records_everything(env: dict, isolated_storage: Path) -> None:
    proc = _optimize("--n-trials", "3", env=env)
    assert proc.returncode == 0, proc.stderr
    first_line = proc.stdout.splitlines()[0]
    assert first_line.startswith("study kd_ig at scale smoke") and "3 trials" in first_line
    url = _url(isolated_storage)
    study = optuna.load_study(study_name="kd_ig-smoke", storage=url)
    attrs = study.user_attrs
    for key in ("config", "config_fingerprint", "scale", "kdig_version", "git_commit",
                "torch_version", "teacher", "latency"):
        assert key in attrs, key
    assert attrs["scale"] == "smoke" and attrs["config"]["kd"]["temperature"] == 2.5
    assert attrs["teacher"]["params"] == 124_722
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                                    for t in trials)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done
    t = done[0]
    assert {"test_acc", "metrics"} <= set(t.user_attrs)
    m = t.user_attrs["metrics"]
    for key in ("test_acc", "params", "flops", "compression", "epochs_run", "seed",
                "ig_gap_median", "latency_b1_median_ms", "latency_b64_median_ms",
                "robust_test_acc", "robust_val_acc", "robust_eval_s", "eval_s"):
        assert key in m, key
    assert {"jpeg", "gaussian_noise-2", "brightness-3"} <= set(t.user_attrs["robust"])
    assert 0 < m["robust_test_acc"] <= 1
    wall = (t.datetime_complete - t.datetime_start).total_seconds()
    assert wall >= m["train_eval_s"] > 0
    assert 0.0 < t.value <= 1.0 and 0.0 < t.user_attrs["test_acc"] <= 1.0
    assert set(t.params) == {"temperature", "alpha", "overlay_strength", "overlay_prob",
                             "ig_steps"}
    assert len(t.intermediate_values) == m["epochs_run"]
    pruned = [p for p in trials if p.state == TrialState.PRUNED]
    assert all(p.user_attrs["metrics"]["epochs_run"] == len(p.intermediate_values)
               for p in pruned)
    metas = optuna.artifacts.get_all_artifact_meta(t, storage=storage_of(study))
    names = sorted(m.filename for m in metas)
    assert any(n.endswith("-best.safetensors") for n in names)
    assert any(n.endswith(".png") for n in names)
    assert (isolated_storage / "artifacts").is_dir()
    from optuna_dashboard import get_note
    assert "Validation accuracy" in get_note(optuna.Trial(study, trial_id(t)))


def test_banner_scales_the_estimate_by_trials_left_and_the_cache() -> None:
    from kdig_study.config import load_study
    from kdig_study.optimize import banner

    # the teacher-output cache's share: test_teacher_outputs.py
    cfg = load_study("kd_ig", "cpu", ["teacher_cache.enabled=false"])
    e = cfg.expected
    fresh = banner(cfg, 8, 8, {"teacher": False, "maps": False})
    total = e.teacher + e.maps + 8 * e.trial
    assert f"expected about {total:.0f} min" in fresh and "8 trial(s) to run" in fresh
    assert f"teacher ~{e.teacher:.0f} min, maps ~{e.maps:.0f} min" in fresh
    warm = banner(cfg, 20, 3, {"teacher": True, "maps": True})
    assert f"expected about {3 * e.trial:.0f} min" in warm
    assert "teacher cached, maps cached" in warm
    # a part never measured (0) is said so, and no total leaves it out
    part = load_study("kd_ig", "cpu", ["teacher_cache.enabled=false", "expected.maps=0"])
    said = banner(part, 8, 8, {"teacher": False, "maps": False})
    assert "expected about" not in said and "maps ~0 min" not in said
    assert f"(teacher ~{e.teacher:.0f} min, maps not measured, 8 trial(s) to run x " \
           f"~{e.trial:.1f} min; measured on {e.machine})" in said
    none = load_study("kd_ig", "cpu", ["expected.teacher=0", "expected.maps=0",
                                       "expected.trial=0"])
    assert banner(none, 8).endswith("x 8 epochs")  # nothing measured: no estimate


def test_samplers_of_workers_and_resumed_runs_do_not_replay_start_up_proposals() -> None:
    from kdig_study.config import load_study
    from kdig_study.search import make_sampler

    cfg = load_study("kd_ig", "smoke")

    def first_points(sampler: optuna.samplers.BaseSampler, trials_before: int = 0) -> list:
        study = optuna.create_study(sampler=sampler, direction="maximize")
        for _ in range(trials_before):  # what a resumed study already holds
            study.enqueue_trial({"x": 0.5})
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        points = []
        for _ in range(3):
            t = study.ask()
            points.append(round(t.suggest_float("x", 0, 1), 9))
            study.tell(t, 0.0)
        return points

    single = first_points(make_sampler(cfg, None))
    assert single == first_points(make_sampler(cfg, None))  # one process: reproducible
    assert single == first_points(optuna.samplers.TPESampler(seed=cfg.search.seed,
                                                             n_startup_trials=5,
                                                             multivariate=True))
    workers = [first_points(make_sampler(cfg, None, worker=i)) for i in range(3)]
    every = [x for w in workers for x in w]
    assert len(set(every)) == len(every)
    resumed = first_points(make_sampler(cfg, None, trials_before=2), trials_before=2)
    assert not set(resumed) & set(single)


def test_multi_objective_study_through_the_cli(env: dict, isolated_storage: Path) -> None:
    proc = run_cli("optimize", "--study", "kd_ig_robust", "--scale", "smoke", "--no-progress",
                   "--n-trials", "3", *ONE_EPOCH, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Optuna does not prune multi-objective trials" in proc.stdout
    assert "Pareto front" in proc.stdout and "chosen for ablations and reports" in proc.stdout
    study = optuna.load_study(study_name="kd_ig_robust-smoke", storage=_url(isolated_storage))
    assert len(study.directions) == 2
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3 and all(len(t.values) == 2 for t in done)
    assert all(t.values[1] == pytest.approx(t.user_attrs["metrics"]["robust_val_acc"], rel=1e-4)
               for t in done)
    assert study.best_trials


def test_resume_counts_the_total_and_refuses_a_changed_config(env: dict, isolated_storage: Path,
                                                               tmp_path: Path) -> None:
    url = _url(isolated_storage)
    assert _optimize("--n-trials", "2", *ONE_EPOCH, env=env).returncode == 0
    assert len(_trials(url)) == 2
    # every trial records the data and the teacher it learnt from
    study = optuna.load_study(study_name="kd_ig-smoke", storage=url)
    data_fp, teacher_fp = study.user_attrs["data_fingerprint"], \
        study.user_attrs["teacher"]["fingerprint"]
    assert [t.user_attrs["provenance"]["data"] for t in _trials(url)] == [data_fp] * 2
    assert [t.user_attrs["provenance"]["teacher"] for t in _trials(url)] == [teacher_fp] * 2
    # a study made on other data (another --data-dir) is refused in one line, before any
    # teacher or trial: its trials and this run's would not be one study
    study.set_user_attr("data_fingerprint", "0" * 64)
    study.set_user_attr("data_origin", "CIFAR-10 from /elsewhere")
    proc = _optimize("--n-trials", "3", *ONE_EPOCH, env=env)
    assert_one_line_error(proc, "was made on other data (CIFAR-10 from /elsewhere",
                          "fingerprint 000000000000", "--study-name NEW")
    assert len(_trials(url)) == 2
    study.set_user_attr("data_fingerprint", data_fp)
    # the study records what "auto" resolved to; a worker on hardware where it resolves
    # otherwise (a GPU without native bf16 beside a bf16 one) would train a second teacher
    # and maps for one study: refused in one line, before any work
    precision = study.user_attrs["precision"]
    assert set(precision) == {"teacher", "maps", "students", "device"}
    other = "fp32" if precision["teacher"] == "bf16" else "bf16"
    study.set_user_attr("precision", precision | {"teacher": other, "maps": other,
                                                  "device": "cuda:Tesla T4:12.8"})
    proc = _optimize("--n-trials", "3", *ONE_EPOCH, env=env)
    assert_one_line_error(proc, f"was made with teacher at {other}, maps at {other} on cuda:"
                          f"Tesla T4:12.8", f"resolves teacher at {precision['teacher']}",
                          "--study-name NEW")
    assert len(_trials(url)) == 2
    study.set_user_attr("precision", precision)
    proc = _optimize("--n-trials", "3", *ONE_EPOCH, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(_trials(url)) == 3  # the total, not 3 more
    # the banner's estimate counts the trials left and what the cache already holds
    banner = proc.stdout.splitlines()[0]
    assert "1 trial(s) to run" in banner and "teacher cached, maps cached" in banner, banner
    # teacher and maps, summarised in one line each, from the cache too
    assert "teacher (convnet, 124,722 parameters, from the cache): validation accuracy" \
        in proc.stdout and "test accuracy" in proc.stdout
    assert "ig maps (450 images, from the cache): median completeness gap 8 steps" \
        in proc.stdout
    latency = optuna.load_study(study_name="kd_ig-smoke", storage=url).user_attrs["latency"]
    proc = _optimize("--n-trials", "3", *ONE_EPOCH, env=env)
    assert proc.returncode == 0 and len(_trials(url)) == 3
    assert "0 trial(s) to run" in proc.stdout.splitlines()[0]
    # nothing ran, so nothing was measured again (timings never repeat exactly)
    assert optuna.load_study(study_name="kd_ig-smoke", storage=url).user_attrs["latency"] == \
        latency
    # a changed config is refused, in one line that names the change and the way out
    changed = tmp_path / "kd_ig.toml"
    changed.write_text((REPO / "studies" / "kd_ig.toml").read_text().replace(
        "alpha = 0.01 ", "alpha = 0.5 "))
    proc = run_cli("optimize", "--study", str(changed), "--scale", "smoke", "--no-progress",
                   "--n-trials", "4", *ONE_EPOCH, env=env)
    assert_one_line_error(proc, "another config", "kd.alpha", "--study-name")
    assert len(_trials(url)) == 3


def _workers_finish_exactly(url: str, env: dict, name: str, n: int = 5) -> None:
    proc = _optimize("--n-trials", str(n), "--workers", "3", "--storage", url,
                     "--study-name", name, *ONE_EPOCH, env=env, process=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "database is locked" not in proc.stderr + proc.stdout
    states = _states(_trials(url, name))
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == n, states
    assert set(states) <= {"COMPLETE", "PRUNED"}, states
    assert "[worker 2]" in proc.stdout
    # each worker samples with its own seed: the random start-up phase never repeats a point
    # (all three used to draw the same parameters: trials 0 = 1 = 2, 3 = 4 = 5)
    points = [tuple(sorted(t.params.items())) for t in _trials(url, name)]
    assert len(set(points)) == len(points), points
    # latency: teacher and student measured together after the search, in one process
    lat = optuna.load_study(study_name=name, storage=open_storage(url)).user_attrs["latency"]
    assert lat["teacher"]["latency_b1"]["threads"] == lat["student"]["latency_b1"]["threads"]


@pytest.mark.slow
def test_three_workers_on_sqlite(env: dict, isolated_storage: Path) -> None:
    _workers_finish_exactly(_url(isolated_storage), env, "kd_ig-smoke")


@pytest.mark.slow
def test_three_workers_on_a_journal_file(env: dict, isolated_storage: Path) -> None:
    """Optuna's JournalStorage: one file on shared storage, no database server."""
    journal = isolated_storage / "shared" / "kdig.journal"
    _workers_finish_exactly(f"journal://{journal}", env, "kd_ig-smoke")
    assert journal.is_file() and not list(journal.parent.glob("*.db"))


def _postgres_reachable() -> str | None:
    try:
        import sqlalchemy
        engine = sqlalchemy.create_engine(PG_URL)
        with engine.connect():
            pass
        return None
    except Exception as e:  # no server, no driver, no database
        return f"PostgreSQL not reachable at {PG_URL}: {str(e).splitlines()[0]}"


@pytest.mark.slow
def test_three_workers_on_postgresql(env: dict) -> None:
    why = _postgres_reachable()
    if why:
        pytest.skip(why)
    _workers_finish_exactly(PG_URL, env, f"kd_ig-smoke-{uuid.uuid4().hex[:8]}")


def _wait_for_running(url: str, proc: subprocess.Popen, timeout: float = 300,
                      settle: float = 1.0, before: int | None = None,
                      name: str = "kd_ig-smoke") -> None:
    """Until a trial runs (numbered below ``before``, where given: a signal sent while the
    last trial ran could land after the command had finished, rc 0)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(t.state == TrialState.RUNNING and (before is None or t.number < before)
                   for t in _trials(url, name)):
                time.sleep(settle)  # inside the trial
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError("no trial started")


TWELVE_EPOCHS = ("--set", "student_train.epochs=12")


def _wait_for_checkpoint(cache: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until a run of ``proc`` has written a mid-run checkpoint (it is inside a trial, with
    at least one epoch done); runs other tests interrupted may have left theirs."""
    before = set((cache / "checkpoints").glob("*.pt"))
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if set((cache / "checkpoints").glob("*.pt")) - before:
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint written")


def _default_sigint() -> None:
    # As from a terminal. A test run started in the background (`cmd &` in a script, as a
    # CI runner may) ignores SIGINT, Python keeps an ignored SIGINT ignored, and the
    # command's Ctrl-C was never seen (rc 0, twice here).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdig_study.optimize", "--study", "kd_ig",
                             "--scale", "smoke", "--no-progress", *args],
                            env=os.environ.copy() | env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


@pytest.mark.slow
def test_killed_worker_trial_fails_and_is_retried(env: dict, isolated_storage: Path) -> None:
    url = _url(isolated_storage)
    # a cached teacher and maps, so the kill lands inside a trial
    assert _optimize("--n-trials", "1", "--study-name", "warm", env=env).returncode == 0
    proc = _popen(env, "--n-trials", "2", "--heartbeat", "1", *TWELVE_EPOCHS)
    _wait_for_checkpoint(Path(env["KDIG_CACHE"]), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [t for t in _trials(url) if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    again = _optimize("--n-trials", "2", "--heartbeat", "1", *TWELVE_EPOCHS, env=env)
    assert again.returncode == 0, again.stderr
    # the stale trial's retry goes on from its last checkpoint, with its inherited epochs
    assert re.search(rf"resumed trial \d+ \(retry of trial {killed[0].number}\) from epoch "
                     r"\d+ of 12", again.stdout), again.stdout[-2000:]
    trials = _trials(url)
    states = _states(trials)
    assert states.get("RUNNING", 0) == 0
    assert trials[killed[0].number].state == TrialState.FAIL
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 2
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_fails_the_trial_cleanly_and_the_command_resumes(
        sig: signal.Signals, env: dict, isolated_storage: Path) -> None:
    """Ctrl-C, and SIGTERM (a preempted machine, `scancel`, `docker stop`), which was not
    handled: the trial stayed RUNNING for two heartbeats."""
    url = _url(isolated_storage)
    assert _optimize("--n-trials", "1", "--study-name", "warm", env=env).returncode == 0
    # while a trial other than the last runs (a signal sent during the last one may land
    # after the command finished)
    proc = _popen(env, "--n-trials", "3", *TWELVE_EPOCHS)
    _wait_for_checkpoint(Path(env["KDIG_CACHE"]), proc)  # inside a trial, after an epoch
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-1500:], err)
    assert "Traceback" not in err and "interrupted" in err
    trials = _trials(url)
    states = _states(trials)
    assert states.get("RUNNING", 0) == 0 and states.get("FAIL", 0) == 1
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    # queued again at once with its own parameters and the epochs it reported
    retry = next(t for t in trials if t.state == TrialState.WAITING)
    assert retry.params == failed.params and retry.system_attrs["failed_trial"] == failed.number
    assert retry.intermediate_values == failed.intermediate_values
    again = _optimize("--n-trials", "3", *TWELVE_EPOCHS, env=env)
    assert again.returncode == 0
    # (the signal may land after an epoch's report, before its checkpoint: hence <=)
    resumed = re.search(rf"resumed trial {retry.number} \(retry of trial {failed.number}\) "
                        r"from epoch (\d+) of 12", again.stdout)
    assert resumed and 2 <= int(resumed[1]) <= max(failed.intermediate_values, default=0) + 1, \
        again.stdout[-2000:]
    trials = _trials(url)
    states = _states(trials)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 3
    done = trials[retry.number]
    assert done.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert set(done.intermediate_values) == set(range(1, max(done.intermediate_values) + 1))


def _pids(pattern: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


@pytest.mark.slow
def test_workers_die_with_their_killed_parent(env: dict, isolated_storage: Path) -> None:
    """A killed --workers parent left its workers running to the end."""
    url = _url(isolated_storage)
    name = f"kill-{uuid.uuid4().hex[:8]}"
    proc = _popen(env, "--n-trials", "8", "--workers", "2", "--study-name", name,
                  "--set", "student_train.epochs=12")
    _wait_for_running(url, proc, settle=0.0, name=name)
    workers = _pids(f"{name} .*--worker-index")
    assert len(workers) == 2, workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while _pids(f"{name} .*--worker-index") and time.time() < deadline:
        time.sleep(0.5)
    assert not _pids(f"{name} .*--worker-index"), "workers outlived their killed parent"
    states = _states(_trials(url, name))
    assert states.get("RUNNING", 0) == 0 and states.get("FAIL", 0) >= 1, states


@pytest.mark.parametrize("args,fragments", [
    (["--storage", "nonsense"], ["is not a database URL"]),
    (["--storage", "mysql://u@localhost/x"], ["unsupported database 'mysql'"]),
    (["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"], ["cannot connect"]),
    (["--scale", "huge"], ["unknown scale 'huge'"]),
    (["--n-trials", "0"], ["--n-trials"]),
])
def test_bad_input_is_one_line(args: list[str], fragments: list[str], env: dict) -> None:
    proc = run_cli("optimize", "--study", "kd_ig", "--no-progress",
                   *(args if "--scale" in args else ["--scale", "smoke", *args]), env=env)
    assert_one_line_error(proc, *fragments)


def test_unknown_study_is_one_line(env: dict) -> None:
    assert_one_line_error(run_cli("optimize", "--study", "nope", "--scale", "smoke", env=env),
                          "unknown study 'nope'", "kd_ig")


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(
        isolated_storage: Path) -> None:
    """Optuna only fails trials whose heartbeat went stale; a worker killed between creating
    its trial and its first heartbeat left it RUNNING for ever (the next run waited)."""
    from kdig_study.store import fail_stale, open_storage

    isolated_storage.mkdir(parents=True, exist_ok=True)
    storage = open_storage(_url(isolated_storage), heartbeat_interval=1)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.25})
    trial = study.ask()  # RUNNING, no heartbeat written: as if killed right here
    trial.suggest_float("x", 0, 1)
    fail_stale(study)
    assert study.get_trials()[0].state == TrialState.RUNNING  # within its grace period
    time.sleep(2.5)
    fail_stale(study)
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.FAIL and TrialState.WAITING in states  # queued again
    retry = next(t for t in study.get_trials() if t.state == TrialState.WAITING)
    assert retry.system_attrs["fixed_params"] == {"x": 0.25}


def test_enqueue_fixed_runs_the_study_files_settings_first_and_searches_the_kd_method(
        env: dict, isolated_storage: Path) -> None:
    from kdig_study.config import fixed_trial, load_study

    sets = ["--set", 'search.space.kd_method.choices=["hinton", "dkd"]',
            "--set", "search.space.dkd_beta.low=1.0", "--set", "search.space.dkd_beta.high=10.0"]
    proc = _optimize("--n-trials", "3", "--enqueue-fixed", *ONE_EPOCH, *sets,
                     "--study-name", "fixed", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "enqueued the study file's settings as a trial" in proc.stdout
    trials = _trials(_url(isolated_storage), "fixed")
    cfg = load_study("kd_ig", "smoke", ["student_train.epochs=1", *sets[1::2]])
    assert trials[0].params == fixed_trial(cfg)
    assert trials[0].params["kd_method"] == "hinton" and "dkd_beta" not in trials[0].params
    for t in trials:  # DKD's parameter only in trials that chose it
        assert ("dkd_beta" in t.params) == (t.params["kd_method"] == "dkd")

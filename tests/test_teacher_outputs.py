"""The teacher-output cache: a run that reads the teacher's outputs ends with exactly the
weights and metrics of the same run computing them (KD, KD+IG, KD+AT, a pruned prefix
extended), damaged or oversized streams fall back to computing, and the commands say how
many steps were read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from kdig_study.config import StudyConfig, load_study
from kdig_study.errors import KdigError
from kdig_study.experiment import Context, StudentRun, run_student

from cli_helpers import run_cli
from conftest import REPO

METHODS = {"KD": ["method.kd=true", "method.ig=false"],
           "KD+IG": ["method.kd=true", "method.ig=true"],
           "KD+AT": ["method.kd=true", "method.ig=false", "method.at=true"]}


def _cfg(method: str, *extra: str, epochs: int = 2) -> StudyConfig:
    return load_study("kd_ig", "smoke", [*METHODS[method], f"student_train.epochs={epochs}",
                                         *extra])


def _context(cfg: StudyConfig, lines: list[str] | None = None) -> Context:
    ctx = Context.create(cfg, progress=False)
    ctx.log = lines.append if lines is not None else (lambda *a, **k: None)
    return ctx


def _same_run(a: StudentRun, b: StudentRun) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit for bit
    assert (a.metrics.val_acc, a.metrics.test_acc, a.metrics.best_epoch) == \
        (b.metrics.val_acc, b.metrics.test_acc, b.metrics.best_epoch)
    assert [h.loss for h in a.result.history] == [h.loss for h in b.result.history]


def _stream_files(cache: Path) -> list[Path]:
    return sorted((cache / "teacher_outputs").glob("*/epoch_*.safetensors"))


@pytest.mark.parametrize("method", ["KD", "KD+IG", "KD+AT"])
def test_a_run_reading_the_cache_is_the_run_computing_the_teacher(method: str,
                                                                   warm_cache: Path) -> None:
    # KD+IG over two epochs against the cache off; KD and KD+AT one epoch (the pruned-run
    # test below extends a stream over epochs)
    epochs = 2 if method == "KD+IG" else 1
    ctx = _context(_cfg(method, epochs=epochs))
    steps = len(ctx.data.train) // 64 * epochs  # 450 images, batches of 64 (last dropped)
    if method == "KD+IG":
        off = run_student(ctx, _cfg(method, "teacher_cache.enabled=false", epochs=2))
        assert (off.metrics.teacher_steps_cached, off.metrics.teacher_steps_computed) == \
            (0, steps)
        assert not _stream_files(warm_cache)
    first = run_student(ctx)
    assert (first.metrics.teacher_steps_cached, first.metrics.teacher_steps_computed) == \
        (0, steps)
    files = _stream_files(warm_cache)
    assert [f.name for f in files] == [f"epoch_{e:04d}.safetensors" for e in range(1, epochs + 1)]
    again = run_student(ctx)
    assert (again.metrics.teacher_steps_cached, again.metrics.teacher_steps_computed) == \
        (steps, 0)
    _same_run(first, again)
    if method == "KD+IG":
        _same_run(off, again)
    from safetensors import safe_open
    with safe_open(str(files[0]), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118
    assert names == ({"order", "logits", "attention"} if method == "KD+AT"
                     else {"order", "logits"})


def test_a_pruned_run_leaves_a_prefix_that_a_longer_run_extends(warm_cache: Path) -> None:
    cfg = _cfg("KD+IG")
    ctx = _context(cfg)
    reference = run_student(ctx, _cfg("KD+IG", "teacher_cache.enabled=false"))

    class Pruned(Exception):
        pass

    def stop_after_first(stats) -> None:
        if stats.epoch == 1:
            raise Pruned

    with pytest.raises(Pruned):
        run_student(ctx, on_epoch=stop_after_first)
    assert [f.name for f in _stream_files(warm_cache)] == ["epoch_0001.safetensors"]
    longer = run_student(ctx)
    per_epoch = len(ctx.data.train) // 64
    assert (longer.metrics.teacher_steps_cached, longer.metrics.teacher_steps_computed) == \
        (per_epoch, per_epoch)
    _same_run(reference, longer)
    assert len(_stream_files(warm_cache)) == 2


def test_a_damaged_epoch_is_said_recomputed_and_rewritten(warm_cache: Path) -> None:
    lines: list[str] = []
    ctx = _context(_cfg("KD", epochs=1), lines)
    first = run_student(ctx)
    epoch1 = _stream_files(warm_cache)[0]
    raw = bytearray(epoch1.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the logits
    epoch1.write_bytes(bytes(raw))
    again = run_student(ctx)
    assert any("fails its checksum" in line for line in lines), lines
    assert (again.metrics.teacher_steps_cached, again.metrics.teacher_steps_computed) == \
        (0, len(ctx.data.train) // 64)
    _same_run(first, again)
    epoch1.write_bytes(epoch1.read_bytes()[:100])  # truncated
    lines.clear()
    _same_run(first, run_student(ctx))
    assert any("unreadable" in line for line in lines), lines
    assert run_student(ctx).metrics.teacher_steps_cached == len(ctx.data.train) // 64


def test_a_stream_over_the_size_bound_is_not_kept_and_says_so(warm_cache: Path) -> None:
    lines: list[str] = []
    ctx = _context(_cfg("KD", "teacher_cache.max_mb=0.01", epochs=1), lines)
    run = run_student(ctx)
    assert not _stream_files(warm_cache)
    assert run.metrics.teacher_steps_cached == 0
    said = [line for line in lines if "not kept" in line]
    assert len(said) == 1 and "teacher_cache.max_mb = 0" in said[0], lines


def test_a_file_of_another_stream_is_refused_not_served(warm_cache: Path) -> None:
    ctx = _context(_cfg("KD", epochs=1))
    run_student(ctx)
    other = _context(_cfg("KD", "student_train.seed=7", epochs=1))
    run_student(other)
    first, second = (p.parent for p in _stream_files(warm_cache))
    # put one stream's epoch under the other's key: the stored image order gives it away
    (first / "epoch_0001.safetensors").write_bytes((second / "epoch_0001.safetensors")
                                                   .read_bytes())
    refused = []
    for c in (ctx, other):  # the stream whose file was replaced refuses it; the other reads
        try:
            run_student(c)
        except KdigError as e:
            refused.append(str(e))
    assert len(refused) == 1 and "holds other images than this run's stream" in refused[0]


def test_optimize_says_how_many_steps_it_read_and_the_flag_turns_it_off(
        warm_cache: Path) -> None:
    common = ("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress", "--set",
              "student_train.epochs=1", "--pruner", "none")
    proc = run_cli(*common, "--n-trials", "2")
    assert proc.returncode == 0, proc.stderr
    # every trial of the search trains on one stream: the first writes, the second reads
    assert "teacher outputs: 7 of 14 KD/AT steps of the study's trials read from the " \
        "teacher-output cache (50%)" in proc.stdout, proc.stdout
    proc = run_cli(*common, "--n-trials", "3", "--no-teacher-cache")
    assert proc.returncode == 0, proc.stderr
    assert "teacher outputs: 7 of 21 KD/AT steps" in proc.stdout, proc.stdout


def test_the_banner_counts_cached_trials_at_their_own_duration() -> None:
    from kdig_study.optimize import banner

    cfg = load_study("kd_ig", "cpu", ["expected.trial=1.0", "expected.trial_cached=0.5"])
    fresh = banner(cfg, 5, 5, {"teacher": True, "maps": True, "teacher_outputs": False})
    assert "expected about 3 min" in fresh and "the first ~1.0 min writes them" in fresh
    warm = banner(cfg, 5, 5, {"teacher": True, "maps": True, "teacher_outputs": True})
    assert "expected about 2 min" in warm and "5 trial(s) to run x ~0.5 min" in warm
    off = load_study("kd_ig", "cpu", ["expected.trial=1.0", "expected.trial_cached=0.5",
                                      "teacher_cache.enabled=false"])
    assert "expected about 5 min" in banner(off, 5, 5, {"teacher": True, "maps": True})


@pytest.mark.slow  # two worker processes (about 30 s)
def test_two_processes_writing_one_stream_never_read_a_partial_file(tmp_path: Path,
                                                                     warm_cache: Path) -> None:
    """Two `train` processes start the same KD student at once on one cache: both write
    every epoch (the same bits, renamed into place), and a third reads them all and ends
    with the same weights."""
    args = [sys.executable, "-m", "kdig_study.train", "--study", "kd_ig", "--role",
            "student", "--scale", "smoke", "--no-ig", "--no-progress", "--set",
            "student_train.epochs=2"]
    outs = [tmp_path / f"w{i}.json" for i in range(3)]
    # one cache, a storage folder each (their checkpoints), as workers on several machines
    envs = [os.environ | {"KDIG_CACHE": str(warm_cache), "KDIG_STORAGE": str(tmp_path / f"s{i}")}
            for i in range(3)]
    procs = [subprocess.Popen(args + ["--json", str(o)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e)
             for o, e in zip(outs[:2], envs, strict=False)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    third = subprocess.run(args + ["--json", str(outs[2])], capture_output=True, text=True,
                           timeout=600, env=envs[2])
    assert third.returncode == 0, third.stderr
    assert "teacher outputs: 14 of 14 KD/AT steps read from the cache" in third.stdout
    res = [json.loads(o.read_text())["student"] for o in outs]
    assert res[2]["teacher_steps_cached"] == 14 and res[2]["teacher_steps_computed"] == 0
    assert len({(r["val_acc"], r["test_acc"]) for r in res}) == 1
    weights = [Path(r["checkpoint"]).read_bytes() for r in res]
    assert weights[0] == weights[1] == weights[2]


@pytest.mark.slow  # two smoke ablations of 3 runs each through the script (about 60 s)
def test_the_end_to_end_script_times_two_identical_ablations(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    env = {**os.environ, "SCALE": "smoke", "SEEDS": "1", "CONTROLS": "shuffled"}
    proc = subprocess.run(["bash", "scripts/teacher_cache_e2e.sh", "ablate", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["identical_trials"] is True
    computing, cached = res["computing"], res["cached"]
    assert computing["trials"] == cached["trials"] == 5  # student, KD, IG, KD+IG, KD+shuffled
    # 3 runs use the teacher; the first computes the replicate's stream, the other 2 read it.
    assert computing["teacher_steps_cached"] == 0 and computing["teacher_steps_computed"] > 0
    assert cached["teacher_steps_cached"] == 2 * cached["teacher_steps_computed"]
    assert res["speedup"] == pytest.approx(computing["wall_s"] / cached["wall_s"], abs=1e-3)


def test_the_cache_line_says_pruned_trials_record_no_count() -> None:
    """A pruned trial stops before its run records the counts: the line must not pass its
    steps off as counted (the 20-trial search said "5,616 of 6,240 steps of the study's
    trials" while 10 pruned trials' steps were in neither number)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from kdig_study.objectives import teacher_cache_line

    def trial(state: TrialState, metrics: dict[str, int]) -> optuna.trial.FrozenTrial:
        return create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                            params={"t": 2.0}, distributions={"t": FloatDistribution(1, 8)},
                            user_attrs={"metrics": metrics})

    done = trial(TrialState.COMPLETE, {"teacher_steps_cached": 30, "teacher_steps_computed": 10})
    pruned = trial(TrialState.PRUNED, {"epochs_run": 5})
    assert teacher_cache_line([done, pruned, pruned], "the study's trials") == (
        "teacher outputs: 30 of 40 KD/AT steps of the study's trials read from the "
        "teacher-output cache (75%); the 2 pruned trial(s) record no count")
    assert teacher_cache_line([done], "the study's trials").endswith("cache (75%)")

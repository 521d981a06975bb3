from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from cli_helpers import assert_one_line_error, run_cli
from conftest import REPO
from kdig_study.ablation import Run, monte_carlo_rows, plan, run_config
from kdig_study.config import load_study
from kdig_study.data import load_bundle
from kdig_study.experiment import Context


def test_plan_enumerates_every_combination_for_every_seed() -> None:
    runs = plan(["kd", "ig"], [0, 1, 2])
    assert len(runs) == 12
    names = {(r.params(None)["condition"], r.seed) for r in runs}
    assert names == {(c, s) for c in ("student", "KD", "IG", "KD+IG") for s in range(3)}
    assert len(plan(["kd", "ig", "at"], [0])) == 8
    sweep = plan(["kd"], [0, 1], [3.0, 5.0])
    assert len(sweep) == 8 and {r.sweep for r in sweep} == {3.0, 5.0}


def test_conditions_of_a_seed_share_everything_but_the_factors() -> None:
    cfg = load_study("kd_ig", "smoke")
    params = {"temperature": 3.0, "alpha": 0.4, "ig_steps": 4}
    cfgs = [run_config(cfg, params, r, None) for r in plan(["kd", "ig"], [1])]
    assert {c.student_train.seed for c in cfgs} == {cfg.student_train.seed + 1}
    assert [(c.method.kd, c.method.ig) for c in cfgs] == \
        [(False, False), (True, False), (False, True), (True, True)]
    assert {(c.kd.temperature, c.kd.alpha, c.ig.steps) for c in cfgs} == {(3.0, 0.4, 4)}
    other = run_config(cfg, params, Run(frozenset(), 2), None)
    assert other.student_train.seed != cfgs[0].student_train.seed
    swept = run_config(cfg, params, Run(frozenset(), 0, 0.5), "width")
    assert swept.student.width == 0.5


def test_monte_carlo_subsets_are_stratified_and_shared_by_conditions() -> None:
    cfg = load_study("kd_ig", "smoke")
    ctx = Context(cfg, load_bundle(cfg.data), torch.device("cpu"), progress=False)
    a, b = monte_carlo_rows(ctx, 0, 0.8), monte_carlo_rows(ctx, 0, 0.8)
    assert torch.equal(a, b) and len(a) == 600
    counts = torch.bincount(ctx.data.train.labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(a, monte_carlo_rows(ctx, 1, 0.8))


def _ablate(*args: str, env: dict | None = None):
    return run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--no-progress", *args,
                   env=env)


def _params_file(tmp_path: Path) -> str:
    f = tmp_path / "params.toml"
    f.write_text("[params]\ntemperature = 4.0\nalpha = 0.5\noverlay_strength = 0.5\n"
                 "overlay_prob = 0.2\nig_steps = 8\n")
    return str(f)


def test_smoke_ablation_end_to_end(tmp_path: Path, isolated_storage: Path) -> None:
    out = tmp_path / "out"
    proc = _ablate("--seeds", "2", "--params", _params_file(tmp_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "KD+IG - KD" in proc.stdout and "KD x IG" in proc.stdout
    assert "test accuracy under corruptions" in proc.stdout
    name = "kd_ig-smoke.ablation"
    res = json.loads((out / f"{name}.json").read_text())
    summ = {s["condition"]: s for s in res["results"]["all"]["test_acc"]["summaries"]}
    assert set(summ) == {"student", "KD", "IG", "KD+IG"} and all(s["n"] == 2 for s in summ.values())
    assert len(res["runs"]) == 8
    robust = res["results"]["all"]["robust_test_acc"]
    assert [c["a"] for c in robust["comparisons"]] == ["KD", "IG", "KD+IG", "KD+IG"]
    assert all("robust_test_jpeg" in r for r in res["runs"])
    csv_text = (out / f"{name}.csv").read_text()
    assert csv_text.startswith("group,metric,kind,name") and "KD+IG - KD" in csv_text
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{isolated_storage}/kdig.db")
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {(t.params["condition"], t.params["seed"]) for t in trials} == \
        {(c, s) for c in ("student", "KD", "IG", "KD+IG") for s in (0, 1)}
    assert all("test_acc" in t.user_attrs for t in trials)
    # a re-run with more seeds only adds the new seed's runs
    proc = _ablate("--seeds", "3", "--params", _params_file(tmp_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(study.get_trials()) == 12


def test_sweep_and_monte_carlo_through_the_cli(tmp_path: Path, isolated_storage: Path) -> None:
    params = _params_file(tmp_path)
    proc = _ablate("--seeds", "1", "--factors", "kd", "--params", params, "--sweep",
                   "width=0.125,0.25", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-smoke.ablation-sweep-width.json").read_text())
    assert set(res["results"]) == {"width=0.125", "width=0.25"}
    by_width = {}
    for r in res["runs"]:
        by_width.setdefault(r["width"], set()).add(r["params"])
    assert len(by_width[0.125]) == 1 and min(by_width[0.25]) > max(by_width[0.125])
    proc = _ablate("--monte-carlo", "2", "--fraction", "0.5", "--factors", "ig", "--params",
                   params, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-smoke.ablation-mc0.5.json").read_text())
    assert {r["train_images"] for r in res["runs"]} == {375}
    assert len(res["runs"]) == 4


@pytest.mark.parametrize("args,fragments", [
    (["--factors", "kd,xx"], ["--factors kd,xx", "'xx'", "allowed: kd, ig, at"]),
    (["--factors", "kd,kd"], ["--factors kd,kd"]),
    (["--sweep", "depth=3"], ["--sweep depth=3", "one of drop_blocks, width"]),
    (["--params", "best"], ["no study 'kd_ig-smoke'", "optimize"]),
    (["--params", "missing.toml"], ["--params missing.toml: no such file"]),
])
def test_bad_input_is_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(_ablate(*args), *fragments)


def test_best_params_need_a_completed_trial(isolated_storage: Path) -> None:
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="kd_ig-smoke", storage=url)
    study.tell(study.ask(), state=TrialState.FAIL)
    assert_one_line_error(_ablate(), "has no completed trials", "--params FILE.toml")


def test_bad_params_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[params]\nalpha = 3.0\n")
    assert_one_line_error(_ablate("--params", str(f)), "params.alpha = 3.0", "<= 1")
    f.write_text("[params]\nbeta = 3.0\n")
    assert_one_line_error(_ablate("--params", str(f)), "unknown key 'params.beta'")


@pytest.mark.slow
def test_resume_after_a_kill(tmp_path: Path, isolated_storage: Path) -> None:
    params = _params_file(tmp_path)
    url = f"sqlite:///{isolated_storage}/kdig.db"
    base = [sys.executable, "-m", "kdig_study.ablate", "--study", "kd_ig", "--scale", "smoke",
            "--no-progress", "--seeds", "1", "--params", params, "--heartbeat", "1",
            "--out", str(tmp_path)]
    proc = subprocess.Popen(base, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    db = isolated_storage / "kdig.db"
    while time.time() < deadline:
        if not db.exists():
            time.sleep(0.3)
            continue
        try:
            trials = optuna.load_study(study_name="kd_ig-smoke.ablation",
                                       storage=url).get_trials()
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 1 and \
                    any(t.state == TrialState.RUNNING for t in trials):
                break
        except KeyError:
            pass
        time.sleep(0.3)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = subprocess.run(base, cwd=REPO, env=os.environ.copy(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="kd_ig-smoke.ablation", storage=url).get_trials()
    done = [(t.params["condition"], t.params["seed"]) for t in trials
            if t.state == TrialState.COMPLETE]
    assert sorted(done) == sorted({(c, 0) for c in ("student", "KD", "IG", "KD+IG")})
    assert sum(t.state == TrialState.FAIL for t in trials) == 1
    assert not any(t.state == TrialState.RUNNING for t in trials)

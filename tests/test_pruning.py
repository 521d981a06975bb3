"""The pruning evidence: rank correlations per epoch, the suggested warm-up, best accuracy
against compute; and the pruner settings that come from them."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from kdig_study.pruning import (
    best_by_compute,
    compare,
    epoch_correlations,
    replay,
    suggested_warmup,
)

from cli_helpers import run_cli

T0 = datetime.datetime(2026, 11, 28, 12, 0, 0)


def _trial(number: int, curve: list[float], seconds: float, start: float,
           pruned: bool = False) -> FrozenTrial:
    return FrozenTrial(
        number=number, trial_id=number, state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        value=None if pruned else max(curve), values=None,
        datetime_start=T0 + datetime.timedelta(seconds=start),
        datetime_complete=T0 + datetime.timedelta(seconds=start + seconds),
        params={"x": number / 10}, distributions={"x": FloatDistribution(0, 10)},
        user_attrs={"metrics": {"epochs_run": len(curve)}}, system_attrs={},
        intermediate_values={i + 1: v for i, v in enumerate(curve)})


# epoch 1 ranks trials differently from the end; from epoch 2 on the ranking is final
UNPRUNED = [_trial(0, [0.30, 0.60, 0.70], 30, 0), _trial(1, [0.40, 0.50, 0.60], 30, 30),
            _trial(2, [0.50, 0.40, 0.50], 30, 60), _trial(3, [0.20, 0.65, 0.75], 30, 90)]


def test_epoch_correlations_by_hand_and_the_warmup() -> None:
    rhos = epoch_correlations(UNPRUNED)
    # epoch 1 values 0.30 0.40 0.50 0.20 rank 2 3 4 1; finals 0.70 0.60 0.50 0.75 rank 3 2 1 4
    # d = -1 1 3 -3: rho = 1 - 6 * 20 / (4 * 15) = -1
    assert rhos[1] == pytest.approx(-1.0)
    assert rhos[2] == pytest.approx(1.0) and rhos[3] == pytest.approx(1.0)
    assert suggested_warmup(rhos, 0.8) == 2
    assert suggested_warmup({1: 0.1, 2: 0.5}, 0.8) is None


def test_the_pruner_replayed_on_the_unpruned_trials() -> None:
    """Trials 0-2 are the pruner's start-up. Trial 3 (the best at the end) is at 0.20 after
    epoch 1, below the median 0.40 of the others there, so a warm-up of 1 prunes it; at
    epoch 2 its 0.65 is above their median 0.50, so a warm-up of 2 keeps it."""
    rows = replay(UNPRUNED, 50.0)
    assert rows == [
        {"warmup": 1, "pruned": [3], "epochs": 10, "epochs_unpruned": 12,
         "best_survives": False, "best_kept": 0.70},
        {"warmup": 2, "pruned": [], "epochs": 12, "epochs_unpruned": 12,
         "best_survives": True, "best_kept": 0.75}]


def test_best_against_compute() -> None:
    pruned = [_trial(0, [0.30, 0.60, 0.70], 30, 0), _trial(1, [0.10], 10, 30, pruned=True),
              _trial(2, [0.20, 0.65, 0.75], 30, 40)]
    curve = best_by_compute(pruned)
    assert curve == [(30.0, 0.70), (40.0, 0.70), (70.0, 0.75)]
    c = compare(pruned, UNPRUNED)
    assert c["equal_budget_h"] == pytest.approx(70 / 3600)
    assert c["best_at_equal_budget"] == {"pruned": 0.75, "unpruned": 0.70}
    assert c["compute_h_to_reach_unpruned_best"]["pruned"] == pytest.approx(70 / 3600)
    assert c["compute_h_to_reach_unpruned_best"]["unpruned"] == pytest.approx(120 / 3600)
    assert c["pruned"]["epochs"] == 7 and c["unpruned"]["epochs"] == 12
    # in epochs: the unpruned best (0.75) after 3 + 1 + 3 pruned epochs, after all 12 unpruned
    assert c["epochs_to_reach_unpruned_best"] == {"pruned": 7.0, "unpruned": 12.0}


def test_pruning_cli(tmp_path: Path, isolated_storage: Path) -> None:
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    for name, trials in (("kd_ig-cpu-nopruning", UNPRUNED), ("kd_ig-cpu", UNPRUNED[:2])):
        study = optuna.create_study(study_name=name, storage=url, direction="maximize")
        for t in trials:
            study.add_trial(t)
    proc = run_cli("pruning", "--study", "kd_ig", "--scale", "cpu", "--unpruned",
                   "kd_ig-cpu-nopruning", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1: -1.000" in proc.stdout and "suggested warm-up: 2 epoch(s)" in proc.stdout
    res = json.loads((tmp_path / "pruning-kd_ig-cpu.json").read_text())
    assert res["suggested_warmup"] == 2 and res["rank_correlation_by_epoch"]["3"] == 1.0
    assert res["pruned"]["trials"] == 2


def test_pruning_cli_without_a_pruned_search_gives_the_correlations(
        tmp_path: Path, isolated_storage: Path) -> None:
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="kd_ig-cpu-nopruning", storage=url,
                                direction="maximize")
    for t in UNPRUNED:
        study.add_trial(t)
    proc = run_cli("pruning", "--study", "kd_ig", "--scale", "cpu", "--unpruned",
                   "kd_ig-cpu-nopruning", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "rank correlations only" in proc.stdout
    res = json.loads((tmp_path / "pruning-kd_ig-cpu.json").read_text())
    assert res["suggested_warmup"] == 2 and "pruned" not in res
    assert [r["best_survives"] for r in res["replay_by_warmup"]] == [False, True]
    assert "warm-up 1: prunes 1 trials, runs 10 of 12 epochs, best trial PRUNED" in proc.stdout
    proc = run_cli("pruning", "--study", "kd_ig", "--scale", "cpu", "--unpruned",
                   "kd_ig-cpu-nopruning", "--percentile", "nan", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--percentile nan: allowed 0 < value <= 100" in proc.stderr
    # a named pruned search that is absent is an error
    proc = run_cli("pruning", "--study", "kd_ig", "--scale", "cpu", "--unpruned",
                   "kd_ig-cpu-nopruning", "--pruned", "nope", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no study 'nope'" in proc.stderr


def test_the_pruner_takes_the_measured_warmup_and_percentile() -> None:
    from kdig_study.config import load_study
    from kdig_study.search import make_pruner

    cfg = load_study("kd_ig", "cpu", ["search.prune_warmup=3", "search.prune_percentile=25"])
    pruner = make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.PercentilePruner)
    assert pruner._n_warmup_steps == 3 and pruner._percentile == 25.0


def test_the_pruner_settings_come_from_the_study_file_and_are_printed() -> None:
    from kdig_study.config import load_study
    from kdig_study.search import describe_pruner, make_pruner

    cpu = load_study("kd_ig", "cpu")  # measured: pruning from epoch 5 of 8
    assert describe_pruner(cpu) == "median (percentile 50, from epoch 5 of 8)"
    pruner = make_pruner(cpu)
    assert isinstance(pruner, optuna.pruners.PercentilePruner)
    assert pruner._n_warmup_steps == 5 and pruner._percentile == 50.0  # noqa: SLF001
    smoke = load_study("kd_ig", "smoke", ["search.prune_percentile=75"])  # no warm-up set
    assert describe_pruner(smoke) == "median (percentile 75, from epoch 1 of 3)"
    assert describe_pruner(load_study("kd_ig", "smoke", ["search.pruner=\"none\""])) == "none"

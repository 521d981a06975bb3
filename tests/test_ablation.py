from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from kdig_study.ablate import parse_factors
from kdig_study.ablation import (
    Run,
    ablation_study_name,
    analyse_metric,
    monte_carlo_rows,
    parse_ablation_study_name,
    plan,
    run_config,
)
from kdig_study.config import AnalysisConfig, load_study
from kdig_study.data import load_bundle
from kdig_study.experiment import Context
from kdig_study.ledger import search_ledger_path
from kdig_study.stats import design_of
from kdig_study.sweep import NO_SWEEP, Sweep, parse_sweeps

from cli_helpers import assert_one_line_error, run_cli, trials_of
from conftest import REPO


def test_plan_enumerates_every_combination_for_every_replicate() -> None:
    runs = plan(design_of(["kd", "ig"]), [0, 1, 2])
    assert len(runs) == 12
    names = {(r.params(NO_SWEEP)["condition"], r.params(NO_SWEEP)["replicate"]) for r in runs}
    assert names == {(c, s) for c in ("student", "KD", "IG", "KD+IG") for s in range(3)}
    assert len(plan(design_of(["kd", "ig", "at"]), [0])) == 8
    sweep = plan(design_of(["kd"]), [0, 1], Sweep(("width",), ((3.0, 5.0),)))
    assert len(sweep) == 8 and {r.sweep for r in sweep} == {(3.0,), (5.0,)}
    crossed = plan(design_of(["kd"]), [0, 1], Sweep(("width", "kd.temperature"),
                                                    ((0.5, 1.0), (2.0, 4.0, 8.0))))
    assert len(crossed) == 2 * 2 * 2 * 3
    assert {r.sweep for r in crossed} == {(w, t) for w in (0.5, 1.0) for t in (2.0, 4.0, 8.0)}
    # every level holds whole replicates of every condition (paired within a level)
    for level in {r.sweep for r in crossed}:
        assert sorted((r.name, r.replicate) for r in crossed if r.sweep == level) == \
            sorted((c, s) for c in ("student", "KD") for s in (0, 1))
    levels = plan({"kd": (None, "kd"), "overlay": (None, "ig", "shuffled", "gradcam")}, [0])
    assert len(levels) == 8
    assert {r.params(NO_SWEEP)["overlay"] for r in levels} == {"none", "ig", "shuffled", "gradcam"}


def test_a_one_key_sweep_records_itself_as_before_crossed_sweeps() -> None:
    """Stores made before crossed sweeps recorded sweep_key as a string and its values as
    given; resuming one compares these."""
    one = Sweep(("width",), ((0.5, 0.25),))
    assert one.identity() == {"sweep_key": "width", "sweep_values": [0.5, 0.25]}
    assert NO_SWEEP.identity() == {"sweep_key": None, "sweep_values": None}
    assert one.name == "width" and one.levels() == [(0.5,), (0.25,)]
    assert Sweep.named("ig.steps-x-kd.alpha").keys == ("ig.steps", "kd.alpha")


def test_ablation_study_names_are_built_and_parsed_by_one_pair_of_functions() -> None:
    assert ablation_study_name("kd_ig-cpu") == "kd_ig-cpu.ablation"
    assert ablation_study_name("kd_ig-cpu", 0.8) == "kd_ig-cpu.ablation-mc0.8"
    assert ablation_study_name("kd_ig-cpu", sweep_key="width") == \
        "kd_ig-cpu.ablation-sweep-width"
    for args in [("kd_ig-cpu", None, None), ("a.ablation-b", 1e-05, "drop_blocks"),
                 ("s", 0.5, "width"), ("s", None, "ig.overlay_strength-x-student_train.epochs"),
                 ("s", None, "width-x-kd.temperature")]:
        parsed = parse_ablation_study_name(ablation_study_name(*args))
        assert parsed is not None and (parsed.search, parsed.fraction, parsed.sweep_key) == args
    for other in ("kd_ig-cpu", "x.ablation-mcabc", "x.ablation-sweep-depth", ".ablation",
                  "x.ablation-sweep-width-x-depth", "x.ablation-sweep-width+kd.alpha"):
        assert parse_ablation_study_name(other) is None, other


def test_the_primary_comparison_counts_on_test_accuracy_only() -> None:
    design = design_of(["kd", "ig"])
    table = {frozenset(c): {r: 0.5 + 0.01 * len(c) + 0.003 * r * (1 + len(c)) for r in range(4)}
             for c in ([], ["kd"], ["ig"], ["kd", "ig"])}
    test = analyse_metric(table, design, (), "test_acc", AnalysisConfig())
    assert test["primary"] == "KD+IG - KD"
    assert [c["name"] for c in test["comparisons"] if c["primary"]] == ["KD+IG - KD"]
    robust = analyse_metric(table, design, (), "robust_test_acc", AnalysisConfig())
    assert robust["primary"] is None and not any(c["primary"] for c in robust["comparisons"])
    assert [c["mean"] for c in robust["comparisons"]] == [c["mean"] for c in test["comparisons"]]


def test_conditions_of_a_replicate_share_everything_but_the_factors() -> None:
    cfg = load_study("kd_ig", "smoke")
    params = {"temperature": 3.0, "alpha": 0.4, "ig_steps": 4}
    cfgs = [run_config(cfg, params, r, NO_SWEEP) for r in plan(design_of(["kd", "ig"]), [1])]
    assert {c.student_train.seed for c in cfgs} == {cfg.student_train.seed + 1001}
    assert [(c.method.kd, c.method.ig) for c in cfgs] == \
        [(False, False), (True, False), (False, True), (True, True)]
    assert {(c.kd.temperature, c.kd.alpha, c.ig.steps) for c in cfgs} == {(3.0, 0.4, 4)}
    other = run_config(cfg, params, Run(frozenset(), 2), NO_SWEEP)
    assert other.student_train.seed != cfgs[0].student_train.seed
    swept = run_config(cfg, params, Run(frozenset(), 0, (0.5,)), Sweep(("width",)))
    assert swept.student.width == 0.5
    both = run_config(cfg, params, Run(frozenset({"kd"}), 0, (0.5, 6.0)),
                      Sweep(("width", "kd.temperature")))
    assert (both.student.width, both.kd.temperature, both.kd.alpha) == (0.5, 6.0, 0.4)
    shuffled = run_config(cfg, params, Run(frozenset({"kd", "shuffled"}), 0), NO_SWEEP)
    assert shuffled.method.ig and shuffled.ig.source == "shuffled" and shuffled.method.kd


def test_replicate_seeds_never_coincide_with_the_search_seed() -> None:
    """Search trials train at student_train.seed; replicate 0 used to train there too, so the
    KD+IG search's winner was replicate 0 of KD+IG (selected on its own luck)."""
    cfg = load_study("kd_ig", "smoke")
    seeds = {run_config(cfg, {}, r, NO_SWEEP).student_train.seed
             for r in plan(design_of(["kd", "ig"]), list(range(10)))}
    assert cfg.student_train.seed not in seeds
    assert seeds == {cfg.student_train.seed + 1000 + r for r in range(10)}


def test_monte_carlo_subsets_are_stratified_and_shared_by_conditions() -> None:
    cfg = load_study("kd_ig", "smoke")
    ctx = Context(cfg, load_bundle(cfg.data), torch.device("cpu"), progress=False)
    a, b = monte_carlo_rows(ctx, 0, 0.8), monte_carlo_rows(ctx, 0, 0.8)
    assert torch.equal(a, b) and len(a) == 360
    counts = torch.bincount(ctx.data.train.labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(a, monte_carlo_rows(ctx, 1, 0.8))


def _ablate(*args: str, env: dict | None = None, epochs: int = 1):
    """The ablate command at smoke scale, its students trained for one epoch: these tests
    check the command (plan, store, resume, output); test_stats checks the statistics."""
    return run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--set", f"student_train.epochs={epochs}", *args, env=env)


def _params_file(tmp_path: Path) -> str:
    f = tmp_path / "params.toml"
    f.write_text("[params]\ntemperature = 4.0\nalpha = 0.5\noverlay_strength = 0.5\n"
                 "overlay_prob = 0.2\nig_steps = 8\n")
    return str(f)


def test_smoke_ablation_end_to_end(tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    out = tmp_path / "out"
    name = "kd_ig-smoke.ablation"
    url = f"sqlite:///{isolated_storage}/kdig.db"
    # two epochs: after one, every student of 450 images may still give one class, and a
    # zero spread leaves no minimum detectable difference to check
    proc = _ablate("--seeds", "1", "--params", _params_file(tmp_path), "--out", str(out),
                   epochs=2)
    assert proc.returncode == 0, proc.stderr
    assert len(trials_of(url, name)) == 4
    # a re-run with more seeds only adds the new seed's runs
    proc = _ablate("--seeds", "2", "--params", _params_file(tmp_path), "--out", str(out),
                   epochs=2)
    assert proc.returncode == 0, proc.stderr
    assert "KD+IG - KD" in proc.stdout and "KD x IG" in proc.stdout
    assert "test accuracy under corruptions" in proc.stdout
    # the design, the seeds, Holm, d_z and the minimum detectable difference are printed
    assert "design: --params file" in proc.stdout and "replicate seeds 1000..1001" in proc.stdout
    assert "Holm" in proc.stdout and "d_z" in proc.stdout and "MDE" in proc.stdout
    assert "* KD+IG - KD" in proc.stdout and "primary comparison" in proc.stdout
    assert "Wilcoxon n/a where n < 6" in proc.stdout
    # each replicate's KD and KD+IG runs share one stream: one of the two reads it
    assert "teacher outputs: 28 of 56 KD/AT steps of the ablation's runs read from the " \
        "teacher-output cache (50%)" in proc.stdout, proc.stdout
    res = json.loads((out / f"{name}.json").read_text())
    assert res["design"] == "file" and res["seeds"] == {"0": 1000, "1": 1001}
    assert res["primary"] == "KD+IG - KD on test accuracy"
    summ = {s["condition"]: s for s in res["results"]["all"]["test_acc"]["summaries"]}
    assert set(summ) == {"student", "KD", "IG", "KD+IG"} and all(s["n"] == 2 for s in summ.values())
    assert len(res["runs"]) == 8
    assert {r["seed"] for r in res["runs"]} == {1000, 1001}  # the seeds the students trained at
    test = res["results"]["all"]["test_acc"]
    kdig = next(c for c in test["comparisons"] if c["name"] == "KD+IG - KD")
    assert kdig["primary"] and kdig["t_p_holm"] >= kdig["t_p"]
    assert kdig["wilcoxon_p"] is None and "n = 2 < 6" in kdig["wilcoxon_note"]
    assert kdig["mde"] is not None and kdig["mde"] > 0
    robust = res["results"]["all"]["robust_test_acc"]
    assert [c["a"] for c in robust["comparisons"]] == ["KD", "IG", "KD+IG", "KD+IG"]
    assert not any(c["primary"] for c in robust["comparisons"])
    assert all("robust_test_jpeg" in r for r in res["runs"])
    csv_text = (out / f"{name}.csv").read_text()
    assert csv_text.startswith("group,metric,kind,name") and "KD+IG - KD" in csv_text
    assert "t_p_holm" in csv_text.splitlines()[0]
    study = optuna.load_study(study_name=name, storage=url)
    assert study.user_attrs["ablation"]["seeds"] == {"0": 1000, "1": 1001}
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {(t.params["condition"], t.params["replicate"]) for t in trials} == \
        {(c, s) for c in ("student", "KD", "IG", "KD+IG") for s in (0, 1)}
    assert all("test_acc" in t.user_attrs for t in trials)
    # the first seed's runs are the ones the first command stored (not run again)
    assert sorted(t.number for t in trials if t.params["replicate"] == 0) == [0, 1, 2, 3]
    # another design on the same study is refused, in one line
    assert_one_line_error(_ablate("--seeds", "3", "--params", "fixed", "--out", str(out),
                                  epochs=2),
                          "ran with another design", "--study-name")
    _the_run_ledger_outlives_the_store(tmp_path, out, name, url, res)


class _PastTheChecks(BaseException):
    """Raised where an ablation would start loading its data: every check before it passed
    (a BaseException: the command's own handlers let it through)."""


def test_results_of_another_ablation_are_never_written_over(
        tmp_path: Path, isolated_storage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a fresh store, `--teachers 2 --conditions KD,KD+IG` without --study-name took the
    plain ablation's name and its results JSON overwrote the committed kd_ig-cpu.ablation.json
    when it finished: now refused in one line before any data, teacher or run."""
    from kdig_study import experiment

    def stop(*args: object, **kwargs: object) -> None:
        raise _PastTheChecks

    monkeypatch.setattr(experiment.Context, "create", stop)
    out = tmp_path / "out"
    out.mkdir()
    results = out / "kd_ig-cpu.ablation.json"
    committed = (REPO / "reports" / "results" / "kd_ig-cpu.ablation.json").read_bytes()
    results.write_bytes(committed)
    base = ("--study", "kd_ig", "--scale", "cpu", "--params", "fixed", "--seeds", "10",
            "--out", str(out), "--no-progress")
    line = assert_one_line_error(
        run_cli("ablate", *base, "--conditions", "KD,KD+IG", "--teachers", "2"),
        f"{results} holds the results of another ablation named 'kd_ig-cpu.ablation'",
        "controls ['shuffled', 'random', 'gradcam'] -> []", "teachers 1 -> 2", "--study-name")
    assert "ran with another" not in line  # the file, not the (empty) store, refused it
    assert results.read_bytes() == committed
    with pytest.raises(KeyError):  # no study was created
        trials_of(f"sqlite:///{isolated_storage}/kdig.db", "kd_ig-cpu.ablation")
    # other parameters are another ablation too
    assert_one_line_error(run_cli("ablate", *base, "--controls", "shuffled,random,gradcam",
                                  "--set", "kd.temperature=4"), "differs in params")
    # the ablation that wrote it goes on (to load its data) and may write it again: its
    # parameters recorded before kd_method and the DKD/DIST settings existed still match
    with pytest.raises(_PastTheChecks):
        run_cli("ablate", *base, "--controls", "shuffled,random,gradcam")
    # as does another ablation under its own name
    with pytest.raises(_PastTheChecks):
        run_cli("ablate", *base, "--conditions", "KD,KD+IG", "--teachers", "2",
                "--study-name", "kd_ig-cpu.teachers")
    results.write_text("[1, 2")
    assert_one_line_error(run_cli("ablate", *base, "--controls", "shuffled,random,gradcam"),
                          "not an ablation's results", "move it away")


def _the_run_ledger_outlives_the_store(tmp_path: Path, out: Path, name: str, url: str,
                                       res: dict) -> None:
    """A study's runs, written to its ledger as they finish, come back into a fresh store
    (another machine) without running again, and give the same results (refusals: in
    test_ledger.py)."""
    ledger_file = out / f"{name}.runs.json"
    ledger = json.loads(ledger_file.read_text())
    assert len(ledger["runs"]) == 8
    shas = {r["user_attrs"]["provenance"]["teacher_sha256"] for r in ledger["runs"]
            if r["params"]["kd"] or r["params"]["overlay"] != "none"}
    assert len(shas) == 1 and len(shas.pop()) == 64
    # each run names its CPU bf16 kernel family (none at fp32), checked before the teacher
    from kdig_study.engine import bf16_kernels

    made = {(r["user_attrs"]["metrics"]["precision"], r["user_attrs"]["metrics"].get("kernels"))
            for r in ledger["runs"]}
    assert made == {(p, bf16_kernels(p, torch.device("cpu"))) for p, _ in made}, made
    Path(url.removeprefix("sqlite:///")).unlink()  # the machine's store is gone
    again = _ablate("--seeds", "2", "--params", _params_file(tmp_path), "--out", str(out),
                    epochs=2)
    assert again.returncode == 0, again.stderr
    assert f"8 finished run(s) taken from the run ledger {ledger_file}" in again.stdout
    assert not any(line.startswith("[") for line in again.stdout.splitlines())  # no run
    res2 = json.loads((out / f"{name}.json").read_text())
    assert res2["results"] == res["results"]
    key = ("condition", "replicate", "test_acc", "robust_test_acc", "val_acc")
    assert sorted(tuple(r[k] for k in key) for r in res2["runs"]) == \
        sorted(tuple(r[k] for k in key) for r in res["runs"])


@pytest.mark.slow  # a second end-to-end ablation, 8 conditions (about 8 s)
def test_multi_level_overlay_ablation_through_the_cli(tmp_path: Path,
                                                      isolated_storage: Path, warm_cache: Path) -> None:
    proc = _ablate("--seeds", "1", "--factors", "kd,overlay=none|ig|shuffled|gradcam",
                   "--params", _params_file(tmp_path), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["factors"] == {"kd": ["none", "kd"], "overlay": ["none", "ig", "shuffled",
                                                                "gradcam"]}
    test = res["results"]["all"]["test_acc"]
    assert {s["condition"] for s in test["summaries"]} == \
        {"student", "KD", "IG", "shuffled", "gradcam", "KD+IG", "KD+shuffled", "KD+gradcam"}
    pairs = {c["name"] for c in test["comparisons"]}
    assert {"KD+shuffled - KD", "KD+shuffled - KD+IG", "KD+gradcam - KD",
            "KD+gradcam - KD+IG", "gradcam - IG", "KD+IG - KD"} <= pairs
    assert {e["name"] for e in test["effects"]} >= {"KD", "IG", "shuffled", "gradcam",
                                                    "KD x shuffled"}
    sources = {r["condition"]: r.get("source") for r in res["runs"]}
    assert sources["KD+shuffled"] == "shuffled" and sources["gradcam"] == "gradcam"
    assert sources["KD+IG"] == "ig" and sources["KD"] is None


@pytest.mark.slow  # 8 conditions (about 10 s)
def test_kd_methods_as_a_factor_through_the_cli(tmp_path: Path, isolated_storage: Path,
                                                warm_cache: Path) -> None:
    """--factors kd=none|hinton|dkd: each method crossed with the overlay and the controls,
    each run training with its own loss, and the comparisons that ask which method is best
    and what the overlay adds to each."""
    proc = _ablate("--seeds", "1", "--factors", "kd=none|hinton|dkd,ig", "--controls",
                   "shuffled", "--params", _params_file(tmp_path), "--out", str(tmp_path),
                   "--set", "analysis.primary=DKD+IG - DKD", epochs=2)
    assert proc.returncode == 0, proc.stderr
    assert "8 runs (8 conditions x 1 replicates)" in proc.stdout
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["factors"] == {"kd": ["none", "hinton", "dkd"], "overlay": ["none", "ig"]}
    assert res["primary"] == "DKD+IG - DKD on test accuracy"
    test = res["results"]["all"]["test_acc"]
    assert [s["condition"] for s in test["summaries"]] == \
        ["student", "Hinton", "DKD", "IG", "Hinton+IG", "DKD+IG", "Hinton+shuffled",
         "DKD+shuffled"]
    pairs = {c["name"]: c for c in test["comparisons"]}
    assert {"DKD - Hinton", "Hinton+IG - Hinton", "DKD+IG - DKD", "DKD+shuffled - DKD+IG",
            "Hinton+shuffled - Hinton"} <= set(pairs)
    assert pairs["DKD+IG - DKD"]["primary"]
    assert {e["name"] for e in test["effects"]} == \
        {"Hinton", "DKD", "IG", "Hinton x IG", "DKD x IG"}
    runs = {r["condition"]: r for r in res["runs"]}
    assert {runs[c]["kd"] for c in runs} == {0, "hinton", "dkd"}
    # the two methods are two losses: same seed, same data, same stream (bit-identical
    # were the loss the same), other students
    scores = [k for k in runs["DKD"] if k.endswith("_acc") or k.startswith("robust_test_")]
    assert [runs["DKD"][k] for k in scores] != [runs["Hinton"][k] for k in scores]
    # each run's config switches its method on (run_config; the runs above trained with it)
    cfg = load_study("kd_ig", "smoke")
    got = {r.name: (c.method.kd, c.kd.method) for r in plan(
        parse_factors("kd=none|hinton|dkd,ig", cfg), [0], NO_SWEEP, ("shuffled",))
        for c in [run_config(cfg, {}, r, NO_SWEEP)]}
    assert got["student"][0] is False and got["IG"][0] is False
    assert got["DKD+shuffled"] == got["DKD"] == (True, "dkd") and got["Hinton+IG"] == (True, "hinton")


@pytest.mark.slow  # a second teacher and 16 runs (about 40 s)
def test_teachers_as_replicates_through_the_cli(tmp_path: Path, isolated_storage: Path,
                                                warm_cache: Path) -> None:
    """--teachers 2: a second teacher at the next seed with its own maps; every replicate
    under each teacher; tables pooled and per teacher; a random teacher effect."""
    proc = _ablate("--seeds", "2", "--teachers", "2", "--params", _params_file(tmp_path),
                   "--out", str(tmp_path), epochs=2)
    assert proc.returncode == 0, proc.stderr
    assert "16 runs (4 conditions x 2 replicates x 2 teachers (teacher_train.seed 0..1))" \
        in proc.stdout
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["teachers"] == 2
    assert set(res["results"]) == {"all", "all, teacher 0", "all, teacher 1"}
    pooled = res["results"]["all"]["test_acc"]
    assert {s["n"] for s in pooled["summaries"]} == {4}
    per = [res["results"][f"all, teacher {k}"]["test_acc"] for k in (0, 1)]
    assert all({s["n"] for s in p["summaries"]} == {2} for p in per)
    # the pooled mean of a condition is the mean of the teachers' means (balanced)
    for i, s in enumerate(pooled["summaries"]):
        assert s["mean"] == pytest.approx((per[0]["summaries"][i]["mean"]
                                           + per[1]["summaries"][i]["mean"]) / 2)
    effect = {r["name"]: r for r in res["results"]["all"]["random_teacher"]}
    primary = effect["KD+IG - KD"]
    assert primary["primary"] and primary["teachers"] == 2 and primary["n"] == 4
    means = [next(c for c in p["comparisons"] if c["name"] == "KD+IG - KD")["mean"]
             for p in per]
    assert primary["teacher_means"] == {"0": pytest.approx(means[0]),
                                        "1": pytest.approx(means[1])}
    assert primary["mean"] == pytest.approx(sum(means) / 2)
    assert "random teacher effect" in proc.stdout
    # two teachers, two sets of weights; each run learned from its own
    runs = json.loads((tmp_path / "kd_ig-smoke.ablation.runs.json").read_text())["runs"]
    shas = {(r["params"]["teacher"], r["user_attrs"]["provenance"]["teacher_sha256"])
            for r in runs if r["user_attrs"]["provenance"]["teacher"] is not None}
    assert len(shas) == 2 and {k for k, _ in shas} == {0, 1}
    assert_one_line_error(_ablate("--seeds", "2", "--params", _params_file(tmp_path),
                                  "--out", str(tmp_path), epochs=2),
                          "ran with another", "teachers")


@pytest.mark.slow
def test_controls_run_with_kd_only_through_the_cli(tmp_path: Path,
                                                   isolated_storage: Path, warm_cache: Path) -> None:
    controls = ["shuffled", "shuffled_same_class", "random", "constant"]
    proc = _ablate("--seeds", "1", "--factors", "kd,ig", "--controls", ",".join(controls),
                   "--params", _params_file(tmp_path), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "8 runs (8 conditions x 1 replicates)" in proc.stdout
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["controls"] == controls
    test = res["results"]["all"]["test_acc"]
    assert [s["condition"] for s in test["summaries"]] == \
        ["student", "KD", "IG", "KD+IG", *(f"KD+{c}" for c in controls)]
    pairs = {c["name"] for c in test["comparisons"]}
    assert {f"KD+{c} - {ref}" for c in controls for ref in ("KD", "KD+IG")} | \
        {"KD+IG - KD"} <= pairs
    # the controls take no part in the factorial effects
    assert {e["name"] for e in test["effects"]} == {"KD", "IG", "KD x IG"}
    sources = {r["condition"]: r.get("source") for r in res["runs"]}
    assert all(sources[f"KD+{c}"] == c for c in controls)
    assert len(res["runs"]) == 8
    study = optuna.load_study(study_name="kd_ig-smoke.ablation",
                              storage=f"sqlite:///{isolated_storage}/kdig.db")
    assert study.user_attrs["ablation"]["controls"] == controls
    # the same study without the controls is refused: it ran with them
    assert_one_line_error(_ablate("--seeds", "1", "--factors", "kd,ig", "--params",
                                  _params_file(tmp_path), "--controls", "gradcam"),
                          "ran with another", f"controls={controls}")


@pytest.mark.slow  # 8 runs
def test_only_some_conditions_run_through_the_cli(tmp_path: Path, isolated_storage: Path,
                                                  warm_cache: Path) -> None:
    """KD held on, the overlay varied (--conditions): no student or IG-alone runs, the
    comparisons among the conditions run, no factorial effects (their cells are missing),
    the same analysis in the report's data; recorded, so the full design is refused."""
    only = ["KD", "KD+IG", "KD+shuffled", "KD+constant"]
    args = ("--seeds", "2", "--factors", "kd,ig", "--controls", "shuffled,constant",
            "--params", _params_file(tmp_path), "--out", str(tmp_path))
    proc = _ablate(*args, "--conditions", "KD+constant,KD,KD+shuffled,KD+IG")
    assert proc.returncode == 0, proc.stderr
    assert "8 runs (4 conditions x 2 replicates)" in proc.stdout
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["conditions"] == only  # in the design's order
    assert sorted({r["condition"] for r in res["runs"]}) == sorted(only)
    test = res["results"]["all"]["test_acc"]
    assert [s["condition"] for s in test["summaries"]] == only
    assert [c["name"] for c in test["comparisons"]] == [
        "KD+IG - KD", "KD+shuffled - KD", "KD+shuffled - KD+IG", "KD+constant - KD",
        "KD+constant - KD+IG"]
    assert test["effects"] == [] and test["primary"] == "KD+IG - KD"
    assert all(c["n"] == 2 for c in test["comparisons"])
    from kdig_study.report_data import ablation_data

    storage = f"sqlite:///{isolated_storage}/kdig.db"
    data = ablation_data(storage, "kd_ig-smoke")
    assert data is not None
    assert [c["name"] for c in data.analysis["test_acc"]["comparisons"]] == \
        [c["name"] for c in test["comparisons"]]
    study = optuna.load_study(study_name="kd_ig-smoke.ablation", storage=storage)
    assert study.user_attrs["ablation"]["conditions"] == only
    assert_one_line_error(_ablate(*args), "ran with another", "conditions")
    # every condition named is the same ablation as none named: not "another conditions"
    every = "student,KD,IG,KD+IG,KD+shuffled,KD+constant"
    proc = _ablate(*args, "--conditions", every, "--study-name", "every", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr
    assert "conditions" not in optuna.load_study(study_name="every", storage=storage) \
        .user_attrs["ablation"]
    # no overlay run, no map gallery (it computed the maps of every source of the design)
    from optuna.artifacts import get_all_artifact_meta

    assert any(m.filename.startswith("gallery-") for m in get_all_artifact_meta(study))
    proc = _ablate(*args, "--conditions", "student,KD", "--study-name", "no-overlay")
    assert proc.returncode == 0, proc.stderr
    assert get_all_artifact_meta(optuna.load_study(study_name="no-overlay",
                                                   storage=storage)) == []


@pytest.mark.slow  # two more end-to-end ablations (about 10 s)
def test_sweep_and_monte_carlo_through_the_cli(tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
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
    assert {r["train_images"] for r in res["runs"]} == {225}
    assert len(res["runs"]) == 4


def test_any_study_key_sweeps_with_the_controls_at_every_level(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    """A dose-response ablation: ig.overlay_strength at two levels, KD and KD+IG and the
    shuffled control at each, paired within a level."""
    proc = _ablate("--seeds", "1", "--factors", "kd,ig", "--controls", "shuffled",
                   "--params", "fixed", "--sweep", "ig.overlay_strength=0.25,0.75",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-smoke.ablation-sweep-ig.overlay_strength.json")
                     .read_text())
    assert set(res["results"]) == {"ig.overlay_strength=0.25", "ig.overlay_strength=0.75"}
    for group in res["results"].values():
        names = {c["name"] for c in group["test_acc"]["comparisons"]}
        assert {"KD+IG - KD", "KD+shuffled - KD+IG"} <= names
    # each run trained at its level (its recorded overlay strength), every level run once
    levels = {(r["condition"], r["ig.overlay_strength"]) for r in res["runs"]}
    assert len(levels) == len(res["runs"]) == 2 * 5
    study = optuna.load_study(study_name="kd_ig-smoke.ablation-sweep-ig.overlay_strength",
                              storage=f"sqlite:///{isolated_storage}/kdig.db")
    assert parse_ablation_study_name(study.study_name).sweep_key == "ig.overlay_strength"
    # the level is what the run trains with, on top of the condition's parameters
    cfg = load_study("kd_ig", "smoke")
    run = Run(frozenset({"kd", "ig"}), 0, (0.75,))
    assert run_config(cfg, {}, run, Sweep(("ig.overlay_strength",))).ig.overlay_strength == 0.75
    epochs = run_config(cfg, {}, Run(frozenset(), 0, (5.0,)), Sweep(("student_train.epochs",)))
    assert epochs.student_train.epochs == 5 and isinstance(epochs.student_train.epochs, int)


@pytest.mark.slow  # 16 runs of 3 epochs
def test_two_sweeps_crossed_through_the_cli(tmp_path: Path, isolated_storage: Path,
                                            warm_cache: Path) -> None:
    """--sweep twice: every condition at every pair of values, paired within each pair."""
    proc = _ablate("--seeds", "1", "--factors", "kd,ig", "--params", "fixed",
                   "--sweep", "ig.overlay_strength=0.75,0.25", "--sweep", "kd.temperature=2,4",
                   "--out", str(tmp_path), epochs=3)
    assert proc.returncode == 0, proc.stderr
    name = "kd_ig-smoke.ablation-sweep-ig.overlay_strength-x-kd.temperature"
    assert f"ablation '{name}': 16 runs (4 conditions x 1 replicates x 4 levels of " \
        "ig.overlay_strength x kd.temperature)" in proc.stdout
    res = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(res["results"]) == {f"ig.overlay_strength={s}, kd.temperature={t}"
                                   for s in ("0.25", "0.75") for t in ("2", "4")}
    for group in res["results"].values():
        assert group["test_acc"]["primary"] == "KD+IG - KD"
    cells = {(r["condition"], r["ig.overlay_strength"], r["kd.temperature"]) for r in res["runs"]}
    assert len(cells) == len(res["runs"]) == 16
    # each run trained at its own pair: a setting changes exactly the runs it applies to
    # (same seed and stream: a run the setting does not touch is bit-identical)
    acc = {(r["condition"], r["ig.overlay_strength"], r["kd.temperature"]):
           (r["val_acc"], r["test_acc"], r["robust_test_acc"]) for r in res["runs"]}
    assert len({acc[("student", s, t)] for s in (0.25, 0.75) for t in (2, 4)}) == 1
    for t in (2, 4):  # KD does not see the overlay's strength
        assert acc[("KD", 0.25, t)] == acc[("KD", 0.75, t)]
    assert acc[("KD", 0.25, 2)] != acc[("KD", 0.25, 4)]
    for s in (0.25, 0.75):  # IG alone does not see KD's temperature
        assert acc[("IG", s, 2)] == acc[("IG", s, 4)]
    assert acc[("IG", 0.25, 2)] != acc[("IG", 0.75, 2)]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{isolated_storage}/kdig.db")
    assert study.user_attrs["ablation"]["sweep_key"] == ["ig.overlay_strength", "kd.temperature"]
    assert study.user_attrs["ablation"]["sweep_values"] == [[0.75, 0.25], [2.0, 4.0]]
    # run again: every run is there, none is repeated
    again = _ablate("--seeds", "1", "--factors", "kd,ig", "--params", "fixed",
                    "--sweep", "ig.overlay_strength=0.75,0.25", "--sweep", "kd.temperature=2,4",
                    "--out", str(tmp_path), epochs=3)
    assert again.returncode == 0, again.stderr
    assert len([t for t in study.get_trials() if t.state == TrialState.COMPLETE]) == 16


@pytest.mark.parametrize("kind,text,fragments", [
    ("factors", "kd,xx", ["--factors kd,xx", "'xx'", "allowed: kd, ig, at"]),
    ("factors", "kd,kd", ["--factors kd,kd"]),
    ("factors", "ig,overlay=none|ig", ["repeated"]),
    ("factors", "kd,overlay=ig|shuffled", ["include none"]),
    ("factors", "kd,overlay=none|lime", ["unknown: 'lime'", "gradcam"]),
    ("factors", "kd=none|hinton|fitnet,ig", ["kd levels", "unknown: 'fitnet'", "dkd, dist"]),
    ("factors", "kd=hinton|dkd,ig", ["kd levels", "include none"]),
    ("factors", "kd=none|dkd|dkd", ["kd levels must be distinct"]),
    ("factors", "kd,kd=none|dkd", ["'kd' repeated"]),
    ("factors", "at=none|at", ["only overlay and kd take levels"]),
    ("sweep", "depth=3", ["--sweep depth=3", "one of drop_blocks, width"]),
    ("sweep", "width=-0.5", ["--sweep width=-0.5", "> 0"]),
    ("sweep", "width=0", ["--sweep width=0", "> 0"]),
    ("sweep", "width=nan", ["--sweep width=nan", "finite"]),
    ("sweep", "drop_blocks=3", ["drop_blocks compresses a mobilenetv2", "sweep width"]),
    ("sweep", "teacher.width=0.5", ["'teacher.width' cannot be swept", "ig.overlay_strength"]),
    ("sweep", "ig.overlay_strength=0.2,1.5", ["ig.overlay_strength = 1.5: out of range"]),
    ("sweep", "student_train.epochs=2,2.5", ["student_train.epochs = 2.5: wrong type"]),
    ("sweep", "kd.alpha=0.1,0.1", ["given twice"]),
    ("sweep", "width=0.5|width=1", ["--sweep width and width: one setting given twice"]),
    ("sweep", "width=0.5|student.width=1", ["width and student.width: one setting given"]),
    ("sweep", "width=0.5|drop_blocks=3", ["one compression key at a time"]),
    ("sweep", "kd.alpha=0.1|kd.temperature=2|ig.steps=8", ["given 3 times", "at most 2"]),
    ("sweep", "kd.alpha=0.1|kd.temperature=-2", ["kd.temperature = -2"]),
    ("controls", "shuffled with kd", ["--controls shuffled", "kd and ig"]),
    ("controls", "ig", ["--controls ig", "'ig'", "allowed: shuffled"]),
    ("controls", "shuffled,shuffled", ["'shuffled'", "repeated"]),
    ("controls", "gradcam with kd,overlay=none|ig|gradcam", ["already an overlay level"]),
    ("conditions", "KD,KD+XX", ["'KD+XX' unknown", "conditions (--factors, --controls): "
                                "student, KD, IG, KD+IG"]),
    ("conditions", "KD,KD", ["'KD' unknown or repeated"]),
    ("conditions", "KD", ["at least two"]),
    ("conditions", "KD,IG", ["no comparison among these"]),
])
def test_bad_factors_sweeps_and_controls_are_one_line(kind: str, text: str,
                                                      fragments: list[str]) -> None:
    """The argument checks themselves; test_bad_input_is_one_line sends a few through the
    command line."""
    from kdig_study.ablate import parse_conditions, parse_controls, parse_factors
    from kdig_study.errors import KdigError

    cfg = load_study("kd_ig", "smoke")
    with pytest.raises(KdigError) as e:
        if kind == "factors":
            parse_factors(text, cfg)
        elif kind == "sweep":
            parse_sweeps(text.split("|"), cfg)
        elif kind == "conditions":
            parse_conditions(text, parse_factors("kd,ig", cfg), ())
        else:
            controls, _, factors = text.partition(" with ")
            parse_controls(controls, parse_factors(factors or "kd,ig", cfg))
    message = str(e.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, (f, message)


@pytest.mark.parametrize("args,fragments", [
    (["--factors", "kd,xx"], ["--factors kd,xx", "'xx'", "allowed: kd, ig, at"]),
    (["--sweep", "width=nan"], ["--sweep width=nan", "finite"]),
    (["--heartbeat", "0"], ["--heartbeat must be >= 1"]),
    (["--params", "best"], ["no study 'kd_ig-smoke'", "optimize"]),
    (["--params", "per-condition"], ["no study 'student-smoke'", "--study student"]),
    (["--teachers", "0"], ["--teachers"]),
    (["--params", "missing.toml"], ["--params missing.toml: no such file"]),
    (["--controls", "ig"], ["--controls ig", "'ig'", "allowed: shuffled"]),
    (["--conditions", "KD,KD+shuffled"], ["--conditions KD,KD+shuffled", "'KD+shuffled'"]),
])
def test_bad_input_is_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(_ablate(*args), *fragments)


def _search_study(url: str, name: str, params: dict, value: float, seed: int = 0) -> None:
    """A finished search study with one completed trial (as optimize records it)."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize",
                                load_if_exists=True)
    dists = {k: FloatDistribution(0.001, 10.0) if isinstance(v, float)
             else CategoricalDistribution([v]) for k, v in params.items()}
    study.add_trial(create_trial(params=params, distributions=dists, value=value,
                                 user_attrs={"metrics": {"seed": seed}}))


def test_per_condition_design_takes_each_conditions_own_search(tmp_path: Path,
                                                                isolated_storage: Path, warm_cache: Path) -> None:
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    own = {"student": {"lr": 0.002}, "kd": {"temperature": 3.0, "alpha": 0.3},
           "ig": {"overlay_strength": 0.3, "overlay_prob": 0.25, "ig_steps": 8},
           "kd_ig": {"temperature": 6.0, "alpha": 0.7, "overlay_strength": 0.6,
                     "overlay_prob": 0.15, "ig_steps": 16}}
    for study_file, params in own.items():
        _search_study(url, f"{study_file}-smoke", params, 0.5)
    proc = _ablate("--seeds", "1", "--params", "per-condition", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "each condition at the best trial of its own search" in proc.stdout
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["design"] == "per-condition"
    assert {k: v["study"] for k, v in res["origin"].items()} == \
        {"student": "student-smoke", "KD": "kd-smoke", "IG": "ig-smoke", "KD+IG": "kd_ig-smoke"}
    cfg = load_study("kd_ig", "smoke")
    p = res["params"]
    assert p["student"]["lr"] == 0.002 and p["KD"]["lr"] == cfg.student_train.lr
    assert (p["KD"]["temperature"], p["KD"]["alpha"]) == (3.0, 0.3)
    assert (p["KD+IG"]["temperature"], p["KD+IG"]["ig_steps"]) == (6.0, 16)
    assert (p["IG"]["overlay_prob"], p["IG"]["temperature"]) == (0.25, cfg.kd.temperature)


@pytest.mark.slow  # three searches of 2 trials, 5 runs, and the same again from ledgers (60 s)
def test_per_condition_tunes_any_condition_with_the_same_search(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    """A condition with no study file of its own (a KD method, a control) is tuned by the
    study file's search with that condition's settings, its fixed factors held out of the
    space, the same budget and seed; a re-run takes the finished search."""
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    _search_study(url, "student-smoke", {"lr": 0.002}, 0.5)
    _search_study(url, "ig-smoke", {"overlay_strength": 0.3, "overlay_prob": 0.25,
                                    "ig_steps": 8}, 0.5)
    # the space also holds the KD method and the map source: a condition fixes both
    args = ("--seeds", "1", "--factors", "kd=none|dkd,ig", "--controls", "shuffled",
            "--params", "per-condition", "--out", str(tmp_path), "--set", "search.n_trials=2",
            "--set", 'search.space.source={choices = ["ig", "random"]}',
            "--set", 'search.space.kd_method={choices = ["hinton", "dkd"]}')
    proc = _ablate(*args)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert {n: o["study"] for n, o in res["origin"].items()} == {
        "student": "student-smoke", "IG": "ig-smoke", "DKD": "kd_ig-smoke.tune-DKD",
        "DKD+IG": "kd_ig-smoke.tune-DKD+IG", "DKD+shuffled": "kd_ig-smoke.tune-DKD+shuffled"}
    for n in ("DKD", "DKD+IG", "DKD+shuffled"):
        study = optuna.load_study(study_name=f"kd_ig-smoke.tune-{n}",
                                  storage=f"sqlite:///{isolated_storage}/kdig.db")
        trials = study.get_trials()
        assert len(trials) == 2 and study.user_attrs["config"]["kd"]["method"] == "dkd"
        space = {k for t in trials for k in t.params}
        # the condition's own factors are held: never searched, never a trial's choice
        assert "kd_method" not in space and "source" not in space, space
        assert set(study.user_attrs["config"]["search"]["hold"]) == \
            ({"kd_method"} if n == "DKD" else {"kd_method", "source"})
        source = "shuffled" if n == "DKD+shuffled" else "ig"
        assert study.user_attrs["config"]["ig"]["source"] == source
        assert study.user_attrs["config"]["method"]["ig"] == (n != "DKD")
        assert f"ig.source=\"{source}\"" in res["origin"][n]["settings"] or n == "DKD"
        chosen = res["params"][n]
        assert chosen["temperature"] in {t.params["temperature"] for t in trials}
    assert proc.stdout.count("tuning ") == 3
    again = _ablate(*args)
    assert again.returncode == 0, again.stderr
    assert "tuning " not in again.stdout  # the finished searches are taken as they are
    # A fresh machine: the store lacks the tuning searches and the ablation; their ledgers
    # in --out make them again, and nothing is tuned or run twice.
    for name in ("kd_ig-smoke.ablation", *(f"kd_ig-smoke.tune-{n}"
                                           for n in ("DKD", "DKD+IG", "DKD+shuffled"))):
        optuna.delete_study(study_name=name, storage=url)
    fresh = _ablate(*args)
    assert fresh.returncode == 0, fresh.stderr
    assert not [line for line in fresh.stdout.splitlines() if line.startswith("tuning ")]
    assert fresh.stdout.count("taken from its ledger") == 3
    assert json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())["params"] == \
        res["params"]
    # ... unless a search learned from a teacher with other weights than this machine's
    ledger = tmp_path / "kd_ig-smoke.tune-DKD.trials.json"
    data = json.loads(ledger.read_text())
    for t in data["trials"]:
        t["user_attrs"]["provenance"]["teacher_sha256"] = "f" * 64
    ledger.write_text(json.dumps(data))
    optuna.delete_study(study_name="kd_ig-smoke.tune-DKD", storage=url)
    other = _ablate(*args)
    assert other.returncode != 0
    assert "the search tuning DKD (study 'kd_ig-smoke.tune-DKD') learned from a teacher " \
           "whose weights differ" in other.stderr and "Traceback" not in other.stderr


@pytest.mark.slow  # the maps, two searches of 2 trials at once, then 4 runs (60 s)
def test_workers_tune_several_conditions_at_once(
        tmp_path: Path, isolated_storage: Path, warm_teacher: Path) -> None:
    """--workers 2 runs two conditions' tuning searches at once, each as it would run alone
    (its own study, budget and seed), their lines labelled, after the maps they share were
    made on every core (not by one search on its share while the other waits); the
    ablation then takes both. --from-study names the searches (another machine's tuning
    must not write over the ledgers of the first)."""
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    proc = _ablate("--seeds", "2", "--factors", "kd=none|dkd,ig", "--controls", "shuffled",
                   "--conditions", "DKD+IG,DKD+shuffled", "--params", "per-condition",
                   "--out", str(tmp_path), "--workers", "2", "--set", "search.n_trials=2",
                   "--from-study", "kd_ig-smoke.other")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("; 2 searches at once") == 2
    made = proc.stdout.index("made the ig maps, the shuffled maps for the searches here")
    for n, source in (("DKD+IG", "ig"), ("DKD+shuffled", "shuffled")):
        assert proc.stdout.index(f"[{n}] {source} maps (") > made
        assert f"[{n}] searching temperature, alpha, overlay_strength" in proc.stdout
        study = optuna.load_study(study_name=f"kd_ig-smoke.other.tune-{n}", storage=url)
        assert len(study.get_trials()) == 2
        assert study.user_attrs["config"]["ig"]["source"] == source
        assert search_ledger_path(tmp_path, f"kd_ig-smoke.other.tune-{n}").is_file()
        assert not search_ledger_path(tmp_path, f"kd_ig-smoke.tune-{n}").exists()
    assert "from the cache" in proc.stdout.split("[DKD+IG] ig maps (")[1].splitlines()[0]
    res = json.loads((tmp_path / "kd_ig-smoke.other.ablation.json").read_text())
    assert sorted(r["condition"] for r in res["runs"]) == ["DKD+IG"] * 2 + ["DKD+shuffled"] * 2
    # each condition's chosen trial said once, by the command, not again by each run worker
    assert proc.stdout.count("parameters of trial") == 2


def test_a_finished_tuning_search_of_another_config_is_refused(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    """A finished tuning search is taken as it is, with no `optimize` run to refuse a
    changed config: its own config must be checked, or its parameters (e.g. tuned with
    another DKD warm-up) pass to a changed design unnoticed."""
    from kdig_study.ablate import condition_settings
    from kdig_study.store import study_attrs

    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    _search_study(url, "student-smoke", {"lr": 0.002}, 0.5)
    args = ("--seeds", "1", "--factors", "kd=none|dkd", "--params", "per-condition",
            "--out", str(tmp_path), "--set", "search.n_trials=1")
    base = load_study("kd_ig", "smoke")
    settings = ["student_train.epochs=1", "search.n_trials=1",
                *condition_settings(base, frozenset({"dkd"}))]

    def tuned(extra: list[str]) -> None:
        name = "kd_ig-smoke.tune-DKD"
        if name in optuna.get_all_study_names(url):
            optuna.delete_study(study_name=name, storage=url)
        _search_study(url, name, {"temperature": 3.5}, 0.6)
        study = optuna.load_study(study_name=name, storage=url)
        for k, v in study_attrs(load_study("kd_ig", "smoke", settings + extra)).items():
            study.set_user_attr(k, v)

    tuned(["kd.dkd_warmup=3"])
    assert_one_line_error(_ablate(*args), "the search tuning DKD (study 'kd_ig-smoke.tune-DKD'",
                          "another config (changed: kd.dkd_warmup)", "optuna delete-study")
    tuned([])  # the same config: taken as it is, not tuned again
    proc = _ablate(*args)
    assert proc.returncode == 0, proc.stderr
    assert "tuning " not in proc.stdout
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert res["params"]["DKD"]["temperature"] == 3.5
    # recorded as the method its runs train with, not the study file's (hinton)
    assert res["params"]["DKD"]["kd_method"] == "dkd"
    assert [r["kd"] for r in res["runs"] if r["condition"] == "DKD"] == ["dkd"]


def test_the_default_design_is_fixed_and_the_banner_says_so(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    """Without --params no search is needed (the default used to be `best`, tuned for KD+IG
    only, which also refused to start without a KD+IG search)."""
    proc = _ablate("--seeds", "1", "--factors", "kd", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "design: --params fixed (the default): every condition at the study file's own " \
           "settings" in proc.stdout
    assert json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())["design"] == "fixed"


def test_a_replicate_seed_used_by_a_search_trial_is_refused(tmp_path: Path,
                                                            isolated_storage: Path) -> None:
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    _search_study(url, "kd_ig-smoke", {"temperature": 3.0}, 0.5, seed=1001)
    assert_one_line_error(_ablate("--seeds", "3", "--params", "best"),
                          "ablation seeds [1001] were used by search trials of kd_ig-smoke")


def test_best_params_need_a_completed_trial(isolated_storage: Path) -> None:
    url = f"sqlite:///{isolated_storage}/kdig.db"
    isolated_storage.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="kd_ig-smoke", storage=url)
    study.tell(study.ask(), state=TrialState.FAIL)
    assert_one_line_error(_ablate("--params", "best"), "has no completed trials",
                          "--params fixed or FILE.toml")


def test_bad_params_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[params]\nalpha = 3.0\n")
    assert_one_line_error(_ablate("--params", str(f)), "params.alpha = 3.0", "<= 1")
    f.write_text("[params]\nbeta = 3.0\n")
    assert_one_line_error(_ablate("--params", str(f)), "unknown key 'params.beta'")
    f.write_text("[params]\noverlay_prob = nan\n")
    assert_one_line_error(_ablate("--params", str(f)), "params.overlay_prob = nan", "finite")


@pytest.mark.slow
def test_resume_after_a_kill(tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    params = _params_file(tmp_path)
    url = f"sqlite:///{isolated_storage}/kdig.db"
    base = [sys.executable, "-m", "kdig_study.ablate", "--study", "kd_ig", "--scale", "smoke",
            "--no-progress", "--seeds", "1", "--params", params, "--heartbeat", "1",
            "--out", str(tmp_path)]
    db = isolated_storage / "kdig.db"

    def running() -> list[int]:
        if not db.exists():
            return []
        try:
            trials = trials_of(url, "kd_ig-smoke.ablation")
        except KeyError:
            return []
        if not any(t.state == TrialState.COMPLETE for t in trials):
            return []
        return [t.number for t in trials if t.state == TrialState.RUNNING]

    # Kill while a run is in flight. The kill can land between two runs (the IG maps are
    # computed outside any trial); then nothing was interrupted and the command resumes.
    killed_mid_run = False
    for _ in range(4):
        proc = subprocess.Popen(base, cwd=REPO, env=os.environ.copy(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not running():
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if running():
            killed_mid_run = True
            break
    assert killed_mid_run, "never caught a run in flight"
    again = subprocess.run(base, cwd=REPO, env=os.environ.copy(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="kd_ig-smoke.ablation", storage=url).get_trials()
    done = [(t.params["condition"], t.params["replicate"]) for t in trials
            if t.state == TrialState.COMPLETE]
    assert sorted(done) == sorted({(c, 0) for c in ("student", "KD", "IG", "KD+IG")})
    assert sum(t.state == TrialState.FAIL for t in trials) == 1
    assert not any(t.state == TrialState.RUNNING for t in trials)


@pytest.mark.slow
def test_two_ablate_commands_on_one_study_never_add_an_unplanned_run(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    """Both used to pick the same planned run; the one that found nothing waiting fell
    through to the random sampler and invented a run (condition=IG, seed=878204)."""
    params = _params_file(tmp_path)
    url = f"sqlite:///{isolated_storage}/kdig.db"
    # the teacher and maps first, so both commands start their runs at the same moment
    first = _ablate("--seeds", "1", "--factors", "ig", "--params", params, "--study-name",
                    "warm-up", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    cmd = [sys.executable, "-m", "kdig_study.ablate", "--study", "kd_ig", "--scale", "smoke",
           "--no-progress", "--seeds", "2", "--params", params, "--out", str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trials = optuna.load_study(study_name="kd_ig-smoke.ablation", storage=url).get_trials()
    planned = {(c, r) for c in ("student", "KD", "IG", "KD+IG") for r in (0, 1)}
    made = [(t.params.get("condition"), t.params.get("replicate")) for t in trials]
    # (on failure: each run's state and system attributes, e.g. Optuna's fail reason)
    assert set(made) <= planned and len(made) == len(set(made)) == 8, \
        [(m, t.state.name, t.system_attrs) for m, t in zip(made, trials, strict=True)]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # the two commands shared the work
    assert all("[" in out for out, _ in outs)


def test_the_analysis_is_declared_recorded_enforced_and_judges_every_row(
        tmp_path: Path, isolated_storage: Path, warm_cache: Path) -> None:
    args = ["--params", "fixed", "--seeds", "2", "--factors", "kd,ig", "--out", str(tmp_path)]
    assert_one_line_error(_ablate(*args, "--plan"), "--plan needs a pilot sd", "--pilot-sd")
    bad = _ablate(*args, "--set", "analysis.primary=KD+AT - KD")
    assert_one_line_error(bad, "analysis.primary = 'KD+AT - KD'", "student, KD, IG, KD+IG")
    url = f"sqlite:///{isolated_storage}/kdig.db"
    assert "kd_ig-smoke.ablation" not in optuna.get_all_study_names(url)  # nothing made

    proc = _ablate(*args, "--set", "analysis.equivalence_margin=0.3",
                   "--set", "analysis.primary=IG - student")
    assert proc.returncode == 0, proc.stderr
    assert "analysis (declared in [analysis], recorded on the study): primary IG - student " \
           "on test accuracy; every row judged at family-wise alpha 0.05 (Holm), equivalence " \
           "by TOST within +-0.3 points" in proc.stdout
    out = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    assert out["analysis"] == {"primary": "IG - student", "metric": "test_acc", "alpha": 0.05,
                               "equivalence_margin": 0.3}
    test = out["results"]["all"]["test_acc"]
    assert test["primary"] == "IG - student" and test["equivalence_margin"] == 0.003
    for row in test["comparisons"] + test["effects"]:
        assert row["verdict"].split(",")[0] in ("better", "worse", "inconclusive") or \
            row["verdict"].startswith("equivalent within +-0.30"), row
        assert row["level"] <= 0.05
    assert "verdict" in proc.stdout and "TOST p" in proc.stdout
    # robustness per corruption family: every comparison under every family
    split = out["results"]["all"]["robust_by_family"]
    families = set(load_study("kd_ig", "smoke").robustness.corruptions)
    assert set(split["families"]) == families  # (the JSON's keys are sorted)
    for row in split["comparisons"]:
        assert set(row["families"]) == families
    assert "test accuracy under corruptions, by family" in proc.stdout

    again = _ablate(*args, "--set", "analysis.equivalence_margin=0.5",
                    "--set", "analysis.primary=IG - student")
    assert_one_line_error(again, "declared another analysis before it ran",
                          "equivalence_margin 0.3 -> 0.5")

    # --plan: the seeds the declared margin needs, from this ablation's sd, nothing run
    plan = _ablate(*args, "--set", "analysis.equivalence_margin=0.3",
                   "--set", "analysis.primary=IG - student", "--plan")
    assert plan.returncode == 0, plan.stderr
    diffs = [r["test_acc"] for r in out["runs"] if r["condition"] == "IG"]
    base = [r["test_acc"] for r in out["runs"] if r["condition"] == "student"]
    sd = statistics.stdev([x - y for x, y in zip(diffs, base, strict=True)])
    assert f"pilot sd of the per-seed differences {100 * sd:.3f} points (study " \
           f"'kd_ig-smoke.ablation', 2 replicates)" in plan.stdout
    from kdig_study.stats import n_for_equivalence
    n = n_for_equivalence(sd, 0.003, 0.05)
    assert f"at alpha 0.05: {n if n is not None else '> 100,000'} seeds show equivalence" \
        in plan.stdout
    # the family the analysis judges: IG - student is one of the comparisons with the
    # student, so no primary row is added (--plan counted the default KD+IG - KD: 7)
    rows = len(test["comparisons"]) + len(test["effects"])
    assert rows == 6 and f"Holm's strictest step, {rows} rows in the family" in plan.stdout
    given = _ablate(*args, "--set", "analysis.primary=IG - student", "--plan",
                    "--pilot-sd", "0.5")
    assert f"at alpha 0.05: {n_for_equivalence(0.005, 0.004, 0.05)} seeds" in given.stdout
    assert "[1/" not in plan.stdout + given.stdout  # nothing ran


def test_the_pilot_sd_comes_from_an_ablation_of_any_name() -> None:
    """An ablation run under its own --study-name (e.g. the controls study) is a pilot too;
    a sweep or Monte-Carlo ablation is not, nor is a search study."""
    from kdig_study.ablation import pilot_sd

    storage = optuna.storages.InMemoryStorage()
    dists = {"condition": CategoricalDistribution(["KD", "KD+IG"]),
             "replicate": CategoricalDistribution([0, 1, 2, 3]),
             "kd": CategoricalDistribution([1]), "at": CategoricalDistribution([0]),
             "overlay": CategoricalDistribution(["none", "ig"])}

    def ablation(name: str, info: dict | None, replicates: int, gap: float) -> None:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        if info is not None:
            study.set_user_attr("ablation", info)
        for r in range(replicates):
            for cond, overlay, acc in (("KD", "none", 0.80), ("KD+IG", "ig", 0.80 + gap * r)):
                study.add_trial(create_trial(
                    params={"condition": cond, "replicate": r, "kd": 1, "at": 0,
                            "overlay": overlay},
                    distributions=dists, value=acc,
                    user_attrs={"metrics": {"test_acc": acc}}))

    plain = {"fraction": None, "sweep_key": None, "sweep_values": None}
    ablation("kd_ig-cpu.controls", plain, 3, 0.01)
    ablation("kd_ig-cpu.ablation-sweep-width", plain | {"sweep_key": "width"}, 4, 0.02)
    ablation("kd_ig-cpu.mine", plain | {"fraction": 0.8}, 4, 0.02)
    ablation("kd_ig-cpu", None, 4, 0.02)  # a search study's name: not an ablation
    sd, name, n = pilot_sd(storage, (frozenset({"kd", "ig"}), frozenset({"kd"})), "test_acc")
    assert (name, n) == ("kd_ig-cpu.controls", 3)
    assert sd == pytest.approx(0.01)
    # an ablation made before it recorded itself still counts by its name
    ablation("kd_ig-old.ablation", None, 4, 0.03)
    assert pilot_sd(storage, (frozenset({"kd", "ig"}), frozenset({"kd"})), "test_acc")[1:] \
        == ("kd_ig-old.ablation", 4)


def test_reanalyse_judges_the_committed_cpu_study_from_its_json(tmp_path: Path) -> None:
    """The cpu-scale study's runs (committed JSON), judged under the declared analysis: the
    numbers the independent review recomputed, now as verdicts and plain words."""
    src = REPO / "reports" / "results" / "kd_ig-cpu.ablation.json"
    proc = run_cli("ablate", "--study", "kd_ig", "--scale", "cpu", "--reanalyse", str(src),
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split("In plain words (made from the verdicts above):")[1]
    assert "KD+IG - KD (primary): -1.01 points, 95% CI [-1.24, -0.79]: worse." in words
    # the map's content: not shown equivalent to the shuffled control at +-0.40
    assert "KD+shuffled - KD+IG: -0.11 points, 90% CI [-0.45, +0.23] against +-0.40" in words
    assert "KD+shuffled - KD+IG" in words and "inconclusive (equivalence n=" in words
    assert "KD+gradcam - KD under corruptions: +1.84 points (better), 91% of it from " \
           "contrast (+8.40 there; +0.20 on average under the other families)." in words
    out = json.loads((tmp_path / "kd_ig-cpu.ablation.verdicts.json").read_text())
    assert out["analysis"]["equivalence_margin"] == 0.4
    assert out["results"]["all"]["plain_words"] == [
        line.strip() for line in words.strip().splitlines()[:len(
            out["results"]["all"]["plain_words"])]]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert_one_line_error(run_cli("ablate", "--study", "kd_ig", "--scale", "cpu",
                                  "--reanalyse", str(bad)),
                          "not a results JSON or run ledger of ablate")
    # replicates nested under teachers are not one paired table (they were read as one)
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"factors": {"kd": ["none", "kd"]}, "runs": [
        {"condition": c, "replicate": 0, "teacher": k, "test_acc": 0.5 + k / 10}
        for c in ("student", "KD") for k in (0, 1)]}))
    assert_one_line_error(run_cli("ablate", "--study", "kd_ig", "--scale", "cpu",
                                  "--reanalyse", str(two)), "several teachers' results")


def test_reanalyse_judges_a_stopped_study_from_its_run_ledger(tmp_path: Path) -> None:
    """The controls study stopped at 25 complete replicates when its machine was gone (its
    bf16 runs cannot be continued at fp32): its committed ledger is judged on the complete
    replicates alone, without a teacher or data; the partial replicate is left out."""
    data = json.loads((REPO / "reports" / "results" /
                       "kd_ig-cpu.controls.runs.json").read_text())
    partial = [r for r in data["runs"] if r["params"]["replicate"] == 25][:3]
    data["runs"] = [r for r in data["runs"] if r["params"]["replicate"] < 25] + partial
    src = tmp_path / "kd_ig-cpu.controls.runs.json"  # as far as the study went this session
    src.write_text(json.dumps(data))
    base = ("ablate", "--study", "kd_ig", "--scale", "cpu", "--reanalyse", str(src),
            "--out", str(tmp_path))
    proc = run_cli(*base, "--set", "analysis.equivalence_margin=0.3")
    assert proc.returncode == 0, proc.stderr
    assert "left out 1 replicate(s) that lack a condition (25)" in proc.stdout
    assert "175 runs of 7 conditions x 25 replicates" in proc.stdout
    words = proc.stdout.split("In plain words (made from the verdicts above):")[1]
    assert "KD+IG - KD (primary): -0.77 points, 95% CI [-0.97, -0.58]: worse." in words
    assert "KD+constant - KD+IG: -0.15 points, 90% CI [-0.33, +0.02] against +-0.30" in words
    out = json.loads((tmp_path / "kd_ig-cpu.controls.verdicts.json").read_text())
    assert out["replicates"] == list(range(25)) and out["left_out"] == [25]
    # the margin it declared (0.3) differs from the study file's (0.4): said, not hidden
    proc = run_cli(*base)
    assert proc.returncode == 0 and "note: the ablation declared" in proc.stdout
    # a ledger stopped before its first whole replicate has nothing to pair
    data["runs"] = partial
    src.write_text(json.dumps(data))
    assert_one_line_error(run_cli(*base), "no replicate holds every condition")
    # runs of another config (here: other epochs) are not judged as this study's
    assert_one_line_error(run_cli(*base, "--set", "student_train.epochs=2"),
                          "its runs were made with another study config")


def test_attention_transfer_pairs_the_cifar_resnets_and_refuses_other_families() -> None:
    """ablate checked AT with its own rule (one architecture), which refused ResNet-56 ->
    ResNet-20; the study files' rule (one tap family) allowed it."""
    base = ("ablate", "--study", "resnet_cifar", "--scale", "smoke", "--no-progress",
            "--factors", "kd,ig,at", "--plan", "--pilot-sd", "0.5")
    proc = run_cli(*base)
    assert proc.returncode == 0, proc.stderr
    assert "plan for KD+IG - KD" in proc.stdout
    assert_one_line_error(run_cli(*base, "--set", "student.arch=convnet"),
                          "--factors kd,ig,at: attention transfer needs teacher and student "
                          "of one family", "resnet14/default and convnet/default")

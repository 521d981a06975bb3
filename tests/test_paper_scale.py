"""The paper's own scale: a CPU rehearsal of the whole pipeline (shrunk by --set), and the
device check script, which must be known to work before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest

from cli_helpers import run_cli
from conftest import REPO


@pytest.mark.slow  # the whole device-check script with its worker processes (about 30 s)
def test_device_check_script_runs_on_cpu_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads((out / "gpu_check.json").read_text())
    assert set(measured["training"]) == {"student", "teacher"}
    assert set(measured["training"]["student"]) == {"1", "2"}
    assert all(v > 0 for r in measured["training"].values() for v in r.values())
    assert measured["ig"]["ratio_all_counts"] > 0 and measured["ig"]["points_ours"] == 12
    hours = measured["projection_hours"]
    assert hours["total_h"] == pytest.approx(sum(v for k, v in hours.items() if k != "total_h"))
    summary = (out / "summary.txt").read_text()
    assert "paper protocol, projected" in summary and "IG: ours" in summary


def _shrunk() -> list[str]:
    """The paper scale at a few hundred synthetic images and 1-2 epochs (the real archive's
    decoding, 20 s, has its own test in test_data.py). IG at 16/32/50 Gauss-Legendre steps is
    98 MobileNetV2 passes per image: 32 student images keep the maps under a minute."""
    sets = ['data.dataset="synthetic"', "data.synthetic_train=600", "data.synthetic_test=300",
            "data.val_size=50", "data.test_size=100", "teacher_train.train_size=300",
            "teacher_train.epochs=1", "student_train.train_size=32",
            "student_train.batch_size=16", "student_train.epochs=2",
            "robustness.test_per_setting=10", "robustness.val_per_setting=10",
            # latency at paper scale times 10 + 50 passes of batch 128 per model and trial:
            # the rehearsal checks the pipeline, not the figures
            "measure.latency_warmup=1", "measure.latency_runs=5",
            # A teacher of one epoch on 300 images is near constant, so f(x) - f(baseline) is
            # tiny and bf16 maps always miss ig.max_gap and are recomputed in fp32: compute
            # them in fp32 at once (the fallback has its own test in test_engine.py).
            'ig.precision="fp32"']
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.slow
def test_paper_scale_rehearsal_on_cpu(tmp_path: Path, isolated_storage: Path) -> None:
    """optimize, ablate (KD, IG, AT: 8 conditions x 2 seeds) and report at --scale paper:
    the MobileNetV2 teacher, the 5-block-truncated student, Gauss-Legendre IG at 16/32/50
    steps, attention transfer at the MobileNetV2 tap, latency, the report."""
    common = ["--study", "kd_ig", "--scale", "paper", "--no-progress", *_shrunk()]
    proc = run_cli("optimize", *common, "--n-trials", "2", timeout=900)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("study kd_ig at scale paper") and "0.54 M-parameter " \
        "mobilenetv2 student" in lines[0]
    assert "teacher (mobilenetv2, 2,236,682 parameters" in proc.stdout
    assert "median completeness gap 16 steps" in proc.stdout and "50 steps" in proc.stdout
    assert "gausslegendre rule" in proc.stdout
    url = f"sqlite:///{isolated_storage}/kdig.db"
    study = optuna.load_study(study_name="kd_ig-paper", storage=url)
    assert study.user_attrs["config"]["student"]["drop_blocks"] == 5
    assert study.user_attrs["latency"]["student"]["params"] == 543_498
    proc = run_cli("ablate", *common, "--seeds", "2", "--factors", "kd,ig,at", "--params",
                   "fixed", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-paper.ablation.json").read_text())
    summ = {s["condition"]: s["n"] for s in res["results"]["all"]["test_acc"]["summaries"]}
    assert summ == {c: 2 for c in ("student", "KD", "IG", "AT", "KD+IG", "KD+AT", "IG+AT",
                                   "KD+IG+AT")}
    assert {r["params"] for r in res["runs"]} == {543_498}
    proc = run_cli("report", "--study", "kd_ig", "--scale", "paper", "--out", str(tmp_path),
                   "--no-dashboard", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "kd_ig-paper.html").stat().st_size > 100_000

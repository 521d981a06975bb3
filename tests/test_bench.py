"""The benchmark command runs every section and writes its JSON (smoke scale, tiny sizes:
this checks the command, not the figures, which README quotes from full runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli


@pytest.mark.slow
def test_bench_runs_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile stubbed to the eager module: the compile and deploy sections' code runs
    # whole, without inductor's code generation (two of this test's four minutes on 2 cores;
    # what compile does is torch's, its cost is measured by `bench --only compile`)
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: model)
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--scale", "smoke", "--repeats", "1", "--images", "256",
                   "--ig-images", "4", "--adaptive-images", "16", "--trials", "3", "--json",
                   str(out), "--device", "cpu", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    names = " | ".join(r["name"] for r in res["results"])
    for part in ("batched loader", "engine training epoch", "IG maps, 8 trapezoid steps",
                 "all study step counts", "second run (store cached)", "second run (teacher",
                 "corruption suite", "outside training and evaluation", "median pruner",
                 "reading the teacher-output cache", "against the student alone",
                 "training step, teacher", "training step, student"):
        assert part in names, part
    for r in res["results"]:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] > 0


def test_bench_bad_section_is_one_line() -> None:
    assert_one_line_error(run_cli("bench", "--only", "loader,warp"), "--only warp",
                          "allowed: loader")


@pytest.mark.parametrize("auto", ["fp32", "bf16"])
def test_precision_bench_times_autos_choice_against_the_other(
        auto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import statistics

    import torch

    from kdig_study import bench_train
    from kdig_study.config import load_study
    from kdig_study.data import load_bundle

    cfg = load_study("kd_ig", "smoke")
    monkeypatch.setattr(bench_train, "resolve_precision", lambda p, d: auto)
    rows = bench_train.bench_precision(cfg, load_bundle(cfg.data), 64, 2, torch.device("cpu"))
    other = "fp32" if auto == "bf16" else "bf16"
    assert [r.name.split(",")[1].split()[0] for r in rows] == ["teacher", "student"]
    for row, tc in zip(rows, (cfg.teacher_train, cfg.student_train), strict=True):
        assert f"precision auto = {auto}" in row.name
        assert row.baseline_name == f"the same step at {other}"
        assert row.detail["steps"] == max(2, 64 // tc.batch_size)
        assert len(row.detail[f"{auto}_s_per_step"]) == 2
        assert row.ours == statistics.median(row.detail[f"{auto}_s_per_step"])
        assert row.baseline == statistics.median(row.detail[f"{other}_s_per_step"])
        assert row.ratio == row.baseline / row.ours

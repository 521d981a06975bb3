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
                 "reading the teacher-output cache", "against the student alone"):
        assert part in names, part
    for r in res["results"]:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] > 0


def test_bench_bad_section_is_one_line() -> None:
    assert_one_line_error(run_cli("bench", "--only", "loader,warp"), "--only warp",
                          "allowed: loader")

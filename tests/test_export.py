"""Deployment: ONNX export through the CLI at smoke scale, parity with PyTorch, int8 round
trip, the checker's veto, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import optuna
import pytest
import torch
from optuna.trial import TrialState

from cli_helpers import assert_one_line_error, run_cli
from conftest import REPO
from kdig_study.config import ModelConfig
from kdig_study.deploy import Deployable, export_onnx, ort_logits, parity, session, torch_logits
from kdig_study.errors import KdigError
from kdig_study.models import build_model


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A smoke search with two trials (their weights are artifacts), shared by the module."""
    root = tmp_path_factory.mktemp("export")
    env = {"KDIG_STORAGE": str(root / "storage"), "KDIG_CACHE": str(root / "storage" / "cache")}
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "2", "--pruner", "none", "--study-name", "exp", env=env)
    assert proc.returncode == 0, proc.stderr
    return env


@pytest.mark.slow
def test_export_parity_and_int8_through_the_cli(searched: dict[str, str]) -> None:
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--study-name", "exp", "--int8", "--no-compile", "--set",
                   "search.pruner=none", env=searched)
    assert proc.returncode == 0, proc.stderr
    out = Path(searched["KDIG_STORAGE"]) / "exports" / "exp"
    for name in ("student.onnx", "student.int8.onnx", "teacher.onnx", "teacher.int8.onnx",
                 "export.json"):
        assert (out / name).is_file(), name
    onnx.checker.check_model(str(out / "student.int8.onnx"))
    record = json.loads((out / "export.json").read_text())
    assert record["study"] == "exp" and record["versions"]["opset"] == "18"
    rows = {(r["model"], r["format"].split(" (")[0]): r for r in record["rows"]}
    fp32 = rows[("student", "ONNX Runtime fp32")]
    assert fp32["agreement_with_pytorch"] >= 0.999 and fp32["max_abs_logit_diff"] < 1e-3
    q = rows[("student", "ONNX Runtime int8")]
    # int8 weights are a quarter of fp32; at this tiny width the graph and the per-channel
    # scales weigh as much again (at cpu scale the file is about 0.3x)
    assert q["bytes"] < 0.75 * fp32["bytes"]
    assert q["delta_test_acc"] == pytest.approx(q["test_acc"] - fp32["test_acc"])
    assert q["calibration"].startswith("512 stratified training images")
    assert {"b1", "b128"} <= set(q["latency"]) and q["latency"]["b1"]["median_ms"] > 0
    assert "agrees with PyTorch on" in proc.stdout and "int8 vs fp32" in proc.stdout
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{searched['KDIG_STORAGE']}"
                                                        f"/kdig.db")
    assert study.user_attrs["deployment"]["rows"][0]["model"] == "student"


def test_a_trial_without_weights_is_one_line(searched: dict[str, str]) -> None:
    url = f"sqlite:///{searched['KDIG_STORAGE']}/kdig.db"
    study = optuna.load_study(study_name="exp", storage=url)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.1))
    number = study.get_trials()[-1].number
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--study-name", "exp",
                   "--trial", str(number), "--set", "search.pruner=none", env=searched)
    assert_one_line_error(proc, f"trial {number}", "no weights artifact")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={},
                                              state=TrialState.PRUNED))
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--study-name", "exp",
                   "--trial", str(number + 1), "--set", "search.pruner=none", env=searched)
    assert_one_line_error(proc, "is pruned", "only completed trials keep their weights")


def test_onnx_matches_pytorch_and_a_failed_check_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Deployable(build_model(ModelConfig(arch="convnet", width=0.125)).eval(),
                       (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    p = parity(torch_logits(model, images), ort_logits(session(path, 1), images, batch=10))
    assert p.agreement == 1.0 and p.max_abs_logit_diff < 1e-4 and p.n == 37

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("planted failure")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    bad = tmp_path / "bad.onnx"
    with pytest.raises(KdigError, match="failed onnx.checker.*planted failure"):
        export_onnx(model, bad)
    assert not bad.exists() and not list(tmp_path.glob(".bad.onnx*"))


def test_without_the_deploy_extra_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['onnxruntime'] = None; "
            "sys.argv = ['export', '--study', 'kd_ig', '--scale', 'smoke']; "
            "from kdig_study import export; from kdig_study.cli import run; run(export.main)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert_one_line_error(proc, "onnxruntime", 'pip install -e ".[deploy]"')

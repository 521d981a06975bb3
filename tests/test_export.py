"""Deployment: ONNX export through the CLI at smoke scale, parity with PyTorch, int8 round
trip, the checker's veto, and one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdig_study.config import ModelConfig
from kdig_study.deploy import (
    Deployable,
    default_int8_activations,
    export_onnx,
    ort_logits,
    parity,
    quantize_int8,
    session,
    torch_logits,
)
from kdig_study.errors import KdigError
from kdig_study.models import build_model

from cli_helpers import assert_one_line_error, run_cli

# the searched students train for one epoch: these tests check the export, not accuracy
ONE_EPOCH = ("--set", "student_train.epochs=1")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, warm_cache_source: Path
             ) -> dict[str, str]:
    """A smoke search with two trials (their weights are artifacts), shared by the module;
    the teacher, maps and corrupted splits come from the session's warm cache."""
    root = tmp_path_factory.mktemp("export")
    env = {"KDIG_STORAGE": str(root / "storage"), "KDIG_CACHE": str(root / "storage" / "cache")}
    shutil.copytree(warm_cache_source, env["KDIG_CACHE"])
    proc = run_cli("optimize", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--n-trials", "2", "--pruner", "none", "--study-name", "exp", *ONE_EPOCH,
                   env=env)
    assert proc.returncode == 0, proc.stderr
    return env


@pytest.mark.slow
def test_export_parity_and_int8_through_the_cli(searched: dict[str, str]) -> None:
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--study-name", "exp", "--int8", "--no-compile", "--set",
                   "search.pruner=none", *ONE_EPOCH, env=searched)
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
    assert q["calibration"].startswith("450 stratified training images")  # all of smoke
    assert q["activations"] == default_int8_activations()
    assert f"{q['activations']} activations" in q["format"]
    assert {"b1", "b128"} <= set(q["latency"]) and q["latency"]["b1"]["median_ms"] > 0
    assert "agrees with PyTorch on" in proc.stdout and "int8 vs fp32" in proc.stdout
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{searched['KDIG_STORAGE']}"
                                                        f"/kdig.db")
    assert study.user_attrs["deployment"]["rows"][0]["model"] == "student"
    # again without --int8: the folder is the new set only, no int8 file left from before
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--study-name", "exp", "--no-compile", "--no-teacher", "--set",
                   "search.pruner=none", *ONE_EPOCH, env=searched)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "student.onnx"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["exp"]


def test_a_trial_without_weights_is_one_line(searched: dict[str, str]) -> None:
    url = f"sqlite:///{searched['KDIG_STORAGE']}/kdig.db"
    study = optuna.load_study(study_name="exp", storage=url)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.1))
    number = study.get_trials()[-1].number
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--study-name", "exp",
                   "--trial", str(number), "--set", "search.pruner=none", *ONE_EPOCH, env=searched)
    assert_one_line_error(proc, f"trial {number}", "no weights artifact")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={},
                                              state=TrialState.PRUNED))
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--study-name", "exp",
                   "--trial", str(number + 1), "--set", "search.pruner=none", *ONE_EPOCH, env=searched)
    assert_one_line_error(proc, "is pruned", "only completed trials keep their weights")


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_trial_weights_are_one_line(searched: dict[str, str], damage: str) -> None:
    """2,000 flipped bytes in a trial's weights exported without a word (test 12% where the
    trial recorded 49%); truncated ones gave a traceback."""
    from optuna.artifacts import get_all_artifact_meta

    url = f"sqlite:///{searched['KDIG_STORAGE']}/kdig.db"
    study = optuna.load_study(study_name="exp", storage=url)
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert len(trial.user_attrs["weights_sha256"]) == 64  # recorded when it was written
    [meta] = [m for m in get_all_artifact_meta(trial, storage=study._storage)
              if m.filename.endswith(".safetensors")]
    path = Path(searched["KDIG_STORAGE"]) / "artifacts" / meta.artifact_id
    good = path.read_bytes()
    try:
        mid = len(good) // 2
        path.write_bytes(good[:mid] + bytes(b ^ 0xFF for b in good[mid:mid + 2000])
                         + good[mid + 2000:] if damage == "flipped" else good[:mid])
        proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke", "--study-name", "exp",
                       "--trial", str(trial.number), "--no-teacher", "--no-compile", "--set",
                       "search.pruner=none", *ONE_EPOCH, env=searched)
        assert_one_line_error(proc, f"trial {trial.number} of 'exp'", "is damaged",
                              "choose another --trial")
    finally:
        path.write_bytes(good)


def _tiny_deployable() -> Deployable:
    torch.manual_seed(0)
    return Deployable(build_model(ModelConfig(arch="convnet", width=0.125)).eval(),
                      (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)).eval()


def test_onnx_matches_pytorch_and_a_failed_check_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_deployable()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, image_size=32)
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    p = parity(torch_logits(model, images), ort_logits(session(path, 1), images, batch=10))
    assert p.agreement == 1.0 and p.max_abs_logit_diff < 1e-4 and p.n == 37

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("planted failure")

    def write_anything(model, args, path, **kwargs) -> None:
        Path(path).write_bytes(b"not checked yet")  # what the veto sees is planted below

    # the veto and the atomic write are under test here, not a second (3 s) export
    monkeypatch.setattr(torch.onnx, "export", write_anything)
    monkeypatch.setattr(onnx.checker, "check_model", reject)
    bad = tmp_path / "bad.onnx"
    with pytest.raises(KdigError, match="failed onnx.checker.*planted failure"):
        export_onnx(model, bad, image_size=32)
    assert not bad.exists() and not list(tmp_path.glob(".bad.onnx*"))


def test_without_the_deploy_extra_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled module gives
    with pytest.raises(ImportError):
        import onnxruntime  # noqa: F401
    proc = run_cli("export", "--study", "kd_ig", "--scale", "smoke")
    assert_one_line_error(proc, "onnxruntime", 'pip install -e ".[deploy]"')


def _activation_zero_point_types(path: Path) -> set[str]:
    """The element types of the activations' QuantizeLinear zero points (weights are stored
    quantised, behind DequantizeLinear only)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)
            for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_int8_activations_default_to_the_machines_fast_kind(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """S8S8 (int8 activations, the old fixed choice) ran the cpu student's batch of 128
    3.7x slower than U8S8 on x86-64, slower than fp32; the default is now the fast kind and
    the other stays a choice."""
    model = _tiny_deployable()
    fp32 = tmp_path / "m.onnx"
    export_onnx(model, fp32, image_size=32)
    calib = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    expected = {"uint8": "UINT8", "int8": "INT8"}
    used = quantize_int8(fp32, tmp_path / "auto.onnx", calib)
    assert used == default_int8_activations()
    assert _activation_zero_point_types(tmp_path / "auto.onnx") == {expected[used]}
    for kind in ("uint8", "int8"):
        assert quantize_int8(fp32, tmp_path / f"{kind}.onnx", calib, kind) == kind
        assert _activation_zero_point_types(tmp_path / f"{kind}.onnx") == {expected[kind]}
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        p = parity(ort_logits(session(fp32, 1), images),
                   ort_logits(session(tmp_path / f"{kind}.onnx", 1), images))
        assert p.max_abs_logit_diff < 1.0  # a quantised copy of the same model
    # the unfolded BatchNorms are quantised per channel on their own axis, without warnings
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    with pytest.raises(KdigError, match="allowed uint8, int8"):
        quantize_int8(fp32, tmp_path / "bad.onnx", calib, "int4")
    assert not (tmp_path / "bad.onnx").exists()


def test_default_int8_activations_follow_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert default_int8_activations() == "uint8"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert default_int8_activations() == "int8"

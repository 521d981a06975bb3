from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli


def test_smoke_student_through_the_cli(tmp_path: Path, warm_cache: Path) -> None:
    out = tmp_path / "out.json"
    proc = run_cli("train", "--study", "kd_ig", "--role", "student", "--scale", "smoke",
                   "--no-ig", "--no-progress", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "teacher loaded from cache" in text and "student (KD)" in text
    assert "compression" in text and "latency batch 1: median" in text
    res = json.loads(out.read_text())
    assert res["student"]["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert res["teacher"]["test_acc"] > 0.6
    assert Path(res["student"]["checkpoint"]).is_file()
    # the smoke scale's [measure] counts, said in the measurement's method
    assert (res["student"]["latency_b1"]["runs"], res["student"]["latency_b1"]["warmup"]) == \
        (10, 2)
    assert "2 warm-up passes, then median and p90 of 10 timed" in res["student"]["latency_b1"][
        "method"]
    # a teacher of other settings is trained, then reused from the cache
    other = ("--study", "kd_ig", "--role", "teacher", "--scale", "smoke", "--no-progress",
             "--set", "teacher_train.epochs=1")
    proc = run_cli("train", *other)
    assert proc.returncode == 0 and "teacher trained now" in proc.stdout, proc.stderr
    proc = run_cli("train", *other)
    assert proc.returncode == 0 and "teacher loaded from cache" in proc.stdout


@pytest.mark.parametrize("args,fragments", [
    (["--study", "nope", "--role", "teacher", "--scale", "smoke"], ["unknown study 'nope'"]),
    (["--study", "kd_ig", "--role", "teacher", "--scale", "huge"], ["unknown scale 'huge'"]),
    (["--study", "kd_ig", "--role", "coach", "--scale", "smoke"], ["--role", "coach"]),
    (["--study", "kd_ig", "--role", "teacher", "--scale", "smoke", "--bogus"], ["--bogus"]),
    (["--study", "kd_ig", "--role", "teacher", "--scale", "cpu", "--data-dir", "/nonexistent"],
     ["/nonexistent", "does not exist", "KDIG_DATA"]),
    (["--study", "kd_ig", "--role", "teacher", "--scale", "smoke", "--device", "cuda:7"],
     ["cuda:7"]),
    (["--study", "kd_ig", "--role", "student", "--scale", "smoke", "--epochs", "0"],
     ["--epochs 0"]),
])
def test_bad_arguments_give_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli("train", *args), *fragments)


@pytest.mark.slow
def test_the_cifar_resnet_pair_trains_with_kd_ig_and_at(tmp_path: Path) -> None:
    """The resnet_cifar study (ResNet-14 -> ResNet-8 at half width on the smoke data): the
    teacher, its IG maps and a KD+IG+AT student through the CLI; AT taps both at 16x16."""
    out = tmp_path / "out.json"
    proc = run_cli("train", "--study", "resnet_cifar", "--role", "student", "--scale",
                   "smoke", "--at", "--no-progress", "--json", str(out),
                   "--set", "student_train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert "student (KD+IG+AT)" in proc.stdout
    res = json.loads(out.read_text())
    assert res["teacher"]["params"] == 44_370 and res["student"]["params"] == 19_954
    assert res["teacher"]["test_acc"] > 0.5  # chance: 0.1 (77% when measured)
    assert 0 < res["student"]["test_acc"] <= 1 and res["student"]["epochs_run"] == 2


def test_your_own_architectures_train_with_kd_and_gradcam_maps(tmp_path: Path) -> None:
    """python:module:function teacher and student (tests/arch_fixtures.py) through the CLI:
    the teacher, its Grad-CAM maps (the layer found by itself) and a KD+overlay student."""
    out = tmp_path / "out.json"
    proc = run_cli("train", "--study", "kd_ig", "--role", "student", "--scale", "smoke",
                   "--no-progress", "--json", str(out),
                   "--set", "teacher.arch=python:arch_fixtures:tiny_teacher",
                   "--set", "student.arch=python:arch_fixtures:tiny_student",
                   "--set", "teacher.width=1.0", "--set", "student.width=1.0",
                   "--set", "ig.source=gradcam", "--set", "teacher_train.epochs=3",
                   "--set", "student_train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    # 3x3 convs 3->24 and 24->48 with BN, a linear head: parameters of the fixture
    assert res["teacher"]["params"] == 3 * 24 * 9 + 48 + 24 * 48 * 9 + 96 + 48 * 10 + 10
    assert res["student"]["params"] == 3 * 8 * 9 + 16 + 8 * 16 * 9 + 32 + 16 * 10 + 10
    assert "student (KD+IG)" in proc.stdout  # the overlay, from Grad-CAM maps


def test_a_data_set_of_its_own_trains_through_the_cli(tmp_path: Path) -> None:
    """12 classes from image folders (not CIFAR-10's 10): the banner names the data set, and
    teacher and KD+IG student train with 12-way heads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 6)):
        for c in range(12):
            d = tmp_path / "tiles" / split / f"class{c:02d}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
                arr[(c % 4) * 8:(c % 4) * 8 + 8, (c // 4) * 10:(c // 4) * 10 + 10] = 220
                Image.fromarray(arr).save(d / f"{i:02d}.png")
    out = tmp_path / "out.json"
    proc = run_cli("train", "--study", "kd_ig", "--role", "student", "--scale", "smoke",
                   "--no-progress", "--json", str(out), "--data-dir", str(tmp_path / "tiles"),
                   "--set", "data.dataset=folder", "--set", "data.val_size=60",
                   "--set", "student_train.epochs=1",
                   # the store's 8-step maps of this 1-epoch teacher missed the 5% bound
                   # (median gap 5.12%) on an AMD EPYC, whose bf16 kernels train another
                   # teacher: the bound is not what this test is about
                   "--set", "ig.max_gap=0.1")
    assert proc.returncode == 0, proc.stderr
    assert "300 training images of 12 classes at 32 px (60 validation, 72 test) from " \
           "folder:" in proc.stdout
    res = json.loads(out.read_text())
    assert res["teacher"]["test_acc"] > 1 / 12  # above chance for 12 classes


@pytest.mark.parametrize("teacher_layer,ok", [("6", True), ("2", False)])
def test_attention_transfer_between_your_architectures(teacher_layer: str, ok: bool) -> None:
    """AT taps the layers named by at_layer (16x16 in both at "6"); maps of two sizes are one
    line, not a shape error from deep inside the loss."""
    proc = run_cli("train", "--study", "kd_ig", "--role", "student", "--scale", "smoke",
                   "--no-progress", "--at", "--no-ig",
                   "--set", "teacher.arch=python:arch_fixtures:tiny_teacher",
                   "--set", "student.arch=python:arch_fixtures:tiny_student",
                   "--set", "teacher.width=1.0", "--set", "student.width=1.0",
                   "--set", f"teacher.at_layer=\"{teacher_layer}\"",
                   "--set", "student.at_layer=\"6\"",
                   "--set", "teacher_train.epochs=2", "--set", "student_train.epochs=1")
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert "student (KD+AT)" in proc.stdout
    else:
        assert_one_line_error(proc, "attention transfer: the student's map at '6' is 16x16, "
                                    "the teacher's at '2' has 1024 positions")

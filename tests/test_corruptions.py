from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdig_study.config import CORRUPTIONS, load_study
from kdig_study.corruptions import (
    SEVERITY,
    RobustSuite,
    contrast,
    corrupt,
    gaussian_blur,
    jpeg_bytes,
)
from kdig_study.data import load_bundle
from kdig_study.errors import KdigError

from conftest import REPO


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(40, 216, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_and_severity_zero_is_identity(name: str) -> None:
    x = _images()
    a, b = corrupt(x, name, 2, seed=5), corrupt(x, name, 2, seed=5)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, x)
    assert torch.equal(corrupt(x, name, 0), x)
    # stronger severity, further from the clean image
    d = [(corrupt(x, name, s).float() - x.float()).abs().mean().item() for s in (1, 2, 3)]
    assert d[0] < d[1] < d[2], d


def test_noise_has_the_stated_sd_and_depends_on_the_seed() -> None:
    grey = torch.full((200, 3, 32, 32), 128, dtype=torch.uint8)  # no clipping at mid grey
    for sev, sd in enumerate(SEVERITY["gaussian_noise"], start=1):
        out = corrupt(grey, "gaussian_noise", sev, seed=1).float() / 255
        measured = (out - 128 / 255).std().item()
        assert measured == pytest.approx(sd, rel=0.03), (sev, measured)
    assert not torch.equal(corrupt(grey, "gaussian_noise", 1, seed=1),
                           corrupt(grey, "gaussian_noise", 1, seed=2))


def _jpeg_quality(data: bytes) -> int:
    """The IJG quality whose scaled standard luminance table is the file's table 0."""
    base = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40,
            57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24,
            35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98,
            112, 100, 103, 99]
    table = sorted(Image.open(io.BytesIO(data)).quantization[0])
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q  # libjpeg's integer arithmetic
        expect = sorted(min(255, max(1, (b * scale + 50) // 100)) for b in base)
        if expect == table:
            return q
    raise AssertionError("no IJG quality matches")


def test_jpeg_quality_recovered_from_the_file() -> None:
    x = _images(4)
    for q in SEVERITY["jpeg"]:
        files = jpeg_bytes(x, int(q))
        assert _jpeg_quality(files[0]) == q


def test_blur_sigma_and_contrast_factor_are_measured() -> None:
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1.0
    for sigma in SEVERITY["gaussian_blur"]:
        k = gaussian_blur(impulse, sigma)[0, 0]
        ys = torch.arange(31, dtype=torch.float32) - 15
        var = (k.sum(1) * ys ** 2).sum() / k.sum()
        assert math.sqrt(var.item()) == pytest.approx(sigma, rel=0.08)
    x = _images(8).float() / 255
    for factor in SEVERITY["contrast"]:
        y = contrast(x, factor)
        ratio = (y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3)))
        assert torch.allclose(ratio, torch.full_like(ratio, factor), rtol=1e-4)
        assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)
    bright = corrupt(torch.full((2, 3, 8, 8), 100, dtype=torch.uint8), "brightness", 1)
    assert (bright.float().mean() - 100).item() == pytest.approx(0.15 * 255, abs=0.6)


def test_suite_is_cached_and_evaluates(isolated_storage: Path) -> None:
    cfg = load_study("kd_ig", "smoke")
    data = load_bundle(cfg.data)
    suite = RobustSuite(data, cfg.robustness)
    s = len(cfg.robustness.corruptions) * len(cfg.robustness.severities)
    assert suite.test.images.shape == (s, 40, 3, 32, 32)
    files = list((isolated_storage / "cache" / "corrupted").glob("*.npz"))
    assert len(files) == 2
    again = RobustSuite(data, cfg.robustness)
    assert torch.equal(again.test.images, suite.test.images)
    # the severities of a corruption share one slice (a severity curve compares the same
    # images); different corruptions have disjoint slices (5 x 40 < 300 test images)
    rows = {st.key: r for st, r in zip(suite.test.settings, suite.test.rows, strict=True)}
    for c in cfg.robustness.corruptions:
        same = [rows[f"{c}-{sev}"] for sev in cfg.robustness.severities]
        assert all(torch.equal(same[0], r) for r in same)
    firsts = [set(rows[f"{c}-1"].tolist()) for c in cfg.robustness.corruptions]
    assert all(not (a & b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
    labels = {st.key: lab for st, lab in zip(suite.test.settings, suite.test.labels, strict=True)}
    assert torch.equal(labels["jpeg-1"], labels["jpeg-3"])
    from kdig_study.models import build_model
    out = suite.evaluate(build_model(cfg.student).eval(), torch.device("cpu"), "fp32")
    assert 0 <= out.test_acc <= 1 and "jpeg" in out.by_corruption
    assert "gaussian_noise-3" in out.by_setting and 0 <= out.val_acc <= 1
    # the mean over settings is the mean of the per-setting accuracies, and a corruption's
    # accuracy the mean of its severities (equal slices)
    assert out.test_acc == pytest.approx(sum(out.by_setting.values()) / len(out.by_setting))
    assert out.by_corruption["jpeg"] == pytest.approx(
        sum(out.by_setting[f"jpeg-{s}"] for s in cfg.robustness.severities)
        / len(cfg.robustness.severities))


def test_unknown_corruption_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "kd_ig.toml").write_text((REPO / "studies" / "kd_ig.toml").read_text())
    bad = tmp_path / "bad.toml"
    bad.write_text('inherit = "kd_ig"\n[robustness]\ncorruptions = ["jpeg", "fog"]\n')
    with pytest.raises(KdigError) as e:
        load_study(str(bad), "smoke")
    msg = str(e.value)
    assert "\n" not in msg and "robustness.corruptions" in msg and "'fog'" in msg
    assert "allowed: jpeg, gaussian_noise" in msg
    bad.write_text('inherit = "kd_ig"\n[search]\nobjectives = ["test_acc"]\n')
    with pytest.raises(KdigError, match="search.objectives"):
        load_study(str(bad), "smoke")


def _ic() -> object:
    return pytest.importorskip("imagecorruptions", reason="the corruptions extra is not "
                               "installed (pip install -e '.[corruptions]')")


@pytest.mark.parametrize("size", [32, 48])
def test_imagenet_c_corruptions_are_deterministic_and_grow_with_severity(size: int) -> None:
    import numpy as np

    _ic()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(40, 216, (6, 3, size, size), generator=g, dtype=torch.uint8)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for name in ("ic_shot_noise", "ic_motion_blur", "ic_pixelate", "ic_frost"):
        out = [corrupt(images, name, s, seed=3) for s in (1, 2, 3)]
        assert all(o.shape == images.shape and o.dtype == torch.uint8 for o in out)
        assert torch.equal(out[2], corrupt(images, name, 3, seed=3)), name
        change = [(o.float() - images.float()).abs().mean().item() for o in out]
        assert 0 < change[0] < change[2], (name, change)
    noisy = [corrupt(images, "ic_shot_noise", 2, seed=k) for k in (3, 4)]
    assert not torch.equal(*noisy)  # the seed draws the noise
    assert torch.equal(corrupt(images, "ic_shot_noise", 0), images)  # severity 0: clean
    # NumPy's global generator is left as it was
    assert np.array_equal(np.random.get_state()[1], before)


def test_imagenet_c_names_are_checked_before_anything_runs(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import sys

    from kdig_study import corruptions_ic

    _ic()
    (tmp_path / "kd_ig.toml").write_text((REPO / "studies" / "kd_ig.toml").read_text())
    bad = tmp_path / "bad.toml"
    import imagecorruptions

    real = imagecorruptions.corrupt

    def broken_spatter(image, corruption_name, severity):  # as fog is under NumPy 2
        if corruption_name == "spatter":
            raise AttributeError("`np.float_` was removed\nin the NumPy 2.0 release.")
        return real(image, corruption_name=corruption_name, severity=severity)

    monkeypatch.setattr(imagecorruptions, "corrupt", broken_spatter)
    corruptions_ic.check.cache_clear()
    for names, fragments in (
            ('["jpeg", "ic_smog"]', ["bad.toml: robustness.corruptions: unknown corruption "
                                     "'ic_smog'", "ic_shot_noise, "]),
            ('["ic_spatter"]', ["ic_spatter fails in imagecorruptions ",
                                "(AttributeError: `np.float_` was removed in the NumPy 2.0 "
                                "release.); leave it out"]),
            ('["ic_snow"]\n[data]\nimage_size = 16',
             ["ic_snow needs images of 32 px or more; data.image_size = 16"])):
        bad.write_text(f'inherit = "kd_ig"\n[robustness]\ncorruptions = {names}\n')
        with pytest.raises(KdigError) as e:
            load_study(str(bad), "smoke")
        assert "\n" not in str(e.value)
        for f in fragments:
            assert f in str(e.value), (f, str(e.value))
    monkeypatch.setattr(imagecorruptions, "corrupt", real)
    corruptions_ic.check.cache_clear()
    bad.write_text('inherit = "kd_ig"\n[robustness]\ncorruptions = ["ic_spatter"]\n')
    assert load_study(str(bad), "smoke").robustness.corruptions == ("ic_spatter",)
    # images below the package's 32 px (data.image_size = 0: known only once decoded)
    with pytest.raises(KdigError, match=r"ic_spatter needs images of 32 px or more \(these "
                                        r"are 16 px\)"):
        corrupt(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "ic_spatter", 1, seed=0)
    # without the package: one line saying which extra to install
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    corruptions_ic.check.cache_clear()
    with pytest.raises(KdigError, match=r"install the extra: pip install -e "
                                        r"'\.\[corruptions\]'"):
        load_study(str(bad), "smoke")


@pytest.mark.slow  # two smoke runs
def test_imagenet_c_families_through_an_ablation(tmp_path: Path, isolated_storage: Path
                                                 ) -> None:
    import json

    from cli_helpers import run_cli

    _ic()
    proc = run_cli("ablate", "--study", "kd_ig", "--scale", "smoke", "--no-progress",
                   "--set", "student_train.epochs=1", "--factors", "kd", "--seeds", "1",
                   "--set", 'robustness.corruptions=["jpeg", "ic_shot_noise", "ic_snow"]',
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "kd_ig-smoke.ablation.json").read_text())
    for run in res["runs"]:
        assert {"robust_test_ic_shot_noise", "robust_test_ic_snow-3",
                "robust_test_jpeg"} <= set(run), sorted(run)
        mean = sum(run[f"robust_test_{c}"] for c in ("jpeg", "ic_shot_noise", "ic_snow")) / 3
        assert run["robust_test_acc"] == pytest.approx(mean, abs=1e-9)
    families = res["results"]["all"]["robust_by_family"]["families"]
    assert set(families) == {"jpeg", "ic_shot_noise", "ic_snow"}

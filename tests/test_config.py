from __future__ import annotations

from pathlib import Path

import pytest

from kdig_study.config import SCALES, load_study
from kdig_study.errors import KdigError

from conftest import REPO

STUDIES = sorted(p.stem for p in (REPO / "studies").glob("*.toml"))


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("scale", SCALES)
def test_every_study_loads_at_every_scale(study: str, scale: str) -> None:
    cfg = load_study(study, scale)
    assert cfg.name == study and cfg.scale == scale
    assert len(cfg.fingerprint()) == 64


def test_kd_ig_paper_scale_is_the_papers_setup() -> None:
    cfg = load_study("kd_ig", "paper")
    assert (cfg.teacher.arch, cfg.teacher.width, cfg.teacher.drop_blocks) == ("mobilenetv2", 1.0, 0)
    assert (cfg.student.arch, cfg.student.drop_blocks) == ("mobilenetv2", 5)
    assert (cfg.kd.temperature, cfg.kd.alpha) == (2.5, 0.01)
    assert (cfg.ig.steps, cfg.ig.baseline, cfg.ig.overlay_prob, cfg.ig.overlay_strength) == \
        (50, "zeros", 0.1, 0.5)
    t = cfg.student_train
    assert (t.optimizer, t.lr, t.batch_size, t.epochs) == ("adam", 1e-3, 64, 100)
    assert cfg.method.kd and cfg.method.ig and not cfg.method.at


def test_scales_differ_and_fingerprints_differ() -> None:
    fps = {load_study("kd_ig", s).fingerprint() for s in SCALES}
    assert len(fps) == 3
    assert load_study("kd_ig", "smoke").data.dataset == "synthetic"


def _write(tmp_path: Path, text: str, inherit: bool = True) -> str:
    path = tmp_path / "bad.toml"
    head = 'inherit = "kd_ig"\n' if inherit else ""
    # inherit resolves beside the file: copy the parent in
    (tmp_path / "kd_ig.toml").write_text((REPO / "studies" / "kd_ig.toml").read_text())
    path.write_text(head + text)
    return str(path)


BAD = [
    ("[kd]\nalpha = 1.5\n", "kd.alpha", "1.5", "<= 1"),
    ("[kd]\nalpha = -0.1\n", "kd.alpha", "-0.1", ">= 0"),
    ("[kd]\ntemperature = 0.0\n", "kd.temperature", "0.0", "> 0"),
    ("[kd]\ntemperature = -2\n", "kd.temperature", "-2", "> 0"),
    ("[ig]\noverlay_prob = 1.2\n", "ig.overlay_prob", "1.2", "<= 1"),
    ("[ig]\noverlay_strength = -0.5\n", "ig.overlay_strength", "-0.5", ">= 0"),
    ("[student_train]\nepochs = 0\n", "student_train.epochs", "0", ">= 1"),
    ("[teacher_train]\nepochs = 2.5\n", "teacher_train.epochs", "2.5", "an integer"),
    ("[data]\ndataset = \"imagenet\"\n", "data.dataset", "imagenet", "'cifar10'"),
    ("[teacher]\narch = \"resnet18\"\n", "teacher.arch", "resnet18", "'mobilenetv2'"),
    ("[kd]\nalpha = \"high\"\n", "kd.alpha", "high", "a number"),
    ("[method]\nkd = 1\n", "method.kd", "1", "true or false"),
    ("[kd]\nbeta = 2\n", "kd.beta", "", "temperature, alpha"),
    ("[distill]\nx = 1\n", "distill", "", "data, teacher"),
    ("[scales.cpu.kd]\nalpha = 2.0\n", "scales.cpu.kd.alpha", "2.0", "<= 1"),
    ("[search.space.beta]\nlow = 1\nhigh = 2\n", "search.space.beta", "", "temperature"),
    ("[search.space.alpha]\nlow = 0.5\nhigh = 0.1\n", "search.space.alpha", "", "low <= high"),
    # NaN passes every range check (comparisons with NaN are false): refused as not finite
    ("[kd]\ntemperature = nan\n", "kd.temperature", "nan", "finite"),
    ("[ig]\noverlay_prob = nan\n", "ig.overlay_prob", "nan", "finite"),
    ("[ig]\nsmoothgrad_sigma = inf\n", "ig.smoothgrad_sigma", "inf", "finite"),
    ("[search.space.alpha]\nlow = nan\nhigh = 0.1\n", "search.space.alpha.low", "nan",
     "finite"),
    ("[ig]\nsource = \"lime\"\n", "ig.source", "lime", "'shuffled'"),
    ("[search.space.source]\nchoices = [\"ig\", \"lime\"]\n", "search.space.source", "lime",
     "gradcam"),
]


@pytest.mark.parametrize("text,key,value,allowed", BAD)
def test_bad_values_name_file_key_value_and_allowed(tmp_path: Path, text: str, key: str,
                                                     value: str, allowed: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(KdigError) as e:
        load_study(path, "cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(path)
    assert key in msg and value in msg and allowed in msg, msg


def test_unknown_scale_and_unknown_study() -> None:
    with pytest.raises(KdigError, match=r"unknown scale 'huge'; allowed: smoke, cpu, paper"):
        load_study("kd_ig", "huge")
    with pytest.raises(KdigError, match=r"unknown study 'nope'.*known studies: .*kd_ig"):
        load_study("nope", "cpu")


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[kd\nalpha = ")
    with pytest.raises(KdigError, match="not valid TOML"):
        load_study(str(path), "smoke")


def test_config_is_frozen() -> None:
    cfg = load_study("kd_ig", "smoke")
    with pytest.raises(AttributeError):
        cfg.kd.alpha = 0.5  # type: ignore[misc]


def test_search_bounds_are_checked_against_the_parameter() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = _write(Path(d), "[search.space.alpha]\nlow = 0.1\nhigh = 1.5\n")
        with pytest.raises(KdigError, match=r"search.space.alpha = 1.5: out of range for alpha"):
            load_study(path, "cpu")
        path = _write(Path(d), "[search.space.ig_steps]\nchoices = [8, 16.5]\n")
        with pytest.raises(KdigError, match=r"allowed: integers"):
            load_study(path, "cpu")


def test_fingerprint_ignores_search_length_but_not_method() -> None:
    import dataclasses

    cfg = load_study("kd_ig", "smoke")
    longer = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, n_trials=99))
    assert longer.fingerprint() == cfg.fingerprint()
    other = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, alpha=0.5))
    assert other.fingerprint() != cfg.fingerprint()

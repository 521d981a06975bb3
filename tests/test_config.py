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
    ("[teacher]\narch = \"resnet18\"\n", "teacher.arch", "resnet18",
     "resnetD (D = 6n+2: resnet20"),
    ("[scales.cpu.student]\narch = \"wrn15_2\"\n", "student.arch", "wrn15_2",
     "wrnD_K (D = 6n+4"),
    ("[scales.cpu.student]\narch = \"resnet20\"\ndrop_blocks = 2\nwidth = 1.0\n",
     "student.drop_blocks", "2", "only MobileNetV2"),
    ("[method]\nat = true\n[scales.cpu.teacher]\narch = \"resnet56\"\nstyle = \"default\"\n",
     "method.at", "resnet56/default", "one family"),
    ("[scales.cpu.student]\nsmall_input = true\n", "student.small_input", "true",
     "only torchvision:NAME"),
    ("[scales.cpu.student]\narch = \"torchvision:resnet18\"\nwidth = 0.5\n", "student.width",
     "0.5", "allowed: 1.0"),
    ("[method]\nat = true\n[scales.cpu.teacher]\narch = \"torchvision:resnet18\"\n"
     "style = \"default\"\n", "method.at", "torchvision:resnet18", "set teacher.at_layer"),
    ("[scales.cpu.student]\nat_layer = \"layer2\"\n", "student.at_layer", "layer2",
     "has its own tap"),
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


def _other_value(cfg, name: str):
    """A value of search parameter ``name`` that differs from ``cfg``'s and is in range."""
    from kdig_study.config import MAP_SOURCES, param_values

    now = param_values(cfg)[name]
    if name == "source":
        return next(s for s in MAP_SOURCES if s != now)
    if name == "ig_steps":
        return now * 2 + 1
    if name == "kd_method":
        return "dkd" if now != "dkd" else "dist"
    return now * 0.5 if now else 0.25


@pytest.mark.parametrize("name", ["temperature", "alpha", "overlay_strength", "overlay_prob",
                                  "ig_steps", "lr", "at_weight", "source", "kd_method",
                                  "dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma"])
def test_every_search_parameter_round_trips_into_the_runs_config(name: str) -> None:
    """Each table entry reaches the run's config (apply_params), is read back by the same
    name (param_values), and changes nothing else: a parameter recorded but never applied
    would fail here."""
    from kdig_study.config import SEARCH_PARAMETERS, SEARCH_PARAMS, apply_params, param_values

    assert name in SEARCH_PARAMS and set(SEARCH_PARAMS) == set(SEARCH_PARAMETERS)
    cfg = load_study("kd_ig", "smoke")
    value = _other_value(cfg, name)
    after = apply_params(cfg, {name: value})
    p = SEARCH_PARAMETERS[name]
    assert getattr(getattr(after, p.section), p.key) == value
    assert param_values(after) == param_values(cfg) | {name: value}
    assert after.fingerprint() != cfg.fingerprint()  # the run's identity sees it
    assert apply_params(after, {name: param_values(cfg)[name]}) == cfg


def test_the_table_covers_every_parameter_the_search_and_the_ablation_use() -> None:
    from kdig_study.ablation import Run, run_config
    from kdig_study.config import SEARCH_PARAMS, apply_params, relevant_space
    from kdig_study.sweep import NO_SWEEP

    assert len(SEARCH_PARAMS) == 13  # a new entry needs a case in the test above
    cfg = load_study("kd_ig", "smoke")
    with pytest.raises(KdigError, match="unknown search parameter 'temprature'"):
        apply_params(cfg, {"temprature": 3.0})
    # the ablation's run config applies them too: KD on, IG off still carries the KD values
    run = run_config(cfg, {"temperature": 7.0, "alpha": 0.3}, Run(frozenset({"kd"}), 0),
                     NO_SWEEP)
    assert (run.kd.temperature, run.kd.alpha, run.method.ig) == (7.0, 0.3, False)
    # what a study searches follows its method switches
    space = relevant_space(load_study("student", "smoke"))
    assert set(space) <= {"lr"}
    assert {"temperature", "overlay_strength"} <= set(relevant_space(cfg))


def test_measurement_settings_are_checked_but_not_part_of_the_identity() -> None:
    base = load_study("kd_ig", "smoke")
    assert (base.measure.latency_warmup, base.measure.latency_runs) == (2, 10)
    assert load_study("kd_ig", "cpu").measure.latency_runs == 50
    more = load_study("kd_ig", "smoke", ["measure.latency_runs=200"])
    assert more.measure.latency_runs == 200 and more.fingerprint() == base.fingerprint()
    with pytest.raises(KdigError, match="measure.latency_runs = 2: out of range"):
        load_study("kd_ig", "smoke", ["measure.latency_runs=2"])

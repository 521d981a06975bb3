"""The report: data steps on a store built here, every section in the HTML, empty states,
escaping, and the page drawn by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from kdig_study import report_data as rd
from kdig_study.optuna_adapter import storage_of, study_id
from kdig_study.report import SECTIONS, build, render

from cli_helpers import assert_one_line_error, run_cli

SPACE = {"temperature": FloatDistribution(1, 10, log=True),
         "alpha": FloatDistribution(0.001, 1, log=True),
         "overlay_strength": FloatDistribution(0.1, 0.9), "overlay_prob": FloatDistribution(0, 0.5),
         "ig_steps": CategoricalDistribution([8, 16, 32])}
TEACHER = {"val_acc": 0.80, "test_acc": 0.80, "params": 1_978_026, "flops": 303_800_000,
           "latency_b1": {"median_ms": 2.0, "p90_ms": 2.2, "batch_size": 1, "method": "cpu, ..."},
           "latency_b128": {"median_ms": 120.0, "p90_ms": 130.0, "batch_size": 128}}


def _metrics(test: float, epochs: int = 3) -> dict:
    return {"test_acc": test, "params": 495_962, "flops": 76_400_000, "compression": 3.988,
            "epochs_run": epochs, "latency_b1_median_ms": 1.3, "latency_b1_p90_ms": 1.7,
            "latency_b128_median_ms": 48.0, "latency_b128_p90_ms": 53.0, "seed": 0,
            "robust_test_acc": test - 0.1, "robust_val_acc": test - 0.09}


def _robust(test: float) -> dict:
    return {"jpeg": test - 0.05, "jpeg-1": test - 0.02, "gaussian_noise": test - 0.15}


def _search_study(url: str, name: str = "kd_ig-cpu", values=(0.70, 0.74, 0.72),
                  pruned: int = 1) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("scale", "cpu")
    study.set_user_attr("teacher", TEACHER)
    study.set_user_attr("data", {"origin": "archive:cifar10-jpg.tar.gz", "train": 48000,
                                 "val": 2000, "test": 10000})
    study.set_user_attr("config", {"method": {"kd": True, "ig": True, "at": False}})
    lat = {"b1": {"median_ms": 0.5, "p90_ms": 0.6}, "b128": {"median_ms": 20.0, "p90_ms": 21.0}}
    study.set_user_attr("deployment", {
        "study": name, "trial": 1, "folder": "storage/exports/x", "threads": 2,
        "input": "float32 images in [0, 1]", "versions": {"onnx": "1"},
        "rows": [{"model": "student", "format": "ONNX Runtime fp32", "bytes": 2_000_000,
                  "test_acc": 0.73, "robust_test_acc": 0.6, "latency": lat},
                 {"model": "student", "format": "ONNX Runtime int8 (static QDQ, per-channel)",
                  "bytes": 600_000, "test_acc": 0.725, "robust_test_acc": 0.59,
                  "delta_test_acc": -0.005, "delta_robust_test_acc": -0.01, "latency": lat}]})
    rng = np.random.default_rng(0)
    import torch
    from optuna.artifacts import upload_artifact

    from kdig_study.overlay import save_preview
    from kdig_study.store import artifact_store

    png = save_preview(Path(url.removeprefix("sqlite:///")).parent / "preview.png",
                       torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8),
                       torch.rand(3, 32, 32))
    for i, v in enumerate(values):
        params = {"temperature": float(rng.uniform(1, 10)), "alpha": float(rng.uniform(0.01, 1)),
                  "overlay_strength": float(rng.uniform(0.1, 0.9)),
                  "overlay_prob": float(rng.uniform(0, 0.5)), "ig_steps": [8, 16, 32][i % 3]}
        # as a real trial runs: asked, reported, attributes and artifact, told
        study.enqueue_trial(params)
        trial = study.ask(SPACE)
        for epoch, acc in ((1, v - 0.2), (2, v - 0.1), (3, v)):
            trial.report(acc, epoch)
        trial.set_user_attr("test_acc", v - 0.01)
        trial.set_user_attr("metrics", _metrics(v - 0.01))
        trial.set_user_attr("robust", _robust(v - 0.01))
        upload_artifact(artifact_store=artifact_store(), file_path=str(png), study_or_trial=trial)
        study.tell(trial, v)
    for _ in range(pruned):
        study.add_trial(create_trial(params={"temperature": 2.0, "alpha": 0.5,
                                             "overlay_strength": 0.5, "overlay_prob": 0.1,
                                             "ig_steps": 8},
                                     distributions=SPACE, state=TrialState.PRUNED,
                                     intermediate_values={1: 0.3},
                                     user_attrs={"metrics": {"epochs_run": 1}}))
    return study


ACC = {("student", 0): 0.70, ("student", 1): 0.72, ("KD", 0): 0.74, ("KD", 1): 0.77,
       ("IG", 0): 0.71, ("IG", 1): 0.72, ("KD+IG", 0): 0.76, ("KD+IG", 1): 0.78}
FLAGS = {"student": (0, 0), "KD": (1, 0), "IG": (0, 1), "KD+IG": (1, 1)}


def _ablation_study(url: str, search: str = "kd_ig-cpu", sweep: bool = False) -> None:
    name = f"{search}.ablation" + ("-sweep-width" if sweep else "")
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("ablation", {
        "levels": {"kd": ["none", "kd"], "overlay": ["none", "ig"]}, "design": "best",
        "design_text": "every condition at the best trial of the KD+IG search",
        "params": {c: {"alpha": 0.3} for c in FLAGS}, "seeds": {"0": 1000, "1": 1001}})
    dists = {"condition": CategoricalDistribution(list(FLAGS)),
             "replicate": IntDistribution(0, 9), "kd": CategoricalDistribution([0, 1]),
             "at": CategoricalDistribution([0, 1]),
             "overlay": CategoricalDistribution(["none", "ig"])}
    widths = (0.25, 0.5) if sweep else (None,)
    if sweep:
        dists["width"] = CategoricalDistribution([0.25, 0.5])
    for w in widths:
        for (cond, seed), acc in ACC.items():
            kd, ig = FLAGS[cond]
            params = {"condition": cond, "replicate": seed, "kd": kd, "at": 0,
                      "overlay": "ig" if ig else "none"}
            m = _metrics(acc)
            if w is not None:
                params["width"] = w
                acc -= 0.05 if w == 0.25 else 0
                m = m | {"test_acc": acc, "params": int(2e6 * w * w), "compression": 1 / (w * w)}
            study.add_trial(create_trial(params=params, distributions=dists, value=acc + 0.01,
                                         user_attrs={"test_acc": acc, "metrics": m,
                                                     "robust": _robust(acc)}))


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/report.db"


def test_data_steps(url: str) -> None:
    study = _search_study(url)
    _ablation_study(url)
    _ablation_study(url, sweep=True)
    trials = study.get_trials()
    h = rd.history_data(trials)
    assert h.numbers == [0, 1, 2] and h.best_so_far == [0.70, 0.74, 0.74]
    # the pruned trial is shown at its last reported value; ticks on whole trial numbers
    assert h.pruned_numbers == [3] and h.pruned_values == [0.3] and h.last_number == 3
    from kdig_study.report_figures import history_figure
    fig = history_figure(h)
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"
    assert list(fig.data[0].x) == [3] and fig.data[0].marker.color == "#bbbbbb"
    rows = rd.summary_rows(rd.summary_data(study))
    assert rows[0]["model"] == "teacher" and rows[1]["model"] == "best student (trial 1)"
    assert rows[1]["kept"] == pytest.approx(0.73 / 0.80)
    assert rows[1]["bn"] == 128 and rows[1]["bn_median_ms"] == 48.0
    pair = rd.pair_data(trials, "temperature", "alpha")
    assert len(pair["x"]) == 3 and pair["value"] == [0.70, 0.74, 0.72]
    curves = rd.intermediate_data(trials)
    assert [c["state"] for c in curves] == ["complete"] * 3 + ["pruned"]
    assert curves[-1]["epochs"] == [1]
    imp, why = rd.importance_data(study)
    assert imp and set(imp) <= set(SPACE) and abs(sum(imp.values()) - 1) < 1e-6
    from kdig_study.report_figures import intermediate_figure
    axis = intermediate_figure(curves).layout.xaxis  # whole epochs only, never 1.5
    assert axis.dtick == 1 and axis.tickformat == "d"
    ab = rd.ablation_data(storage_of(study), "kd_ig-cpu")
    summ = {s["condition"]: s for s in ab.analysis["test_acc"]["summaries"]}
    assert summ["KD"]["mean"] == pytest.approx(0.755) and summ["KD"]["n"] == 2
    assert ab.points["test_acc"]["KD+IG"] == {0: 0.76, 1: 0.78}
    sweep = rd.sweep_data(storage_of(study), "kd_ig-cpu")
    r = next(r for r in sweep["rows"] if r["value"] == 0.25 and r["condition"] == "KD")
    assert r["test_acc"] == pytest.approx(0.705) and r["compression"] == pytest.approx(16.0)
    rob = rd.robustness_data(storage_of(study), "kd_ig-cpu", study)
    assert rob.corruptions == ["jpeg", "gaussian_noise"]
    assert rob.by_condition["KD"]["robust"] == pytest.approx(0.655)
    assert rob.by_condition["KD"]["jpeg"] == pytest.approx(0.705) and len(rob.points) == 8
    assert rd.pareto_data(study) is None
    split = ab.by_family
    assert split is not None and set(split["families"]) == {"jpeg", "gaussian_noise"}
    kd = next(r for r in split["comparisons"] if r["name"] == "KD - student")
    assert set(kd["families"]) == {"jpeg", "gaussian_noise"}
    ref = {r["condition"]: r for r in rd.reference_rows(ab)}
    assert ref["KD+IG"]["paper_mean"] == 92.02 and ref["KD+IG"]["ours_mean"] == pytest.approx(77.0)
    assert ref["AT"]["ours_mean"] is None and ref["AT"]["ours_n"] == 0


def test_every_section_present(url: str) -> None:
    study = _search_study(url)
    _ablation_study(url)
    _ablation_study(url, sweep=True)
    page = build(storage_of(study), url, "kd_ig-cpu")
    html = render(page)
    for sid, _title in SECTIONS:
        assert f"<section id='{sid}'>" in html, sid
    assert "class=\"empty\"" not in html  # all data present: no "not yet" notes
    assert len(page.figures) == 19  # history, importance, parallel, 2 pairs, curves, timeline
    # 3 ablation (clean, corrupted, validation) each with its paired differences, the
    # corrupted comparisons by family, 2 compression, 2 robustness, reference
    assert "92.02" in html and "KD+IG - KD" in html and "effect: KD x IG" in html
    deployment = html.split("<section id='deployment'>")[1].split("</section>")[0]
    assert "ONNX Runtime int8" in deployment and "-0.50 pt clean, -1.00 pt robust" in deployment
    assert "0.60 MB" in deployment and "0.50 / 0.60 ms" in deployment
    ablation = html.split("<section id='ablation'>")[1].split("</section>")[0]
    assert "Design: best" in ablation and "Holm p" in ablation and "d_z" in ablation
    assert "<b>primary:</b> KD+IG - KD" in ablation and "student seeds 1000..1001" in ablation
    assert "TOST p" in ablation and "verdict" in ablation
    assert "Test accuracy under corruptions, by family" in ablation
    assert "<th>jpeg</th>" in ablation and "<th>gaussian_noise</th>" in ablation
    assert len(re.findall(r"<script type='text/javascript'>", html)) == 1  # plotly.js once
    assert "cdn.plot.ly" not in html.split("</head>")[1]  # no network needed


def test_gallery_shows_the_map_sources_of_the_ablation(url: str, tmp_path: Path) -> None:
    import torch

    from kdig_study.objectives import attach_gallery
    from kdig_study.overlay import source_gallery
    from kdig_study.store import artifact_store

    study = _search_study(url)
    _ablation_study(url)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    grid = source_gallery(images, {s: torch.rand(2, 32, 32) for s in ("ig", "shuffled",
                                                                    "gradcam")})
    assert grid.height > grid.width / 8  # three rows
    path = tmp_path / "g.png"
    grid.save(path)
    ablation = optuna.load_study(study_name="kd_ig-cpu.ablation", storage=url)
    attach_gallery(ablation, artifact_store(), path)
    attach_gallery(ablation, artifact_store(), path)  # once per content
    metas = optuna.artifacts.get_all_artifact_meta(ablation)
    assert [m.filename for m in metas] == ["gallery-g.png"]
    html = render(build(storage_of(study), url, "kd_ig-cpu"))
    gallery = html.split("<section id='gallery'>")[1].split("</section>")[0]
    assert "Map sources of kd_ig-cpu.ablation" in gallery and gallery.count("<img") == 2


def test_latency_measured_after_the_search_in_one_process_is_what_the_report_shows(
        url: str) -> None:
    study = _search_study(url)
    lat = {"latency_b1": {"median_ms": 0.9, "p90_ms": 1.0, "batch_size": 1, "method": "m"},
           "latency_b128": {"median_ms": 40.0, "p90_ms": 41.0, "batch_size": 128}}
    study.set_user_attr("latency", {"teacher": {k: v | {"median_ms": v["median_ms"] * 2}
                                                for k, v in lat.items()},
                                    "student": lat, "threads": 2})
    rows = rd.summary_rows(rd.summary_data(study))
    # not the per-trial figure (1.3 ms, measured inside a worker while others trained)
    assert rows[1]["b1_median_ms"] == 0.9 and rows[1]["bn_median_ms"] == 40.0
    assert rows[0]["b1_median_ms"] == 1.8 and rows[0]["bn"] == 128


def test_multi_objective_best_is_chosen_from_the_pareto_front_by_the_stated_rule(
        url: str) -> None:
    from kdig_study.objectives import BEST_RULE_PARETO, choose_best

    study = optuna.create_study(study_name="mo2", storage=url, directions=["maximize"] * 2)
    # clean-best trial 0 has poor robust accuracy; trial 2 has the best mean
    for v, r in ((0.74, 0.50), (0.72, 0.55), (0.73, 0.60), (0.70, 0.58)):
        study.add_trial(create_trial(params={}, distributions={}, values=[v, r]))
    best, rule = choose_best(study)
    assert best.number == 2 and rule == BEST_RULE_PARETO
    assert rd.summary_data(study).best["number"] == 2


def test_pareto_front_of_a_two_objective_study(url: str) -> None:
    study = optuna.create_study(study_name="mo", storage=url, directions=["maximize"] * 2)
    for v, r in ((0.70, 0.60), (0.72, 0.55), (0.65, 0.62), (0.68, 0.58)):
        study.add_trial(create_trial(params={}, distributions={}, values=[v, r]))
    p = rd.pareto_data(study)
    assert dict(zip(p["number"], p["front"], strict=True)) == {0: True, 1: True, 2: True, 3: False}


@pytest.mark.parametrize("case", ["no trials", "all pruned", "no ablation", "one trial"])
def test_empty_states_say_so(url: str, case: str) -> None:
    if case == "no trials":
        study = _search_study(url, values=(), pruned=0)
    elif case == "one trial":  # a contour of one point was an empty figure
        study = _search_study(url, values=(0.7,), pruned=0)
        html = render(build(storage_of(study), url, "kd_ig-cpu"))
        pairs = html.split("<section id='pairs'>")[1].split("</section>")[0]
        assert "No two completed trials with different values" in pairs
        return
    elif case == "all pruned":
        study = _search_study(url, values=(), pruned=3)
    else:
        study = _search_study(url)
    html = render(build(storage_of(study), url, "kd_ig-cpu"))
    ablation = html.split("<section id='ablation'>")[1].split("</section>")[0]
    assert "No ablation yet" in ablation
    history = html.split("<section id='history'>")[1].split("</section>")[0]
    if case == "no trials":
        assert "No trials yet." in history
    elif case == "all pruned":
        assert "No completed trial yet." in history
        assert "all pruned" in html.split("<section id='summary'>")[1].split("</section>")[0]
        assert "pruned trials in red" in html  # the learning curves still show them
    else:
        assert "fig-history" in history


def test_store_strings_are_escaped(url: str) -> None:
    evil = "kd<script>alert(1)</script>"
    study = _search_study(url, name=evil)
    study.set_user_attr("data", {"origin": "<img src=x onerror=alert(2)>", "train": 1,
                                 "val": 1, "test": 1})
    html = render(build(storage_of(study), url, evil))
    assert "<script>alert(1)</script>" not in html
    assert "<img src=x onerror" not in html
    assert "kd&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_cli_writes_the_page_and_pushes_figures(tmp_path: Path, url: str) -> None:
    _search_study(url)
    out = tmp_path / "out"
    proc = run_cli("report", "--study", "kd_ig", "--scale", "cpu", "--storage", url,
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "kd_ig-cpu.html").is_file()
    from optuna_dashboard._custom_plot_data import list_graph_object_ids

    study = optuna.load_study(study_name="kd_ig-cpu", storage=url)
    ids = list_graph_object_ids(storage_of(study).get_study_system_attrs(study_id(study)))
    assert {"kdig-history", "kdig-importance", "kdig-intermediate"} <= set(ids)
    assert_one_line_error(run_cli("report", "--study", "nope", "--scale", "cpu",
                                  "--storage", url), "no study 'nope-cpu'", "kd_ig-cpu")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # two Chromium starts (about 17 s)
def test_page_renders_in_headless_chromium(url: str, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (CI installs it: apt-get install -y chromium)")
    study = _search_study(url)
    _ablation_study(url)
    _ablation_study(url, sweep=True)
    page = build(storage_of(study), url, "kd_ig-cpu")
    path = tmp_path / "report.html"
    path.write_text(render(page), encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000"]
    dom = subprocess.run(flags + ["--dump-dom", path.as_uri()], capture_output=True,
                         text=True, timeout=120)
    # Nothing on the console but the software-WebGL driver's performance notes (the parallel
    # coordinates plot draws with WebGL; with no GPU Chromium reports its ReadPixels stalls).
    console = [ln for ln in dom.stderr.splitlines()
               if "CONSOLE" in ln and "GL Driver Message" not in ln]
    assert not console, console
    drawn = len(re.findall(r'class="[^"]*js-plotly-plot', dom.stdout))
    assert drawn == len(page.figures), (drawn, len(page.figures))
    assert dom.stdout.count('class="main-svg"') >= len(page.figures)
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,2400", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.005  # some ink: text and plot marks


def _sweep_study(url: str, name: str, levels: dict[str, list[float]]
                 ) -> tuple[optuna.Study, dict]:
    """An empty KD x IG sweep ablation ``name`` and its trials' distributions, with
    ``levels`` the swept keys' values."""
    dose = optuna.create_study(study_name=name, storage=url, direction="maximize")
    dose.set_user_attr("ablation", {"levels": {"kd": ["none", "kd"], "overlay": ["none", "ig"]},
                                    "analysis": {"equivalence_margin": 0.4}})
    dists = {"condition": CategoricalDistribution(list(FLAGS)),
             "replicate": IntDistribution(0, 9), "kd": CategoricalDistribution([0, 1]),
             "at": CategoricalDistribution([0, 1]),
             "overlay": CategoricalDistribution(["none", "ig"]),
             **{k: CategoricalDistribution(v) for k, v in levels.items()}}
    return dose, dists


def test_a_dose_response_sweep_gets_its_table_and_figure(url: str) -> None:
    study = _search_study(url)
    key = "ig.overlay_strength"
    dose, dists = _sweep_study(url, f"kd_ig-cpu.ablation-sweep-{key}", {key: [0.25, 0.75]})
    for level in (0.25, 0.75):
        for (cond, seed), acc in ACC.items():
            kd, ig = FLAGS[cond]
            acc = acc - (0.04 * ig if level == 0.75 else 0)  # a stronger overlay costs more
            dose.add_trial(create_trial(
                params={"condition": cond, "replicate": seed, "kd": kd, "at": 0,
                        "overlay": "ig" if ig else "none", key: level},
                distributions=dists, value=acc, user_attrs={
                    "test_acc": acc, "metrics": _metrics(acc), "robust": _robust(acc)}))
    [d] = rd.dose_response_data(storage_of(study), "kd_ig-cpu")
    assert d["key"] == key
    row = next(r for r in d["rows"] if r["value"] == 0.75 and r["condition"] == "KD+IG")
    assert row["test_acc"] == pytest.approx(0.73) and row["n"] == 2
    assert row["robust_test_acc"] == pytest.approx(0.63)
    primary = {r["value"]: r for r in d["primary"]}
    assert primary[0.25]["name"] == "KD+IG - KD" and primary[0.25]["mean"] == pytest.approx(0.015)
    assert primary[0.75]["mean"] == pytest.approx(-0.025)
    html = render(build(storage_of(study), url, "kd_ig-cpu"))
    ablation = html.split("<section id='ablation'>")[1].split("</section>")[0]
    assert f"Dose-response: {key}" in ablation and "<td>0.75</td>" in ablation


def test_two_crossed_sweeps_get_a_table_by_pair_and_a_figure_per_level(url: str) -> None:
    """ig.overlay_strength x student_train.epochs: the primary comparison at each pair, and
    a figure of accuracy against the strength at each epoch count."""
    study = _search_study(url)
    keys = ("ig.overlay_strength", "student_train.epochs")
    dose, dists = _sweep_study(url, "kd_ig-cpu.ablation-sweep-ig.overlay_strength-x-"
                                    "student_train.epochs",
                               {keys[0]: [0.25, 0.75], keys[1]: [8, 32]})
    for strength in (0.25, 0.75):
        for epochs in (8, 32):
            for (cond, seed), acc in ACC.items():
                kd, ig = FLAGS[cond]
                # the overlay costs more when strong, and less when trained longer
                acc = acc - ig * (0.04 if strength == 0.75 else 0) * (0.5 if epochs == 32 else 1)
                dose.add_trial(create_trial(
                    params={"condition": cond, "replicate": seed, "kd": kd, "at": 0,
                            "overlay": "ig" if ig else "none", keys[0]: strength,
                            keys[1]: epochs},
                    distributions=dists, value=acc, user_attrs={
                        "test_acc": acc, "metrics": _metrics(acc), "robust": _robust(acc)}))
    [d] = rd.dose_response_data(storage_of(study), "kd_ig-cpu")
    assert d["keys"] == list(keys)
    primary = {tuple(r["level"]): r for r in d["primary"]}
    assert set(primary) == {(s, e) for s in (0.25, 0.75) for e in (8, 32)}
    assert primary[(0.25, 8)]["mean"] == pytest.approx(0.015)
    assert primary[(0.75, 8)]["mean"] == pytest.approx(-0.025)
    assert primary[(0.75, 32)]["mean"] == pytest.approx(-0.005)
    row = next(r for r in d["rows"] if r["level"] == [0.75, 32] and r["condition"] == "KD+IG")
    assert row["facet"] == "student_train.epochs=32" and row["test_acc"] == pytest.approx(0.75)
    html = render(build(storage_of(study), url, "kd_ig-cpu"))
    ablation = html.split("<section id='ablation'>")[1].split("</section>")[0]
    assert "Dose-response: ig.overlay_strength x student_train.epochs" in ablation
    assert "<th>ig.overlay_strength</th><th>student_train.epochs</th>" in ablation
    assert "at student_train.epochs=8" in ablation and "at student_train.epochs=32" in ablation
    # the second key's levels in numeric order (8 before 32), not as strings
    assert ablation.index("at student_train.epochs=8") < \
        ablation.index("at student_train.epochs=32")


def test_a_kd_methods_ablation_gets_its_section_through_the_cli(url: str, tmp_path: Path
                                                                ) -> None:
    """An ablation of kd=none|hinton|dkd, ig under its own name (--study-name), shown with
    --ablation: each method's accuracy, its difference from the first and IG's effect."""
    study = _search_study(url)
    name = "kd_ig-cpu.kd-methods"
    ab = optuna.create_study(study_name=name, storage=url, direction="maximize")
    ab.set_user_attr("ablation", {"levels": {"kd": ["none", "hinton", "dkd"],
                                             "overlay": ["none", "ig"]},
                                  "analysis": {"equivalence_margin": 0.4}})
    conds = {"student": (0, "none"), "Hinton": ("hinton", "none"), "DKD": ("dkd", "none"),
             "IG": (0, "ig"), "Hinton+IG": ("hinton", "ig"), "DKD+IG": ("dkd", "ig")}
    dists = {"condition": CategoricalDistribution(list(conds)),
             "replicate": IntDistribution(0, 9),
             "kd": CategoricalDistribution([0, "hinton", "dkd"]),
             "at": CategoricalDistribution([0, 1]),
             "overlay": CategoricalDistribution(["none", "ig"])}
    # DKD 2 points above Hinton; the overlay costs Hinton 1 point and DKD nothing
    base = {"student": 0.70, "Hinton": 0.72, "DKD": 0.74, "IG": 0.69, "Hinton+IG": 0.71,
            "DKD+IG": 0.74}
    for cond, (kd, overlay) in conds.items():
        for seed in range(3):
            acc = base[cond] + 0.01 * seed + (0.002 * seed if cond == "DKD" else 0)
            ab.add_trial(create_trial(
                params={"condition": cond, "replicate": seed, "kd": kd, "at": 0,
                        "overlay": overlay}, distributions=dists, value=acc,
                user_attrs={"test_acc": acc, "metrics": _metrics(acc),
                            "robust": _robust(acc)}))
    data = rd.ablation_data(storage_of(study), "kd_ig-cpu", study_name=name)
    rows = {r["name"]: r for r in rd.kd_methods_data(data)}
    assert list(rows) == ["Hinton", "DKD"]
    assert rows["DKD"]["test_acc"] == pytest.approx(0.752)
    assert rows["DKD"]["vs_first"]["test_acc"]["mean"] == pytest.approx(0.022)
    assert rows["Hinton"]["ig"]["test_acc"]["mean"] == pytest.approx(-0.01)
    assert rows["Hinton"]["vs_first"]["test_acc"] is None
    _ablation_study(url)  # the plain kd factor: no section of its own
    assert rd.kd_methods_data(rd.ablation_data(storage_of(study), "kd_ig-cpu")) == []
    proc = run_cli("report", "--study", "kd_ig", "--scale", "cpu", "--storage", url,
                   "--out", str(tmp_path), "--no-dashboard", "--ablation", name)
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "kd_ig-cpu.html").read_text()
    section = html.split("<section id='ablation'>")[1].split("</section>")[0]
    assert "<h3>KD methods</h3>" in section and f"<code>{name}</code>" in section
    assert "+2.20 pt" in section and "-1.00 pt" in section
    bad = run_cli("report", "--study", "kd_ig", "--scale", "cpu", "--storage", url,
                  "--out", str(tmp_path), "--no-dashboard", "--ablation", "nope")
    assert_one_line_error(bad, "--ablation nope", "no ablation study")


def test_search_figures_are_optunas_with_the_evaluator_named(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importances come from PED-ANOVA named explicitly: an Optuna whose default evaluator
    changed (simulated: the default swapped for mean decrease in impurity) must not change
    the report's figure."""
    import optuna.importance

    from kdig_study import report_figures as rf

    study = _search_study(url)
    explicit = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    class Uniform(optuna.importance.BaseImportanceEvaluator):
        def evaluate(self, study, params=None, *, target=None):  # type: ignore[no-untyped-def]
            names = sorted({k for t in study.get_trials() for k in t.params})
            return {k: 1 / len(names) for k in names}

    monkeypatch.setattr(optuna.importance, "PedAnovaImportanceEvaluator", Uniform)
    assert optuna.importance.get_param_importances(study) != explicit  # the default moved
    imp, _ = rd.importance_data(study)
    assert imp == explicit
    bars = rf.importance_figure(study).data[0]
    assert dict(zip(bars.y, bars.x, strict=True)) == pytest.approx(explicit)
    # Optuna's own figures: contour on the search space's log axes, the timeline
    contour = rf.pair_figure(study, "temperature", "alpha")
    assert contour.layout.xaxis.type == "log" and contour.layout.yaxis.type == "log"
    assert rf.timeline_figure(study).layout.title.text == "Timeline of the trials"
    par = rf.parallel_figure(study)  # one line per completed trial, an axis per parameter
    assert list(par.layout.xaxis.ticktext) == ["validation accuracy", *sorted(SPACE)]
    assert sum(d.mode == "lines" for d in par.data) == 3

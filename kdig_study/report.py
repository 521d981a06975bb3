"""A self-contained HTML report of a study (and its ablation and sweep), for offline reading.

    python -m kdig_study.report --study kd_ig --scale cpu
    python -m kdig_study.report --study kd_ig --storage postgresql+psycopg://host/db --out reports/

Writes reports/<study>-<scale>.html with plotly.js inlined (it opens with no network), and
pushes the same figures to optuna-dashboard beside the study.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdig_study import formats
from kdig_study.cli import Parser, default_scale, run
from kdig_study.config import SCALES, method_name
from kdig_study.errors import KdigError
from kdig_study.paths import atomic_write, safe_name

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

    from kdig_study import report_data as rd

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary: teacher and best student"),
    ("history", "Optimisation history"),
    ("importance", "Parameter importances"),
    ("parallel", "Parallel coordinates"),
    ("pairs", "Temperature x alpha, overlay strength x probability"),
    ("intermediate", "Learning curves and pruning"),
    ("timeline", "Timeline of the trials"),
    ("ablation", "Ablation"),
    ("compression", "Accuracy against compression and latency"),
    ("robustness", "Robustness under distribution shift"),
    ("deployment", "Deployment: ONNX Runtime fp32 and int8"),
    ("gallery", "Map gallery: images, maps, overlays (one row per map source)"),
    ("reference", "The reference paper beside this study"),
)


@dataclass
class Page:
    title: str
    intro: str
    sections: dict[str, list[str]] = field(default_factory=dict)  # id -> HTML fragments
    figures: dict[str, go.Figure] = field(default_factory=dict)  # id -> figure

    def add(self, sid: str, fragment: str) -> None:
        self.sections.setdefault(sid, []).append(fragment)

    def figure(self, sid: str, key: str, fig: go.Figure) -> None:
        self.figures[key] = fig
        self.add(sid, fig.to_html(full_html=False, include_plotlyjs=False,
                                  div_id=f"fig-{key}", config={"displaylogo": False}))

    def empty(self, sid: str, why: str) -> None:
        self.add(sid, f'<p class="empty">{html.escape(why)}</p>')


def _e(x: object) -> str:
    return html.escape(str(x))


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: Any, fmt: str = "{:,}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _summary(page: Page, s: rd.StudySummary) -> None:
    from kdig_study import report_data as rd

    rows = rd.summary_rows(s)
    states = ", ".join(f"{v} {k}" for k, v in sorted(s.states.items())) or "no trials yet"
    page.add("summary", f"<p>Trials: {_e(states)}.</p>")
    if not rows:
        page.empty("summary", "No teacher recorded and no completed trial yet: run "
                              "`python -m kdig_study.optimize` for this study.")
        return
    if s.best is None:
        page.empty("summary", "No completed trial yet (all pruned, failed or running): "
                              "the best student appears here once a trial completes.")
    page.add("summary", _table(
        ["model", "val acc", "test acc", "test acc kept", "parameters", "compression",
         "MFLOPs/image", "latency b1 median / p90", "latency bN median / p90"],
        [[_e(r["model"]), _pct(r["val_acc"]), _pct(r["test_acc"]), _pct(r["kept"]),
          _num(r["params"]), _num(r["compression"], "{:.2f}x"),
          _num(None if r["flops"] is None else r["flops"] / 1e6, "{:.1f}"),
          f"{_num(r['b1_median_ms'], '{:.2f}')} / {_num(r['b1_p90_ms'], '{:.2f}')} ms",
          f"{_num(r['bn_median_ms'], '{:.1f}')} / {_num(r['bn_p90_ms'], '{:.1f}')} ms"
          f" (N={_num(r['bn'])})"] for r in rows]))
    if rows and rows[0]["method"]:
        page.add("summary", f"<p class='note'>Latency: {_e(rows[0]['method'])}.</p>")


def _search(page: Page, study: optuna.Study) -> None:
    from kdig_study import report_data as rd
    from kdig_study import report_figures as rf

    trials = study.get_trials(deepcopy=False)
    h = rd.history_data(trials)
    if h.numbers:
        page.figure("history", "history", rf.history_figure(h))
    else:
        page.empty("history", "No completed trial yet." if trials else "No trials yet.")
    why = rd.importance_unavailable(study)  # (the figure computes the importances)
    if why is None:
        page.figure("importance", "importance", rf.importance_figure(study))
    else:
        page.empty("importance", f"Parameter importances: {why}.")
    if any(t.params for t in rd.finished(trials)):
        page.figure("parallel", "parallel", rf.parallel_figure(study))
    else:
        page.empty("parallel", "No completed trial with parameters yet.")
    any_pair = False
    for x, y in (("temperature", "alpha"), ("overlay_strength", "overlay_prob")):
        data = rd.pair_data(trials, x, y)
        # a contour needs two values on each axis (one trial drew an empty figure)
        if data and len(set(data["x"])) > 1 and len(set(data["y"])) > 1:
            any_pair = True
            page.figure("pairs", f"pair-{x}-{y}", rf.pair_figure(study, x, y))
    if not any_pair:
        page.empty("pairs", "No two completed trials with different values of these "
                            "parameter pairs yet.")
    curves = rd.intermediate_data(trials)
    if curves:
        page.figure("intermediate", "intermediate", rf.intermediate_figure(curves))
    else:
        page.empty("intermediate", "No trial has reported an epoch yet.")
    if trials:
        page.figure("timeline", "timeline", rf.timeline_figure(study))
    else:
        page.empty("timeline", "No trials yet.")


def _ablation(page: Page, ab: rd.Ablation | None) -> None:
    from kdig_study import report_figures as rf
    from kdig_study.stats import verdict_text

    if ab is None:
        page.empty("ablation", "No ablation yet: run `python -m kdig_study.ablate` for this "
                               "study.")
        return
    factors = "; ".join(f"{f}: {' | '.join(v)}" for f, v in ab.factors.items())
    if ab.controls:
        factors += f"; controls, with KD only: {', '.join(ab.controls)}"
    distinct = {repr(p) for p in ab.params.values()}
    params = (f"<code>{_e(next(iter(ab.params.values())))}</code> for every condition"
              if len(distinct) == 1 else
              "; ".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in ab.params.items()))
    seeds = sorted(ab.seeds.values())
    page.add("ablation", f"<p>Study <code>{_e(ab.name)}</code>, factors {_e(factors)}; "
                         f"paired by replicate"
                         + (f" (student seeds {seeds[0]}..{seeds[-1]}, none used by the "
                            f"search)" if seeds else "") + ".</p>"
                         f"<p><b>Design: {_e(ab.design or 'best (recorded before designs)')}"
                         f"</b>{': ' + _e(ab.design_text) if ab.design_text else ''}. "
                         f"Parameters: {params}.</p>")
    for metric, label in (("test_acc", "test accuracy"),
                          ("robust_test_acc", "test accuracy under corruptions"),
                          ("val_acc", "validation accuracy")):
        if metric not in ab.analysis:
            continue
        a = ab.analysis[metric]
        page.add("ablation", f"<h3>{_e(label.capitalize())}</h3>")
        page.add("ablation", _table(
            ["condition", "n", "mean +- sd", "min", "max"],
            [[_e(s["condition"]), str(s["n"]),
              f"{_pct(s['mean'])} +- {_pct(s['sd'] if s['n'] > 1 else None)}",
              _pct(s["min"] if s["n"] else None), _pct(s["max"] if s["n"] else None)]
             for s in a["summaries"]]))
        rows = a["comparisons"] + a["effects"]
        pval = formats.p_value

        page.add("ablation", _table(
            ["comparison (paired) / effect", "n", "mean", "95% CI", "t-test p", "Holm p",
             "Wilcoxon p", "Holm p", "TOST p", "Holm p", "d_z", "min. detectable",
             "verdict"],
            [[("<b>primary:</b> " if r["primary"] else "")
              + _e(r["name"] if r["kind"] == "comparison" else f"effect: {r['name']}"),
              str(r["n"]), _signed(r["mean"]),
              f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]", pval(r["t_p"]),
              pval(r["t_p_holm"]), pval(r["wilcoxon_p"]), pval(r["wilcoxon_p_holm"]),
              pval(r["tost_p"]), pval(r["tost_p_holm"]),
              formats.number(r["d_z"]), _signed(r["mde"]), _e(verdict_text(r))]
             for r in rows]))
        alpha, margin = a["alpha"], a["equivalence_margin"]
        notes = [f"Holm: {a.get('correction', '')}.",
                 f"Min. detectable: the smallest true difference the paired t-test detects "
                 f"with 80% power at the row's Holm level (alpha {alpha:g} in all) with this "
                 f"n and sd. TOST: two one-sided t-tests against +-{100 * margin:.2f} points "
                 f"(the declared equivalence margin). Verdicts come from these numbers: "
                 f"better or worse where the Holm t-test p < {alpha:g}, equivalent where the "
                 f"Holm TOST p < {alpha:g}, else inconclusive, with the replicates each test "
                 f"would need at 80% power; a large p-value alone is never equivalence."]
        if any(r.get("wilcoxon_note") for r in rows):
            notes.append(next(r["wilcoxon_note"] for r in rows if r.get("wilcoxon_note")) + ".")
        page.add("ablation", f"<p class='note'>{_e(' '.join(notes))}</p>")
        page.figure("ablation", f"ablation-{metric}", rf.ablation_figure(ab, metric, label))
        page.figure("ablation", f"ablation-diff-{metric}", rf.comparison_figure(a, label))
        if metric == "robust_test_acc" and ab.by_family is not None:
            _families(page, ab.by_family)
    _kd_methods(page, ab)


def _kd_methods(page: Page, ab: rd.Ablation) -> None:
    """The KD methods compared (a kd factor of several levels), clean and robust, with the
    overlay's effect with each."""
    from kdig_study import report_data as rd
    from kdig_study import report_figures as rf
    from kdig_study.stats import verdict_text

    rows = rd.kd_methods_data(ab)
    if not rows:
        return

    def diff(r: dict[str, Any] | None) -> str:
        return "n/a" if r is None else f"{_signed(r['mean'])} ({_e(verdict_text(r))})"

    first = rows[0]["name"]
    page.add("ablation", "<h3>KD methods</h3>")
    page.add("ablation", _table(
        ["method", "test acc.", f"vs {_e(first)}", "+ IG overlay: test acc.",
         "IG's effect (paired)", "under corruptions", "+ IG", "IG's effect (paired)"],
        [[_e(r["name"]), _pct(r["test_acc"]), diff(r["vs_first"]["test_acc"])
          if r["name"] != first else "", _pct(r["test_acc_ig"]), diff(r["ig"]["test_acc"]),
          _pct(r["robust_test_acc"]), _pct(r["robust_test_acc_ig"]),
          diff(r["ig"]["robust_test_acc"])] for r in rows]))
    page.add("ablation", "<p class='note'>Every method at the ablation's parameters (the "
                         "design above); differences are paired by replicate, Holm-adjusted "
                         "with the ablation's other rows, verdicts as in the tables above.</p>")
    page.figure("ablation", "kd-methods", rf.kd_methods_figure(rows))


def _families(page: Page, split: dict[str, Any]) -> None:
    """The robust comparisons under each corruption family, and the family carrying one."""
    from kdig_study import report_figures as rf
    from kdig_study.stats import verdict_text

    families = list(split["families"])
    page.add("ablation", "<h3>Test accuracy under corruptions, by family</h3>")
    page.add("ablation", _table(
        ["comparison (paired)", "all families", *families],
        [[_e(r["name"]), f"{_signed(r['mean'])} ({_e(r['verdict'])})",
          *(f"{_signed(c['mean'])} ({_e(verdict_text(c))})" for c in r["families"].values())]
         for r in split["comparisons"]]))
    carried = [f"{r['name']}: {c['family']} carries {c['share']:.0%} of the "
               f"{_signed(r['mean'])} (there {_signed(c['family_mean'])}; the other families "
               f"{_signed(c['rest_mean'])} on average)."
               for r in split["comparisons"] if (c := r["carried_by"]) is not None]
    page.add("ablation", "<p class='note'>" + _e(
        "Each family's rows are Holm-adjusted within that family. " + " ".join(carried))
        + "</p>")
    page.figure("ablation", "ablation-families", rf.family_figure(split))


def _dose_response(page: Page, sweeps: list[dict[str, Any]]) -> None:
    """Each swept study key: accuracy per condition at each level, and the declared primary
    comparison's difference and verdict per level."""
    from kdig_study import report_figures as rf

    for d in sweeps:
        keys = d["keys"]
        page.add("ablation", f"<h3>Dose-response: {_e(' x '.join(keys))} "
                             f"(<code>{_e(d['study'])}</code>)</h3>")
        if d["primary"]:
            page.add("ablation", _table(
                [*map(_e, keys), "primary comparison", "n", "mean", "95% CI", "verdict"],
                [[*(f"{v:g}" for v in r["level"]), _e(r["name"]), str(r["n"]),
                  _signed(r["mean"]), f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]",
                  _e(r["verdict"])] for r in d["primary"]]))
        # crossed: one figure per level of the second key (in its numeric order), the
        # first on the x axis
        facets = dict(sorted({tuple(r["level"][1:]): r["facet"] for r in d["rows"]}.items()))
        for i, facet in enumerate(facets.values()):
            name = f"dose-{keys[0]}" if len(keys) == 1 else f"dose-{'-x-'.join(keys)}-{i}"
            page.figure("ablation", name, rf.dose_figure(d, facet))


def _signed(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:+.2f} pt"


def _compression(page: Page, sweep: dict | None, teacher: dict | None) -> None:
    from kdig_study import report_figures as rf

    if sweep is None:
        page.empty("compression", "No compression sweep yet: run `python -m kdig_study.ablate "
                                  "--sweep width=...` (or drop_blocks=... for MobileNetV2).")
        return
    for i, fig in enumerate(rf.compression_figures(sweep, teacher)):
        page.figure("compression", f"compression-{i}", fig)
    page.add("compression", _table(
        [sweep["key"], "condition", "n", "test acc", "parameters", "compression", "MFLOPs",
         "latency b1, ms"],
        [[f"{r['value']:g}", _e(r["condition"]), str(r["n"]), _pct(r["test_acc"]),
          _num(r["params"]), f"{r['compression']:.2f}x", f"{r['flops'] / 1e6:.1f}",
          _num(r["latency_b1_ms"], "{:.2f}")] for r in sweep["rows"]]))


def _robustness(page: Page, r: rd.Robustness | None, pareto: dict | None) -> None:
    from kdig_study import report_figures as rf

    if r is None:
        page.empty("robustness", "No run with robust accuracy yet (the corruption suite is "
                                 "off, or nothing has finished).")
    else:
        page.add("robustness", f"<p>From the {_e(r.source)}: test accuracy clean and under "
                               f"{_e(', '.join(r.corruptions))} (3 severities each, each "
                               f"setting on its own stratified slice of the test split).</p>")
        page.add("robustness", _table(
            ["condition", "n", "clean", "mean corrupted", *[c.replace("_", " ")
                                                             for c in r.corruptions]],
            [[_e(k), str(v["n"]), _pct(v["clean"]), _pct(v["robust"]),
              *[_pct(v[c]) for c in r.corruptions]] for k, v in r.by_condition.items()]))
        for i, fig in enumerate(rf.robustness_figures(r)):
            page.figure("robustness", f"robustness-{i}", fig)
    if pareto is not None:
        if pareto["number"]:
            page.figure("robustness", "pareto", rf.pareto_figure(pareto))
        else:
            page.empty("robustness", "Multi-objective study: no completed trial for a Pareto "
                                     "front yet.")


def _deployment(page: Page, dep: dict[str, Any] | None) -> None:
    if not dep or not dep.get("rows"):
        page.empty("deployment", "No export yet: run `python -m kdig_study.export --study ... "
                                 "--int8` to export the best student to ONNX and int8.")
        return
    page.add("deployment", f"<p>Trial {_e(dep.get('trial'))} of <code>{_e(dep.get('study'))}"
                           f"</code>, exported to <code>{_e(dep.get('folder', ''))}</code>; "
                           f"input: {_e(dep.get('input', ''))}; {_e(dep.get('threads'))} "
                           f"threads; versions {_e(dep.get('versions', {}))}.</p>")

    def lat(r: dict[str, Any], b: str) -> str:
        return formats.latency(r.get("latency", {}).get(b))

    def delta(r: dict[str, Any]) -> str:
        if "delta_test_acc" not in r:
            return ""
        rob = r.get("delta_robust_test_acc")
        return (f"{100 * r['delta_test_acc']:+.2f} pt clean, "
                + ("n/a" if rob is None else f"{100 * rob:+.2f} pt robust"))

    page.add("deployment", _table(
        ["model", "format", "size", "test acc", "test acc, corrupted", "int8 vs fp32",
         "latency b=1 median / p90", "latency b=128 median / p90"],
        [[_e(r["model"]), _e(r["format"]),
          "-" if not r.get("bytes") else f"{r['bytes'] / 1e6:.2f} MB", _pct(r.get("test_acc")),
          _pct(r.get("robust_test_acc")), _e(delta(r)), lat(r, "b1"), lat(r, "b128")]
         for r in dep["rows"]]))


def _embed_png(page: Page, artifact_id: str, caption: str) -> bool:
    """An artifact PNG inlined into the gallery; False (and a note) if unreadable."""
    from optuna.artifacts import download_artifact

    from kdig_study.store import artifact_store

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        try:
            download_artifact(artifact_store=artifact_store(), file_path=str(path),
                              artifact_id=artifact_id)
        except Exception as e:  # an artifact store that lives on another machine
            page.empty("gallery", f"{caption}: in the store, but its file could not be read "
                                  f"({e}).")
            return False
        data = base64.b64encode(path.read_bytes()).decode()
    page.add("gallery", f"<p>{_e(caption)}.</p><img class='gallery' alt='{_e(caption)}' "
                        f"src='data:image/png;base64,{data}'>")
    return True


def _gallery(page: Page, study: optuna.Study, storage: Any) -> None:
    from optuna.artifacts import get_all_artifact_meta

    from kdig_study import report_data as rd
    from kdig_study.ablation import ablation_study_name

    found = False
    ablation = rd._load(storage, ablation_study_name(study.study_name))
    for holder in [s for s in (ablation, study) if s is not None]:
        galleries = [m for m in get_all_artifact_meta(holder, storage=storage)
                     if m.filename.startswith("gallery-") and m.filename.endswith(".png")]
        if galleries:
            found = _embed_png(page, galleries[-1].artifact_id,
                               f"Map sources of {holder.study_name}, one row each: per "
                               f"training image, the image, its map and the overlay") or found
            break
    done = rd.finished(study.get_trials(deepcopy=False))
    for t in sorted(done, key=lambda t: -t.values[0]):  # type: ignore[operator]
        pngs = [m for m in get_all_artifact_meta(t, storage=storage)
                if m.filename.endswith(".png")]
        if pngs:
            found = _embed_png(page, pngs[0].artifact_id,
                               f"Trial {t.number}: per row, a training image, its teacher "
                               f"map ({t.user_attrs.get('metrics', {}).get('source', 'ig')}), "
                               f"and the overlay") or found
            break
    if not found:
        page.empty("gallery", "No map preview among the completed trials (no overlay method, "
                              "or no completed trial yet), and no map-source gallery.")


def _reference(page: Page, ab: rd.Ablation | None, s: rd.StudySummary, dataset: str) -> None:
    from kdig_study import report_data as rd
    from kdig_study import report_figures as rf

    if dataset not in ("cifar10", "synthetic"):
        # the paper's numbers are CIFAR-10 test accuracies: beside another data set they
        # would invite a comparison that means nothing
        page.empty("reference", f"The reference paper's numbers are CIFAR-10's; this "
                                f"study's data set is {dataset} ({s.data.get('classes', '?')} "
                                f"classes): nothing to compare.")
        return
    rows = rd.reference_rows(ab)
    page.add("reference", f"<p>Paper: {_e(rd.PAPER_SETUP)}. This study: scale "
                          f"<b>{_e(s.scale)}</b>, data <code>{_e(s.data.get('origin', '?'))}"
                          f"</code>. Different data copy, models and budget: compare "
                          f"differences between conditions, not absolute numbers.</p>")
    def ours(r: dict[str, Any]) -> str:
        if r["ours_mean"] is None:
            return "n/a"
        sd = "n/a" if r["ours_sd"] is None else f"{r['ours_sd']:.2f}"
        return f"{r['ours_mean']:.2f} +- {sd}"

    page.add("reference", _table(
        ["condition", "paper mean +- sd (n=10)", "ours mean +- sd", "ours n"],
        [[_e(r["condition"]), f"{r['paper_mean']:.2f} +- {r['paper_sd']:.2f}", ours(r),
          str(r["ours_n"])] for r in rows]))
    page.figure("reference", "reference", rf.reference_figure(rows))


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}td:first-child,th:first-child
{text-align:left}th{background:#f4f4f4}.empty{color:#a33;font-style:italic}.note{color:#555;
font-size:.9em}nav a{margin-right:1em}img.gallery{max-width:100%;image-rendering:pixelated}
"""


def render(page: Page) -> str:
    from plotly.offline import get_plotlyjs

    nav = " ".join(f"<a href='#{sid}'>{_e(title)}</a>" for sid, title in SECTIONS)
    body = "".join(f"<section id='{sid}'><h2>{_e(title)}</h2>"
                   f"{''.join(page.sections.get(sid, []))}</section>"
                   for sid, title in SECTIONS if sid in page.sections)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(page.title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{_e(page.title)}</h1>{page.intro}<nav>{nav}</nav>{body}</body></html>")


def build(storage: Any, url: str, name: str, ablations: tuple[str, ...] = ()) -> Page:
    """Everything in the report for the search study ``name`` (and the further ablation
    studies ``ablations``, by name)."""
    import optuna

    from kdig_study import report_data as rd

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = optuna.get_all_study_names(storage)
        raise KdigError(f"no study '{name}' in {url}" + (f"; studies there: {', '.join(known)}"
                                                         if known else "")) from None
    s = rd.summary_data(study)
    cfg = study.user_attrs.get("config", {})
    method = cfg.get("method", {})
    mode = method_name(method)
    page = Page(title=f"kdig_study report: {name}", intro=(
        f"<p>Study <code>{_e(name)}</code> ({_e(mode)}), scale <b>{_e(s.scale)}</b>, data "
        f"<code>{_e(s.data.get('origin', '?'))}</code> ({_e(s.data.get('train', '?'))} train /"
        f" {_e(s.data.get('val', '?'))} val / {_e(s.data.get('test', '?'))} test"
        + (f", {_e(s.data['classes'])} classes at {_e(s.data.get('image_size', '?'))} px"
           if "classes" in s.data else "") + "); store "
        f"<code>{_e(url)}</code>; git {_e(study.user_attrs.get('git_commit', '?'))}; "
        f"generated {datetime.datetime.now():%Y-%m-%d %H:%M}.</p>"))
    _summary(page, s)
    _search(page, study)
    ab = rd.ablation_data(storage, name)
    _ablation(page, ab)
    for other in ablations:
        more = rd.ablation_data(storage, name, study_name=other)
        if more is None:
            raise KdigError(f"--ablation {other}: no ablation study of that name with "
                            f"finished runs in {url}")
        _ablation(page, more)
    _dose_response(page, rd.dose_response_data(storage, name))
    _compression(page, rd.sweep_data(storage, name), s.teacher)
    _robustness(page, rd.robustness_data(storage, name, study), rd.pareto_data(study))
    _deployment(page, study.user_attrs.get("deployment"))
    _gallery(page, study, storage)
    _reference(page, ab, s, cfg.get("data", {}).get("dataset", "cifar10"))
    return page


def push_to_dashboard(study: optuna.Study, page: Page) -> int:
    from optuna_dashboard import save_plotly_graph_object

    for key, fig in page.figures.items():
        save_plotly_graph_object(study, fig, graph_object_id=f"kdig-{key}")
    return len(page.figures)


def main() -> int:
    p = Parser(prog="python -m kdig_study.report", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study name (e.g. kd_ig)")
    p.add_argument("--scale", default=None, help=f"{' | '.join(SCALES)} (default: cpu, or "
                                                 f"paper with a GPU)")
    p.add_argument("--study-name", default=None, help="default: <study>-<scale>")
    p.add_argument("--storage", default=None, help="default: sqlite:///storage/kdig.db")
    p.add_argument("--out", default="reports", help="output folder")
    p.add_argument("--ablation", action="append", default=[], metavar="STUDY",
                   help="a further ablation study to show (e.g. one run with --study-name); "
                        "repeatable")
    p.add_argument("--no-dashboard", action="store_true",
                   help="do not push the figures to optuna-dashboard")
    args = p.parse_args()
    scale = args.scale or default_scale()
    if scale not in SCALES:
        raise KdigError(f"unknown scale '{scale}'; allowed: {', '.join(SCALES)}")
    import optuna

    from kdig_study.store import default_url, open_storage, quiet_optuna_logs

    quiet_optuna_logs()
    url = args.storage or default_url()
    # --no-dashboard only reads: a store on a read-only disk (or shared read-only) works
    storage = open_storage(url, read_only=args.no_dashboard and url.startswith("sqlite"),
                           existing=True)
    name = args.study_name or f"{Path(args.study).stem}-{scale}"
    page = build(storage, url, name, tuple(args.ablation))
    out = Path(args.out) / f"{safe_name(name)}.html"
    text = render(page)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"report: {out} ({len(text) / 1e6:.1f} MB, {len(page.figures)} figures)")
    if not args.no_dashboard:
        n = push_to_dashboard(optuna.load_study(study_name=name, storage=storage), page)
        print(f"pushed {n} figures to optuna-dashboard (study '{name}')")
    return 0


if __name__ == "__main__":
    run(main)

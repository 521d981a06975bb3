"""Plotly figures from the report's data structures (kdig_study.report_data).

Text that comes from the store (parameter names, condition names) is HTML-escaped before
it reaches a figure: Plotly renders titles and labels as HTML.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

import optuna
import optuna.visualization as vis
import plotly.colors as pcolors
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from kdig_study.report_data import (
    Ablation,
    History,
    Robustness,
    importance_evaluator,
    importance_target,
)

_LAYOUT = dict(template="plotly_white", height=420, margin=dict(l=60, r=20, t=50, b=50))
_COLORS = {"student": "#7f7f7f", "KD": "#1f77b4", "IG": "#2ca02c", "KD+IG": "#d62728",
           "AT": "#9467bd", "KD+AT": "#8c564b", "IG+AT": "#e377c2", "KD+IG+AT": "#bcbd22"}


def _e(text: object) -> str:
    return html.escape(str(text))


def history_figure(h: History) -> go.Figure:
    fig = go.Figure([
        go.Scatter(x=h.pruned_numbers, y=h.pruned_values, mode="markers",
                   marker=dict(color="#bbbbbb", size=8),
                   name="pruned (last reported epoch)"),
        go.Scatter(x=h.numbers, y=h.values, mode="markers", name="completed trial",
                   marker=dict(size=9)),
        go.Scatter(x=h.numbers, y=h.best_so_far, mode="lines", name="best so far"),
    ])
    # trial numbers are integers: ticks on whole numbers only (no 0.5, 1.5)
    step = max(1, math.ceil((h.last_number + 1) / 12))
    fig.update_xaxes(tick0=0, dtick=step, tickformat="d")
    return fig.update_layout(title="Optimisation history", xaxis_title="trial",
                             yaxis_title="validation accuracy", **_LAYOUT)


# The search figures Optuna draws itself (optuna.visualization) are taken from it: the same
# figures as optuna-dashboard's. Validation accuracy, the first objective, is the target of
# a multi-objective study's figures.
_TARGET_NAME = "validation accuracy"


def _first_objective(study: optuna.Study) -> Callable[[FrozenTrial], float] | None:
    return None if len(study.directions) == 1 else lambda t: t.values[0]


def importance_figure(study: optuna.Study) -> go.Figure:
    fig = vis.plot_param_importances(study, evaluator=importance_evaluator(),
                                     target=importance_target(study),
                                     target_name=_TARGET_NAME)
    return fig.update_layout(title="Parameter importances (PED-ANOVA)", **_LAYOUT)


def parallel_figure(study: optuna.Study) -> go.Figure:
    fig = vis.plot_parallel_coordinate(study, target=_first_objective(study),
                                       target_name=_TARGET_NAME)
    return fig.update_layout(title="Parallel coordinates (completed trials)",
                             **(_LAYOUT | {"margin": dict(l=60, r=40, t=110, b=40)}))


def pair_figure(study: optuna.Study, x: str, y: str) -> go.Figure:
    """Optuna's contour of the completed trials over two parameters (log axes where the
    search space is log-scaled)."""
    fig = vis.plot_contour(study, params=[x, y], target=_first_objective(study),
                           target_name=_TARGET_NAME)
    return fig.update_layout(title=f"{_e(x)} x {_e(y)}", **_LAYOUT)


def timeline_figure(study: optuna.Study) -> go.Figure:
    """When each trial ran, in what state it ended (workers side by side)."""
    return vis.plot_timeline(study).update_layout(title="Timeline of the trials", **_LAYOUT)


def intermediate_figure(curves: list[dict]) -> go.Figure:
    fig = go.Figure()
    colors = {"complete": "#1f77b4", "pruned": "#d62728", "fail": "#7f7f7f",
              "running": "#ff7f0e"}
    shown: set[str] = set()
    for c in curves:
        fig.add_trace(go.Scatter(x=c["epochs"], y=c["values"], mode="lines+markers",
                                 line=dict(color=colors.get(c["state"], "#7f7f7f")),
                                 name=c["state"], legendgroup=c["state"],
                                 showlegend=c["state"] not in shown,
                                 hovertext=f"trial {c['number']} ({c['state']})"))
        shown.add(c["state"])
    # epochs are integers: ticks on whole epochs only (a few epochs showed 1.5, 2.5)
    last = max((max(c["epochs"]) for c in curves), default=1)
    fig.update_xaxes(tick0=0, dtick=max(1, math.ceil(last / 12)), tickformat="d")
    return fig.update_layout(title="Validation accuracy per epoch (pruned trials in red)",
                             xaxis_title="epoch", yaxis_title="validation accuracy", **_LAYOUT)


def ablation_figure(ab: Ablation, metric: str, label: str) -> go.Figure:
    summaries = ab.analysis[metric]["summaries"]
    names = [s["condition"] for s in summaries]
    fig = go.Figure(go.Bar(
        x=names, y=[100 * s["mean"] if s["n"] else None for s in summaries],
        error_y=dict(type="data", array=[100 * s["sd"] if s["n"] > 1 else 0
                                         for s in summaries]),
        marker_color=[_COLORS.get(n, "#7f7f7f") for n in names], name="mean +- sd",
        opacity=0.7))
    for name in names:
        pts = ab.points[metric].get(name, {})
        fig.add_trace(go.Scatter(x=[name] * len(pts), y=[100 * v for v in pts.values()],
                                 mode="markers", marker=dict(color="black", size=7),
                                 text=[f"replicate {s}" for s in pts], name="per replicate",
                                 legendgroup="seeds", showlegend=name == names[0]))
    lows = [100 * s["min"] for s in summaries if s["n"]]
    highs = [100 * s["max"] for s in summaries if s["n"]]
    if lows:
        pad = max(0.5, 0.2 * (max(highs) - min(lows)))
        fig.update_yaxes(range=[min(lows) - 3 * pad, max(highs) + pad])
    return fig.update_layout(title=f"Ablation: {label} (mean +- sd, points: seeds)",
                             yaxis_title=f"{label}, %", **_LAYOUT)


def kd_methods_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Each KD method's mean test accuracy alone and with the IG overlay, clean and under
    corruptions (report_data.kd_methods_data)."""
    names = [r["name"] for r in rows]
    fig = go.Figure()
    for key, label in (("test_acc", "clean"), ("test_acc_ig", "clean, + IG"),
                       ("robust_test_acc", "corrupted"), ("robust_test_acc_ig", "corrupted, + IG")):
        fig.add_trace(go.Bar(x=names, y=[None if r[key] is None else 100 * r[key] for r in rows],
                             name=label))
    return fig.update_layout(title="KD methods, alone and with the IG overlay (means)",
                             barmode="group", yaxis_title="test accuracy, %", **_LAYOUT)


def comparison_figure(analysis: dict, label: str) -> go.Figure:
    """Every paired comparison and effect with its 95% interval (points), primary first."""
    rows = sorted(analysis["comparisons"], key=lambda r: not r["primary"]) + \
        analysis["effects"]
    names = [("primary: " if r["primary"] else "") +
             (_e(r["name"]) if r["kind"] == "comparison" else f"effect: {_e(r['name'])}")
             for r in rows]
    mean = [100 * r["mean"] if r["mean"] == r["mean"] else None for r in rows]
    fig = go.Figure(go.Scatter(
        x=mean, y=names, mode="markers", marker=dict(size=9, color="#d62728"),
        error_x=dict(type="data", symmetric=False,
                     array=[100 * (r["ci_high"] - r["mean"]) if r["ci_high"] == r["ci_high"]
                            else 0 for r in rows],
                     arrayminus=[100 * (r["mean"] - r["ci_low"]) if r["ci_low"] == r["ci_low"]
                                 else 0 for r in rows]),
        name="mean difference, 95% CI"))
    fig.add_vline(x=0, line_color="#888")
    fig.update_yaxes(autorange="reversed")
    return fig.update_layout(title=f"Paired differences: {label} (points, 95% t-intervals)",
                             xaxis_title="difference, percentage points",
                             **(_LAYOUT | {"height": max(300, 40 + 28 * len(rows)),
                                          "margin": dict(l=220, r=20, t=50, b=50)}))


def family_figure(split: dict) -> go.Figure:
    """The robust comparisons' mean paired differences (points) under each corruption family,
    beside the mean over families: where a difference lives."""
    rows = split["comparisons"]
    families = list(split["families"])
    cols = ["all", *families]
    z = [[100 * r["mean"], *(100 * r["families"][f]["mean"] for f in families)] for r in rows]
    z = [[v if v == v else None for v in row] for row in z]
    top = max((abs(v) for row in z for v in row if v is not None), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=[_e(r["name"]) for r in rows], zmid=0, zmin=-top, zmax=top,
        colorscale="RdBu", text=[[f"{v:+.2f}" if v is not None else "n/a" for v in row]
                                 for row in z],
        texttemplate="%{text}", colorbar=dict(title="points")))
    fig.update_yaxes(autorange="reversed")
    return fig.update_layout(title="Paired differences under corruptions, by family (points)",
                             **(_LAYOUT | {"height": max(300, 60 + 30 * len(rows)),
                                          "margin": dict(l=220, r=20, t=50, b=50)}))


def dose_figure(d: dict, facet: str = "") -> go.Figure:
    """Mean test accuracy (solid) and under corruptions (dotted) of each condition against
    the first swept key's level, at one level of the other key of a crossed sweep
    (``facet``, e.g. "student_train.epochs=16")."""
    fig = go.Figure()
    mine = [r for r in d["rows"] if r.get("facet", "") == facet]
    conds = sorted({r["condition"] for r in mine})
    for i, cond in enumerate(conds):
        rows = sorted((r for r in mine if r["condition"] == cond), key=lambda r: r["value"])
        color = _COLORS.get(cond, pcolors.qualitative.Plotly[i % 10])
        fig.add_trace(go.Scatter(x=[r["value"] for r in rows],
                                 y=[100 * r["test_acc"] for r in rows], mode="lines+markers",
                                 name=_e(cond), line=dict(color=color)))
        if any("robust_test_acc" in r for r in rows):
            fig.add_trace(go.Scatter(
                x=[r["value"] for r in rows],
                y=[100 * r["robust_test_acc"] if "robust_test_acc" in r else None
                   for r in rows], mode="lines+markers", name=f"{_e(cond)}, corrupted",
                line=dict(color=color, dash="dot"), showlegend=True))
    return fig.update_layout(title=f"Dose-response: test accuracy against {_e(d['key'])}"
                             + (f" at {_e(facet)}" if facet else ""),
                             xaxis_title=_e(d["key"]), yaxis_title="test accuracy, %",
                             **_LAYOUT)


def compression_figures(sweep: dict, teacher: dict | None) -> list[go.Figure]:
    rows = sweep["rows"]
    figs = []
    for x_key, title, x_title, log in (
            ("compression", "Accuracy against compression", "parameters: teacher / student",
             False),
            ("latency_b1_ms", "Accuracy against latency (batch 1, CPU)", "latency, ms", False)):
        fig = go.Figure()
        for cond in sorted({r["condition"] for r in rows}):
            rs = sorted((r for r in rows if r["condition"] == cond), key=lambda r: r[x_key] or 0)
            fig.add_trace(go.Scatter(
                x=[r[x_key] for r in rs], y=[100 * r["test_acc"] for r in rs],
                error_y=dict(type="data", array=[0 if math.isnan(r["sd"]) else 100 * r["sd"]
                                                 for r in rs]),
                mode="lines+markers", name=_e(cond),
                marker=dict(color=_COLORS.get(cond, "#7f7f7f")),
                text=[f"{r['key']}={r['value']:g}: {r['params']:,} parameters" for r in rs]))
        if teacher is not None and teacher.get("test_acc") is not None:
            tx = 1.0 if x_key == "compression" else teacher.get("latency_b1", {}).get("median_ms")
            fig.add_trace(go.Scatter(x=[tx], y=[100 * teacher["test_acc"]], mode="markers",
                                     marker=dict(symbol="star", size=16, color="black"),
                                     name="teacher"))
        fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="test accuracy, %",
                          **_LAYOUT)
        if log:
            fig.update_xaxes(type="log")
        figs.append(fig)
    return figs


def reference_figure(rows: list[dict]) -> go.Figure:
    names = [r["condition"] for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["paper_mean"] for r in rows],
               error_y=dict(type="data", array=[r["paper_sd"] for r in rows]),
               name="paper (original CIFAR-10, 10 runs)"),
        go.Bar(x=names, y=[r["ours_mean"] for r in rows],
               error_y=dict(type="data", array=[r["ours_sd"] or 0 for r in rows]),
               name="ours (this study's scale and data)"),
    ])
    return fig.update_layout(title="Reference paper vs this study: test accuracy per condition",
                             yaxis_title="test accuracy, %", barmode="group", **_LAYOUT)


def robustness_figures(r: Robustness) -> list[go.Figure]:
    conds = list(r.by_condition)
    cols = ["clean", *r.corruptions]
    bars = go.Figure([go.Bar(x=[_e(c.replace("_", " ")) for c in cols],
                             y=[100 * r.by_condition[k][c] for c in cols], name=_e(k),
                             marker_color=_COLORS.get(k)) for k in conds])
    bars.update_layout(title="Test accuracy per corruption (mean over severities and runs)",
                       yaxis_title="test accuracy, %", barmode="group", **_LAYOUT)
    scatter = go.Figure([go.Scatter(
        x=[100 * p["test_acc"] for p in r.points if p["condition"] == k],
        y=[100 * p["robust_test_acc"] for p in r.points if p["condition"] == k],
        mode="markers", name=_e(k), marker=dict(size=10, color=_COLORS.get(k)),
        text=[f"run {p['run']}" for p in r.points if p["condition"] == k]) for k in conds])
    scatter.update_layout(title="Clean against corrupted test accuracy, per run",
                          xaxis_title="clean test accuracy, %",
                          yaxis_title="mean corrupted test accuracy, %", **_LAYOUT)
    return [bars, scatter]


def pareto_figure(p: dict) -> go.Figure:
    on = [i for i, f in enumerate(p["front"]) if f]
    off = [i for i, f in enumerate(p["front"]) if not f]
    fig = go.Figure([
        go.Scatter(x=[100 * p["val"][i] for i in off], y=[100 * p["robust_val"][i] for i in off],
                   mode="markers", name="trial", marker=dict(color="#aaaaaa", size=9),
                   text=[f"trial {p['number'][i]}" for i in off]),
        go.Scatter(x=[100 * p["val"][i] for i in on], y=[100 * p["robust_val"][i] for i in on],
                   mode="markers", name="Pareto front", marker=dict(color="#d62728", size=12),
                   text=[f"trial {p['number'][i]}" for i in on]),
    ])
    return fig.update_layout(title="Pareto front: validation accuracy vs robust validation "
                                   "accuracy", xaxis_title="validation accuracy, %",
                             yaxis_title="robust validation accuracy, %", **_LAYOUT)

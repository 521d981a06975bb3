"""The data behind every report figure and table, read from the study store.

Pure functions of Optuna trials and study attributes, returning plain structures (tests
check these); kdig_study.report_figures turns them into Plotly figures.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from kdig_study.ablation import (
    ablation_study_name,
    analyse_metric,
    parse_ablation_study_name,
    planned_trials,
    results_table,
    robust_by_family,
)
from kdig_study.config import SWEEP_KEYS, AnalysisConfig
from kdig_study.objectives import choose_best
from kdig_study.stats import Design, condition_name, design_from_levels
from kdig_study.sweep import Sweep

# The reference paper's ablation (docs/design.md, section 6): CIFAR-10 test accuracy, 10 runs,
# mean and sd.
PAPER_ABLATION: dict[str, tuple[float, float]] = {
    "student": (91.18, 0.31), "KD": (91.62, 0.44), "IG": (91.35, 0.32),
    "KD+IG": (92.02, 0.34), "AT": (91.16, 0.32), "KD+AT": (91.75, 0.29),
    "IG+AT": (91.46, 0.24), "KD+IG+AT": (91.86, 0.28),
}
PAPER_SETUP = ("Hernandez, Chang & Nordling, arXiv 2503.13008 (2025): original CIFAR-10, "
               "MobileNetV2 teacher (2.24 M parameters, 93.9%) and its k=5 student "
               "(0.54 M, 4.1x), 100 epochs, 10 runs per condition")


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


@dataclass
class StudySummary:
    """A search study at a glance: its trials' states, its teacher and its chosen trial."""

    scale: str
    data: dict[str, Any]
    states: dict[str, int]
    teacher: dict[str, Any] | None
    best: dict[str, Any] | None  # number, val_acc, test_acc, params, metrics, rule
    # teacher and student latency measured together after the search, in one process
    latency: dict[str, Any] | None = None


def summary_data(study: optuna.Study) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    b, rule = choose_best(study)
    best = None
    if b is not None:
        best = {"number": b.number, "val_acc": b.values[0], "params": dict(b.params),
                "metrics": dict(b.user_attrs.get("metrics", {})),
                "test_acc": b.user_attrs.get("test_acc"), "rule": rule}
    attrs = study.user_attrs
    return StudySummary(attrs.get("scale", "?"), attrs.get("data", {}), states,
                   attrs.get("teacher"), best, attrs.get("latency"))


def _latency_cells(lat: dict[str, Any]) -> dict[str, Any]:
    """b1 / bN median and p90 from a profile's latency entries."""
    b1 = lat.get("latency_b1", {})
    bn_key = next((k for k in lat if k.startswith("latency_b") and k != "latency_b1"), None)
    bn = lat.get(bn_key, {}) if bn_key else {}
    return {"b1_median_ms": b1.get("median_ms"), "b1_p90_ms": b1.get("p90_ms"),
            "bn": bn.get("batch_size"), "bn_median_ms": bn.get("median_ms"),
            "bn_p90_ms": bn.get("p90_ms"), "method": b1.get("method", "")}


def summary_rows(s: StudySummary) -> list[dict[str, Any]]:
    """Teacher and best student side by side (None where unknown). Latency: both measured
    after the search in one process (the study's ``latency`` attribute) where recorded."""
    rows = []
    t = s.teacher
    lat = s.latency or {}
    if t is not None:
        cells = _latency_cells(lat.get("teacher") or t)
        rows.append({"model": "teacher", "val_acc": t.get("val_acc"),
                     "test_acc": t.get("test_acc"), "kept": 1.0, "params": t.get("params"),
                     "compression": 1.0, "flops": t.get("flops")} | cells)
    if s.best is not None:
        m = s.best["metrics"]
        if lat.get("student"):
            cells = _latency_cells(lat["student"])
        else:
            bn_key = next((k for k in m if k.startswith("latency_b") and k.endswith("_median_ms")
                           and not k.startswith("latency_b1_")), None)
            bn_size = int(bn_key.split("_")[1][1:]) if bn_key else None
            cells = {"b1_median_ms": m.get("latency_b1_median_ms"),
                     "b1_p90_ms": m.get("latency_b1_p90_ms"), "bn": bn_size,
                     "bn_median_ms": m.get(bn_key) if bn_key else None,
                     "bn_p90_ms": m.get(f"latency_b{bn_size}_p90_ms") if bn_size else None,
                     "method": rows[0]["method"] if rows else ""}
        kept = None
        if t is not None and t.get("test_acc") and s.best["test_acc"] is not None:
            kept = s.best["test_acc"] / t["test_acc"]
        rows.append({"model": f"best student (trial {s.best['number']})",
                     "val_acc": s.best["val_acc"], "test_acc": s.best["test_acc"],
                     "kept": kept, "params": m.get("params"), "compression": m.get("compression"),
                     "flops": m.get("flops")} | cells)
    return rows


@dataclass
class History:
    numbers: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    best_so_far: list[float] = field(default_factory=list)
    # pruned trials: their number and the last validation accuracy they reported
    pruned_numbers: list[int] = field(default_factory=list)
    pruned_values: list[float] = field(default_factory=list)
    last_number: int = 0  # the highest trial number shown (for the axis)


def history_data(trials: list[FrozenTrial]) -> History:
    h = History()
    best = -math.inf
    for t in sorted(finished(trials), key=lambda t: t.number):
        best = max(best, t.values[0])  # type: ignore[type-var]
        h.numbers.append(t.number)
        h.values.append(float(t.values[0]))  # type: ignore[arg-type]
        h.best_so_far.append(float(best))
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.PRUNED and t.intermediate_values:
            h.pruned_numbers.append(t.number)
            h.pruned_values.append(float(t.intermediate_values[max(t.intermediate_values)]))
    h.last_number = max(h.numbers + h.pruned_numbers, default=0)
    return h


def importance_evaluator() -> PedAnovaImportanceEvaluator:
    """PED-ANOVA, Optuna 5's default, named here: an upgrade that changed the default must
    not change the report's figure silently."""
    return PedAnovaImportanceEvaluator()


def importance_target(study: optuna.Study) -> Callable[[FrozenTrial], float] | None:
    """None (the study's one objective, its direction) or, for a multi-objective study,
    validation accuracy, the first objective, negated: PED-ANOVA takes low targets as good."""
    return None if len(study.directions) == 1 else lambda t: -t.values[0]


def importance_unavailable(study: optuna.Study) -> str | None:
    """Why the study has no parameter importances yet, or None where it has."""
    done = finished(study.get_trials(deepcopy=False))
    if len(done) < 2:
        return f"needs at least 2 completed trials ({len(done)} so far)"
    varied = {k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1}
    return None if varied else "no parameter varied across the completed trials"


def importance_data(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """(parameter importances, "") or (None, why not)."""
    why = importance_unavailable(study)
    if why:
        return None, why
    return optuna.importance.get_param_importances(
        study, evaluator=importance_evaluator(), target=importance_target(study)), ""


def pair_data(trials: list[FrozenTrial], x: str, y: str) -> dict[str, list[float]] | None:
    """Points (x, y, objective) of completed trials that have both parameters."""
    rows = [t for t in finished(trials) if x in t.params and y in t.params]
    if not rows:
        return None
    return {"x": [float(t.params[x]) for t in rows], "y": [float(t.params[y]) for t in rows],
            "value": [float(t.values[0]) for t in rows],  # type: ignore[arg-type]
            "number": [t.number for t in rows]}


def intermediate_data(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """Per trial with reports: its epochs, validation accuracies and final state."""
    out = []
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            out.append({"number": t.number, "state": t.state.name.lower(), "epochs": steps,
                        "values": [t.intermediate_values[s] for s in steps]})
    return out


def _load(storage: Any, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


@dataclass
class Ablation:
    name: str
    factors: dict[str, list[str]]  # factor -> levels ("none" first)
    analysis: dict[str, dict[str, Any]]  # metric -> analyse() output
    points: dict[str, dict[str, dict[int, float]]]  # metric -> condition -> replicate -> value
    params: dict[str, Any]  # condition -> its parameters
    design: str = ""  # best | per-condition | fixed | file
    design_text: str = ""
    seeds: dict[str, int] = field(default_factory=dict)  # replicate -> student seed
    controls: list[str] = field(default_factory=list)  # sources run with KD on only
    by_family: dict[str, Any] | None = None  # kdig_study.stats.by_family of the robust rows


def _recorded(study: optuna.Study) -> tuple[dict[str, Any], dict[str, list[str]], Design,
                                            tuple[str, ...], AnalysisConfig, tuple[str, ...]]:
    """What an ablation study recorded of itself: its record, factor levels, design,
    controls, declared analysis and the conditions it runs (--conditions; () for all)
    (ablations made before these were recorded: the defaults)."""
    info = study.user_attrs.get("ablation", {})
    levels = info.get("levels") or {"kd": ["none", "kd"], "overlay": ["none", "ig"]}
    return (info, levels, design_from_levels(levels), tuple(info.get("controls", ())),
            AnalysisConfig(**info.get("analysis", {})), tuple(info.get("conditions", ())))


def ablation_data(storage: Any, search_name: str,
                  metrics: tuple[str, ...] = ("test_acc", "robust_test_acc", "val_acc"),
                  study_name: str | None = None) -> Ablation | None:
    """The ablation of the search ``search_name`` (or the ablation study ``study_name``)."""
    study = _load(storage, study_name or ablation_study_name(search_name))
    if study is None:
        return None
    trials = planned_trials(study.get_trials(deepcopy=False), None)
    if not trials:
        return None
    info, levels, design, controls, declared, only = _recorded(study)
    analysis, points = {}, {}
    for metric in metrics:
        table = results_table(trials, metric)
        if not table:
            continue
        analysis[metric] = analyse_metric(table, design, controls, metric, declared, only)
        points[metric] = {condition_name(c): v for c, v in table.items()}
    split = None
    if "robust_test_acc" in analysis:
        families = sorted({k for t in trials for k in t.user_attrs.get("robust", {})
                           if "-" not in k})  # "jpeg", not the severity "jpeg-2"
        split = robust_by_family(lambda m: results_table(trials, m), families, design,
                                 controls, declared, analysis["robust_test_acc"], only)
    return Ablation(study.study_name, levels, analysis, points, info.get("params", {}),
                    info.get("design", ""), info.get("design_text", ""), info.get("seeds", {}),
                    list(info.get("controls", [])), split)


def sweep_data(storage: Any, search_name: str) -> dict[str, Any] | None:
    """Mean test accuracy, compression, FLOPs and latency per (swept value, condition)."""
    for key in SWEEP_KEYS:
        study = _load(storage, ablation_study_name(search_name, sweep_key=key))
        if study is None:
            continue
        groups: dict[tuple[float, str], list[FrozenTrial]] = {}
        for t in finished(study.get_trials(deepcopy=False)):
            groups.setdefault((t.params[key], t.params["condition"]), []).append(t)
        if not groups:
            return None
        rows = []
        for (value, cond), ts in sorted(groups.items()):
            m = [t.user_attrs["metrics"] for t in ts]
            accs = [x["test_acc"] for x in m]
            rows.append({"key": key, "value": value, "condition": cond, "n": len(ts),
                         "test_acc": sum(accs) / len(accs),
                         "sd": (sum((a - sum(accs) / len(accs)) ** 2 for a in accs)
                                / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else float("nan"),
                         "params": m[0]["params"], "compression": m[0]["compression"],
                         "flops": m[0]["flops"],
                         "latency_b1_ms": m[0].get("latency_b1_median_ms")})
        return {"key": key, "rows": rows}
    return None


def dose_response_data(storage: Any, search_name: str) -> list[dict[str, Any]]:
    """Per sweep of study keys (``--sweep SECTION.KEY=...``, or two crossed): each level's
    mean test accuracy per condition (plain and under corruptions), and the declared
    primary comparison's paired difference and verdict at that level. A row's ``value`` is
    its first key's value (the figure's x), ``facet`` the other key's ("" for one key)."""
    out = []
    for name in sorted(optuna.get_all_study_names(storage)):
        parsed = parse_ablation_study_name(name)
        if parsed is None or parsed.search != search_name or parsed.sweep_key is None or \
                parsed.fraction is not None or \
                parsed.sweep_key in SWEEP_KEYS:  # a compression sweep alone: sweep_data
            continue
        study = _load(storage, name)
        sweep = Sweep.named(parsed.sweep_key)
        trials = planned_trials(study.get_trials(deepcopy=False), None, sweep) \
            if study is not None else []
        if study is None or not trials:
            continue
        _, _, design, controls, declared, only = _recorded(study)
        rows, primary = [], []
        for level in sorted({sweep.level_of(t.params) for t in trials}):
            where = {"level": list(level), "value": level[0],
                     "facet": Sweep(sweep.keys[1:]).text(level[1:])}
            for metric in ("test_acc", "robust_test_acc"):
                for cond, vals in results_table(trials, metric, sweep, level).items():
                    if metric == "test_acc":
                        rows.append(where | {"condition": condition_name(cond),
                                             "n": len(vals),
                                             "test_acc": statistics.fmean(vals.values())})
                    else:
                        row = next(r for r in rows if r["level"] == list(level) and
                                   r["condition"] == condition_name(cond))
                        row["robust_test_acc"] = statistics.fmean(vals.values())
            a = analyse_metric(results_table(trials, declared.metric, sweep, level), design,
                               controls, declared.metric, declared, only)
            p = next((r for r in a["comparisons"] if r["primary"]), None)
            if p is not None:
                primary.append(where | {"name": p["name"], "mean": p["mean"],
                                        "ci_low": p["ci_low"], "ci_high": p["ci_high"],
                                        "n": p["n"], "verdict": p["verdict"]})
        out.append({"key": sweep.keys[0], "keys": list(sweep.keys), "study": name,
                    "rows": rows, "primary": primary})
    return out


def reference_rows(ab: Ablation | None) -> list[dict[str, Any]]:
    """The paper's numbers beside ours, per condition (ours where measured)."""
    ours = {}
    if ab is not None:
        ours = {s["condition"]: s for s in ab.analysis["test_acc"]["summaries"]}
    rows = []
    for cond, (mean, sd) in PAPER_ABLATION.items():
        o = ours.get(cond)
        rows.append({"condition": cond, "paper_mean": mean, "paper_sd": sd, "paper_n": 10,
                     "ours_mean": None if o is None or not o["n"] else 100 * o["mean"],
                     "ours_sd": None if o is None or o["n"] < 2 else 100 * o["sd"],
                     "ours_n": 0 if o is None else o["n"]})
    return rows


@dataclass
class Robustness:
    source: str  # where the runs come from: the ablation, or the search's trials
    corruptions: list[str]
    by_condition: dict[str, dict[str, float]]  # condition -> {"clean", corruption..., "robust"}
    points: list[dict[str, Any]]  # condition, run, test_acc, robust_test_acc


def robustness_data(storage: Any, search_name: str, study: optuna.Study) -> Robustness | None:
    """Clean against corrupted test accuracy, per condition and corruption."""
    ab = _load(storage, ablation_study_name(search_name))
    trials = finished(ab.get_trials(deepcopy=False)) if ab is not None else []
    source = f"ablation study {ablation_study_name(search_name)}"
    if not trials:
        trials = finished(study.get_trials(deepcopy=False))
        source = f"search trials of {search_name}"
    rows = [t for t in trials if "robust_test_acc" in t.user_attrs.get("metrics", {})]
    if not rows:
        return None
    corruptions = [k for k in rows[0].user_attrs.get("robust", {}) if "-" not in k]
    groups: dict[str, list[dict[str, Any]]] = {}
    points = []
    for t in rows:
        m = t.user_attrs["metrics"] | t.user_attrs.get("robust", {})
        cond = t.params.get("condition", "search trial")
        groups.setdefault(cond, []).append(m)
        points.append({"condition": cond, "run": t.number, "test_acc": m["test_acc"],
                       "robust_test_acc": m["robust_test_acc"]})
    by_condition = {}
    for cond, ms in groups.items():
        def mean(key: str, ms: list[dict[str, Any]] = ms) -> float:
            return sum(x[key] for x in ms) / len(ms)

        by_condition[cond] = {"clean": mean("test_acc"), "robust": mean("robust_test_acc"),
                              "n": len(ms)} | {c: mean(c) for c in corruptions}
    return Robustness(source, corruptions, by_condition, points)


def pareto_data(study: optuna.Study) -> dict[str, list[Any]] | None:
    """Validation accuracy against robust validation accuracy; None for one objective."""
    if len(study.directions) < 2:
        return None
    done = finished(study.get_trials(deepcopy=False))
    front = {t.number for t in study.best_trials}
    return {"number": [t.number for t in done], "val": [t.values[0] for t in done],
            "robust_val": [t.values[1] for t in done],
            "front": [t.number in front for t in done]}


def kd_methods_data(ab: Ablation) -> list[dict[str, Any]]:
    """Where the ablation's kd factor has several methods: per method, its mean clean and
    robust accuracy, the overlay's paired effect with it (METHOD+IG - METHOD) and its
    difference from the first method, each with its verdict, from the ablation's analysis."""
    methods = [m for m in ab.factors.get("kd", []) if m != "none"]
    if len(methods) < 2:
        return []

    def row(metric: str, name: str) -> dict[str, Any] | None:
        a = ab.analysis.get(metric, {})
        return next((r for r in a.get("comparisons", []) if r["name"] == name), None)

    def mean(metric: str, cond: str) -> float | None:
        a = ab.analysis.get(metric, {})
        s = next((s for s in a.get("summaries", []) if s["condition"] == cond), None)
        return s["mean"] if s and s["n"] else None

    out = []
    for m in methods:
        name = condition_name([m])
        with_ig = condition_name([m, "ig"])
        out.append({"method": m, "name": name,
                    **{f"{metric}": mean(metric, name) for metric in ("test_acc",
                                                                     "robust_test_acc")},
                    **{f"{metric}_ig": mean(metric, with_ig) for metric in ("test_acc",
                                                                           "robust_test_acc")},
                    "ig": {metric: row(metric, f"{with_ig} - {name}")
                           for metric in ("test_acc", "robust_test_acc")},
                    "vs_first": {metric: row(metric, f"{name} - {condition_name([methods[0]])}")
                                 for metric in ("test_acc", "robust_test_acc")}})
    return out

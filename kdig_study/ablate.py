"""Ablation of a study's method: every on/off combination of its factors, over seeds.

    python -m kdig_study.ablate --study kd_ig --scale cpu --seeds 3
    python -m kdig_study.ablate --study kd_ig --factors kd,ig,at --params best.toml
    python -m kdig_study.ablate --study kd_ig --monte-carlo 5 --fraction 0.8
    python -m kdig_study.ablate --study kd_ig --sweep drop_blocks=3,5,7,9 --seeds 2

Hyperparameters: the best trial of the Optuna study (`--params best`, the default) or a
file with a [params] table. Runs live in the same store as the search, in the study
`<search study>.ablation`; a re-run skips finished runs. Statistics (paired by seed) are
printed and written as JSON and CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kdig_study.ablation import FACTORS, SWEEP_KEYS, Ablation, plan, results_table
from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.config import StudyConfig, load_params
from kdig_study.errors import KdigError
from kdig_study.experiment import Context
from kdig_study.paths import atomic_write, write_json
from kdig_study.stats import analyse
from kdig_study.store import default_url, open_storage, open_study, quiet_optuna_logs

METRICS = (("test_acc", "test accuracy"), ("robust_test_acc", "test accuracy under corruptions"),
           ("val_acc", "validation accuracy"))


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.ablate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    p.add_argument("--seeds", type=int, default=5, help="replicates per condition")
    p.add_argument("--factors", default="kd,ig", help="comma list of kd, ig, at")
    p.add_argument("--params", default="best",
                   help="'best' (the search's best trial) or a .toml file with [params]")
    p.add_argument("--storage", default=None, help="default: sqlite:///storage/kdig.db")
    p.add_argument("--from-study", default=None,
                   help="the search study for --params best (default: <study>-<scale>)")
    p.add_argument("--monte-carlo", type=int, default=0, metavar="R",
                   help="R replicates on stratified random subsets of the training set")
    p.add_argument("--fraction", type=float, default=0.8, help="subset size for --monte-carlo")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help=f"also vary the student: {' or '.join(SWEEP_KEYS)} (compression sweep)")
    p.add_argument("--study-name", default=None,
                   help="name of the ablation study (default: <search study>.ablation[...]); "
                        "e.g. a second ablation with other --params")
    p.add_argument("--out", default="reports", help="folder for the JSON and CSV results")
    p.add_argument("--heartbeat", type=int, default=60, metavar="S")
    return p


def _factors(text: str, cfg: StudyConfig) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in FACTORS]
    if bad or not names or len(set(names)) != len(names):
        raise KdigError(f"--factors {text}: unknown or repeated factor "
                        f"{', '.join(repr(b) for b in bad) or ''}; allowed: {', '.join(FACTORS)}")
    if "at" in names and cfg.teacher.arch != cfg.student.arch:
        raise KdigError("--factors with at needs teacher and student of one family")
    return [f for f in FACTORS if f in names]


def _sweep(text: str | None) -> tuple[str | None, list[float] | None]:
    if text is None:
        return None, None
    key, _, values = text.partition("=")
    try:
        nums = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        nums = []
    if key not in SWEEP_KEYS or not nums:
        raise KdigError(f"--sweep {text}: expected KEY=V1,V2,... with KEY one of "
                        f"{', '.join(SWEEP_KEYS)}")
    if key == "drop_blocks" and any(v != int(v) or v < 0 for v in nums):
        raise KdigError(f"--sweep {text}: drop_blocks values are integers >= 0")
    return key, nums


def best_params(storage: Any, name: str, url: str, cfg: StudyConfig) -> dict[str, Any]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise KdigError(f"no study '{name}' in {url}: run `python -m kdig_study.optimize "
                        f"--study {cfg.name} --scale {cfg.scale}` first, or give --params "
                        f"FILE.toml") from None
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise KdigError(f"study '{name}' in {url} has no completed trials: let "
                        f"`python -m kdig_study.optimize --study {cfg.name} --scale "
                        f"{cfg.scale}` finish some, or give --params FILE.toml")
    # the highest validation accuracy (the first objective, in a multi-objective study too)
    best = max(done, key=lambda t: t.values[0])
    print(f"parameters of trial {best.number} of '{name}' (val acc {best.values[0]:.2%}): "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in best.params.items()))
    return dict(best.params)


def _fmt(x: float, pct: bool = True, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    v = 100 * x if pct else x
    return f"{v:+.2f}" if sign else f"{v:.2f}"


def _p(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def render(analysis: dict[str, Any], title: str) -> str:
    lines = [title, f"  {'condition':<12}{'n':>3}{'mean':>8}{'sd':>7}{'min':>8}{'max':>8}"]
    for s in analysis["summaries"]:
        lines.append(f"  {s['condition']:<12}{s['n']:>3}{_fmt(s['mean']):>8}{_fmt(s['sd']):>7}"
                     f"{_fmt(s['min']):>8}{_fmt(s['max']):>8}")
    def header(name: str, mean: str) -> str:
        return f"  {name:<22}{'n':>3}{mean:>8}  {'95% CI':<17}{'t-test p':>9}{'Wilcoxon p':>12}"

    def row(name: str, r: dict[str, Any], mean: str) -> str:
        ci = f"[{_fmt(r['ci_low'], sign=True)}, {_fmt(r['ci_high'], sign=True)}]"
        return (f"  {name:<22}{r['n']:>3}{_fmt(r[mean], sign=True):>8}  {ci:<17}"
                f"{_p(r['t_p']):>9}{_p(r['wilcoxon_p']):>12}")

    lines.append(header("comparison (paired)", "diff"))
    lines += [row(f"{c['a']} - {c['b']}", c, "mean_diff") for c in analysis["comparisons"]]
    lines.append(header("effect", "mean"))
    lines += [row(e["effect"], e, "mean") for e in analysis["effects"]]
    return "\n".join(lines)


def _csv(blocks: list[tuple[str, str, dict[str, Any]]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "metric", "kind", "name", "n", "mean", "sd", "min", "max",
                "ci_low", "ci_high", "t_p", "wilcoxon_p"])
    for group, metric, a in blocks:
        for s in a["summaries"]:
            w.writerow([group, metric, "condition", s["condition"], s["n"], s["mean"], s["sd"],
                        s["min"], s["max"], "", "", "", ""])
        for c in a["comparisons"]:
            w.writerow([group, metric, "comparison", f"{c['a']} - {c['b']}", c["n"],
                        c["mean_diff"], "", "", "", c["ci_low"], c["ci_high"], c["t_p"],
                        c["wilcoxon_p"]])
        for e in a["effects"]:
            w.writerow([group, metric, "effect", e["effect"], e["n"], e["mean"], "", "", "",
                        e["ci_low"], e["ci_high"], e["t_p"], e["wilcoxon_p"]])
    return buf.getvalue()


def main() -> int:
    args = _parser().parse_args()
    cfg = load_from_args(args)
    factors = _factors(args.factors, cfg)
    sweep_key, sweep_values = _sweep(args.sweep)
    if args.seeds < 1 or args.monte_carlo < 0 or not 0 < args.fraction <= 1:
        raise KdigError("--seeds must be >= 1, --monte-carlo >= 0, 0 < --fraction <= 1")
    quiet_optuna_logs()
    url = args.storage or default_url()
    storage = open_storage(url, heartbeat_interval=args.heartbeat)
    search_name = args.from_study or f"{cfg.name}-{cfg.scale}"
    params = best_params(storage, search_name, url, cfg) if args.params == "best" \
        else load_params(args.params)
    suffix = ".ablation" + (f"-mc{args.fraction:g}" if args.monte_carlo else "") + \
        (f"-sweep-{sweep_key}" if sweep_key else "")
    name = args.study_name or search_name + suffix
    study = open_study(storage, name, cfg, optuna.samplers.RandomSampler(),
                       optuna.pruners.NopPruner(), ["maximize"], url)
    ident = {"params": params, "fraction": args.fraction if args.monte_carlo else None}
    if "ablation" in study.user_attrs and {k: study.user_attrs["ablation"].get(k)
                                           for k in ident} != ident:
        raise KdigError(f"ablation study '{name}' in {url} ran with other parameters "
                        f"({study.user_attrs['ablation']['params']}); give this one its own "
                        f"--study-name, or --params matching those")
    study.set_user_attr("ablation", ident | {"factors": factors, "sweep_key": sweep_key,
                                             "search_study": search_name})
    replicates = args.monte_carlo or args.seeds
    runs = plan(factors, list(range(replicates)), sweep_values)
    print(f"ablation '{name}': {len(runs)} runs ({2 ** len(factors)} conditions x "
          f"{replicates} {'Monte-Carlo subsets' if args.monte_carlo else 'seeds'}"
          + (f" x {len(sweep_values)} {sweep_key}" if sweep_values else "") + f"), store {url}",
          flush=True)
    ctx = Context.create(cfg, args.data_dir, args.device, progress=not args.no_progress)
    Ablation(ctx, study, params, factors, sweep_key,
             args.fraction if args.monte_carlo else None,
             poll_s=max(1.0, args.heartbeat / 2)).run(runs)

    trials = study.get_trials(deepcopy=False)
    blocks: list[tuple[str, str, dict[str, Any]]] = []
    groups = [(f"{sweep_key}={v:g}", v) for v in sweep_values] if sweep_values else [("all", None)]
    out: dict[str, Any] = {"study": name, "params": params, "factors": factors,
                           "replicates": replicates, "scale": cfg.scale, "results": {}}
    for group, value in groups:
        for metric, title in METRICS:
            table = results_table(trials, metric, sweep_key, value)
            if not table:  # e.g. robustness switched off
                continue
            a = analyse(table, factors)
            blocks.append((group, metric, a))
            out["results"].setdefault(group, {})[metric] = a
            print(render(a, f"{title}, % ({group})" if sweep_values else f"{title}, %"))
    out["runs"] = [{"number": t.number, **t.params, "val_acc": t.value,
                    **t.user_attrs.get("metrics", {}),
                    **{f"robust_test_{k}": v for k, v in t.user_attrs.get("robust", {}).items()}}
                   for t in trials if t.state == TrialState.COMPLETE]
    out_dir = Path(args.out)
    write_json(out_dir / f"{name}.json", out)
    text = _csv(blocks)
    atomic_write(out_dir / f"{name}.csv", lambda tmp: tmp.write_text(text))
    print(f"written: {out_dir / (name + '.json')}, {out_dir / (name + '.csv')}")
    return 0


if __name__ == "__main__":
    run(main)

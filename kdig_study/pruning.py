"""Is the pruner throwing winners away? Evidence from a search run without pruning.

    python -m kdig_study.optimize --study kd_ig --scale cpu --pruner none --study-name kd_ig-cpu-nopruning
    python -m kdig_study.optimize --study kd_ig --scale cpu
    python -m kdig_study.pruning --study kd_ig --scale cpu --unpruned kd_ig-cpu-nopruning

From the unpruned search: the rank correlation (Spearman, scipy) between each trial's
validation accuracy after epoch k and its final objective, for every k; the warm-up it
suggests (the first epoch whose correlation reaches --rho), checked by replaying Optuna's
pruner on those trials at every warm-up. Then, over both searches, the
best validation accuracy reached against the compute spent (the trials' own wall times,
summed in the order they finished): at equal compute, and the compute each needed to reach
the other's best. Writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdig_study.cli import Parser, default_scale, run
from kdig_study.errors import KdigError
from kdig_study.paths import safe_name, write_json

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial


def epoch_correlations(trials: list[FrozenTrial]) -> dict[int, float]:
    """{epoch k: Spearman rho between validation accuracy at k and the final objective}
    over the completed trials that reported every epoch up to k."""
    from optuna.trial import TrialState
    from scipy import stats as sps

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.intermediate_values]
    if len(done) < 3:
        return {}
    epochs = sorted({k for t in done for k in t.intermediate_values})
    out = {}
    for k in epochs:
        rows = [(t.intermediate_values[k], t.values[0]) for t in done
                if k in t.intermediate_values]
        if len(rows) >= 3:
            rho = sps.spearmanr([a for a, _ in rows], [b for _, b in rows]).statistic
            out[int(k)] = float(rho) if rho == rho else float("nan")
    return out


def suggested_warmup(rhos: dict[int, float], threshold: float) -> int | None:
    """The first epoch whose rank correlation with the final objective reaches
    ``threshold``: pruning before it compares trials on a ranking that still changes."""
    return next((k for k in sorted(rhos) if rhos[k] >= threshold), None)


def replay(trials: list[FrozenTrial], percentile: float) -> list[dict[str, Any]]:
    """Optuna's own pruner replayed on the unpruned trials (in trial order, one at a time,
    as the search ran them), for every warm-up from 1 to the last epoch but one: which
    trials it would have pruned, the epochs it would have run, and whether the best trial
    would have survived. A check on the warm-up the correlations suggest, at no compute."""
    import optuna
    from optuna.trial import TrialState

    from kdig_study.search import percentile_pruner

    done = sorted((t for t in trials if t.state == TrialState.COMPLETE
                   and t.intermediate_values), key=lambda t: t.number)
    if not done:
        return []
    best = max(done, key=lambda t: t.values[0])
    last = max(k for t in done for k in t.intermediate_values)
    epochs_unpruned = sum(len(t.intermediate_values) for t in done)
    rows = []
    for warmup in range(1, last):
        study = optuna.create_study(direction="maximize",
                                    pruner=percentile_pruner(percentile, warmup))
        pruned, epochs = [], 0
        for t in done:
            trial = study.ask()
            steps = sorted(t.intermediate_values)
            for k in steps:
                trial.report(t.intermediate_values[k], k)
                epochs += 1
                if k != steps[-1] and trial.should_prune():
                    study.tell(trial, state=TrialState.PRUNED)
                    pruned.append(t.number)
                    break
            else:
                study.tell(trial, t.values[0])
        kept = [t.values[0] for t in done if t.number not in pruned]
        rows.append({"warmup": warmup, "pruned": pruned, "epochs": epochs,
                     "epochs_unpruned": epochs_unpruned,
                     "best_survives": best.number not in pruned, "best_kept": max(kept)})
    return rows


def wall_seconds(t: FrozenTrial) -> float:
    return (t.datetime_complete - t.datetime_start).total_seconds()  # type: ignore[operator]


def epochs_run(t: FrozenTrial) -> float:
    """A trial's compute in epochs: free of what else shared the machine, unlike its wall
    time (one validation score is reported per epoch)."""
    return float(len(t.intermediate_values))


def best_by_compute(trials: list[FrozenTrial], cost: Callable[[FrozenTrial], float] = wall_seconds
                    ) -> list[tuple[float, float]]:
    """[(compute spent so far, best objective so far)] in the order trials finished, compute
    in seconds (default) or by ``cost``; a pruned trial's compute counts, its partial
    accuracy does not."""
    from optuna.trial import TrialState

    fin = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                  and t.datetime_start and t.datetime_complete),
                 key=lambda t: t.datetime_complete)
    spent, best, curve = 0.0, -math.inf, []
    for t in fin:
        spent += cost(t)
        if t.state == TrialState.COMPLETE:
            best = max(best, t.values[0])
        curve.append((spent, best))
    return curve


def best_at(curve: list[tuple[float, float]], budget: float) -> float:
    return max((b for s, b in curve if s <= budget), default=-math.inf)


def compute_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, b in curve if b >= target), None)


def compare(pruned: list[FrozenTrial], unpruned: list[FrozenTrial]) -> dict[str, Any]:
    cp, cu = best_by_compute(pruned), best_by_compute(unpruned)
    if not cp or not cu:
        raise KdigError("both searches need finished trials to compare")
    budget = min(cp[-1][0], cu[-1][0])
    return {
        "pruned": {"trials": len(cp), "compute_h": cp[-1][0] / 3600, "best": cp[-1][1],
                   "best_per_hour": cp[-1][1] / (cp[-1][0] / 3600),
                   "epochs": sum(t.user_attrs.get("metrics", {}).get("epochs_run", 0)
                                 for t in pruned)},
        "unpruned": {"trials": len(cu), "compute_h": cu[-1][0] / 3600, "best": cu[-1][1],
                     "epochs": sum(t.user_attrs.get("metrics", {}).get("epochs_run", 0)
                                   for t in unpruned)},
        "equal_budget_h": budget / 3600,
        "best_at_equal_budget": {"pruned": best_at(cp, budget), "unpruned": best_at(cu, budget)},
        "compute_h_to_reach_unpruned_best": {
            "pruned": (lambda s: None if s is None else s / 3600)(compute_to_reach(cp, cu[-1][1])),
            "unpruned": compute_to_reach(cu, cu[-1][1]) / 3600},  # type: ignore[operator]
        "epochs_to_reach_unpruned_best": {
            "pruned": compute_to_reach(best_by_compute(pruned, epochs_run), cu[-1][1]),
            "unpruned": compute_to_reach(best_by_compute(unpruned, epochs_run), cu[-1][1])},
        "curves": {"pruned": cp, "unpruned": cu}}


def main() -> int:
    p = Parser(prog="python -m kdig_study.pruning", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study file name (e.g. kd_ig)")
    p.add_argument("--scale", default=None)
    p.add_argument("--unpruned", required=True, help="the search study run with --pruner none")
    p.add_argument("--pruned", default=None, help="the pruned search (default <study>-<scale>)")
    p.add_argument("--storage", default=None)
    p.add_argument("--rho", type=float, default=0.8,
                   help="rank correlation from which pruning may start (default 0.8)")
    p.add_argument("--percentile", type=float, default=50.0,
                   help="the pruner's percentile in the replay (study files: "
                        "search.prune_percentile; default 50, the median)")
    p.add_argument("--out", default="reports/results")
    args = p.parse_args()
    if not 0 < args.percentile <= 100:  # NaN fails too
        raise KdigError(f"--percentile {args.percentile}: allowed 0 < value <= 100")
    if not -1 < args.rho <= 1:  # a rank correlation; NaN fails too
        raise KdigError(f"--rho {args.rho}: allowed -1 < value <= 1 (a rank correlation)")
    import optuna
    from optuna.trial import TrialState

    from kdig_study.store import default_url, open_storage, quiet_optuna_logs

    quiet_optuna_logs()
    url = args.storage or default_url()
    storage = open_storage(url, read_only=url.startswith("sqlite"), existing=True)
    scale = args.scale or default_scale()
    names = {"unpruned": args.unpruned, "pruned": args.pruned or f"{args.study}-{scale}"}
    trials = {}
    for role, name in names.items():
        try:
            trials[role] = optuna.load_study(study_name=name, storage=storage).get_trials(
                deepcopy=False)
        except KeyError:
            if role == "pruned" and args.pruned is None:  # the correlations need only one
                print(f"no pruned search '{name}' in {url} yet: rank correlations only")
                continue
            raise KdigError(f"no study '{name}' in {url}") from None
    rhos = epoch_correlations(trials["unpruned"])
    if not rhos:
        raise KdigError(f"study '{names['unpruned']}' needs at least 3 completed trials")
    warmup = suggested_warmup(rhos, args.rho)
    print(f"rank correlation (Spearman) of validation accuracy after epoch k with the final "
          f"objective, {sum(t.state == TrialState.COMPLETE for t in trials['unpruned'])} "
          f"unpruned trials of '{names['unpruned']}':")
    for k, rho in rhos.items():
        print(f"  epoch {k}: {rho:+.3f}")
    print(f"suggested warm-up: {warmup} epoch(s) (first epoch with rho >= {args.rho})")
    rows = replay(trials["unpruned"], args.percentile)
    print(f"the pruner (percentile {args.percentile:g}, 3 start-up trials) replayed on those "
          f"trials, by warm-up:")
    for r in rows:
        print(f"  warm-up {r['warmup']}: prunes {len(r['pruned'])} trials, runs "
              f"{r['epochs']} of {r['epochs_unpruned']} epochs, best trial "
              f"{'kept' if r['best_survives'] else 'PRUNED'}, best kept {r['best_kept']:.2%}")
    out = Path(args.out) / f"pruning-{safe_name(names['pruned'])}.json"
    found = {"studies": names, "rank_correlation_by_epoch": rhos, "suggested_warmup": warmup,
             "rho_threshold": args.rho, "replay_percentile": args.percentile,
             "replay_by_warmup": rows}
    if "pruned" not in trials:
        write_json(out, found)
        print(f"written: {out}")
        return 0
    cmp = compare(trials["pruned"], trials["unpruned"])
    bp, bu = cmp["best_at_equal_budget"]["pruned"], cmp["best_at_equal_budget"]["unpruned"]
    print(f"pruned '{names['pruned']}': {cmp['pruned']['trials']} trials, "
          f"{cmp['pruned']['epochs']} epochs, {cmp['pruned']['compute_h']:.2f} h, best "
          f"{cmp['pruned']['best']:.2%}; unpruned: {cmp['unpruned']['trials']} trials, "
          f"{cmp['unpruned']['epochs']} epochs, {cmp['unpruned']['compute_h']:.2f} h, best "
          f"{cmp['unpruned']['best']:.2%}")
    reach = cmp["compute_h_to_reach_unpruned_best"]
    print(f"at equal compute ({cmp['equal_budget_h']:.2f} h): best {bp:.2%} pruned vs {bu:.2%} "
          f"unpruned; compute to reach the unpruned best: "
          + ("never" if reach["pruned"] is None else f"{reach['pruned']:.2f} h")
          + f" pruned vs {reach['unpruned']:.2f} h unpruned")
    ep = cmp["epochs_to_reach_unpruned_best"]
    print("the same in epochs trained (what the wall times say without the machine's noise): "
          + ("never" if ep["pruned"] is None else f"{ep['pruned']:.0f}")
          + f" pruned vs {ep['unpruned']:.0f} unpruned")
    write_json(out, found | cmp)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    run(main)

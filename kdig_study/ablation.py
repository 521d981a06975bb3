"""Ablations: every on/off combination of the method's factors, over seeds, paired.

Every condition shares the split, the teacher, the IG maps and the seeds (seed s trains
every condition's student from the same initial weights on the same data order), so the
comparisons are paired by seed. Runs are trials of an Optuna study beside the search
(``<study>.ablation``), one per (condition, seed), with the factors and the seed as
parameters: the dashboard shows them, and a re-run skips finished runs, redoes failed
ones, and takes over runs whose worker died (heartbeats).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from kdig_study.config import StudyConfig
from kdig_study.data import stratified_order
from kdig_study.experiment import Context, run_student
from kdig_study.measure import profile
from kdig_study.objectives import apply_params, record_run
from kdig_study.stats import Condition, Table, condition_name, conditions

FACTORS: tuple[str, ...] = ("kd", "ig", "at")
SWEEP_KEYS: tuple[str, ...] = ("drop_blocks", "width")


@dataclass(frozen=True)
class Run:
    condition: Condition
    seed: int  # the replicate: student seed (and Monte-Carlo subset) index
    sweep: float | None = None  # value of the swept student setting, if any

    def params(self, sweep_key: str | None) -> dict[str, Any]:
        p: dict[str, Any] = {"condition": condition_name(self.condition), "seed": self.seed}
        p |= {f: int(f in self.condition) for f in FACTORS}
        if sweep_key is not None:
            p[sweep_key] = self.sweep
        return p


def plan(factors: list[str], seeds: list[int], sweep: list[float] | None = None) -> list[Run]:
    """Seeds outermost, so an interrupted ablation has whole replicates to analyse."""
    values: list[float | None] = list(sweep) if sweep else [None]
    return [Run(c, s, v) for v in values for s in seeds for c in conditions(factors)]


def run_config(base: StudyConfig, params: dict[str, Any], run: Run,
               sweep_key: str | None) -> StudyConfig:
    cfg = apply_params(base, params)
    method = dataclasses.replace(cfg.method, **{f: f in run.condition for f in FACTORS})
    train = dataclasses.replace(cfg.student_train, seed=cfg.student_train.seed + run.seed)
    student = cfg.student
    if sweep_key == "drop_blocks":
        student = dataclasses.replace(student, drop_blocks=int(run.sweep))  # type: ignore[arg-type]
    elif sweep_key == "width":
        student = dataclasses.replace(student, width=float(run.sweep))  # type: ignore[arg-type]
    return dataclasses.replace(cfg, method=method, student_train=train, student=student)


def monte_carlo_rows(ctx: Context, replicate: int, fraction: float) -> torch.Tensor:
    """A stratified random subset (``fraction`` of the students' training set), the same
    for every condition of a replicate."""
    train_set, _ = ctx.data.train_subset(ctx.cfg.student_train.train_size)
    n = max(len(ctx.data.classes), round(fraction * len(train_set)))
    return stratified_order(train_set.labels, seed=10_000 + replicate)[:n].sort().values


class Ablation:
    def __init__(self, ctx: Context, study: optuna.Study, params: dict[str, Any],
                 factors: list[str], sweep_key: str | None = None,
                 fraction: float | None = None, poll_s: float = 5.0) -> None:
        self.ctx, self.study, self.params = ctx, study, params
        self.factors, self.sweep_key, self.fraction = factors, sweep_key, fraction
        self.poll_s = poll_s
        self._profiles: dict[str, dict[str, Any]] = {}
        self._names = [condition_name(c) for c in conditions(list(FACTORS))]

    # -- the store ----------------------------------------------------------------------------

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple(sorted((k, v) for k, v in params.items()))

    def _trials_by_key(self) -> dict[tuple, list[FrozenTrial]]:
        out: dict[tuple, list[FrozenTrial]] = {}
        for t in self.study.get_trials(deepcopy=False):
            params = dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))
            out.setdefault(self._key(params), []).append(t)
        return out

    def _suggest(self, trial: optuna.Trial, sweep_values: list[float]) -> dict[str, Any]:
        p = {"condition": trial.suggest_categorical("condition", self._names),
             "seed": trial.suggest_int("seed", 0, 1_000_000)}
        for f in FACTORS:
            p[f] = trial.suggest_categorical(f, [0, 1])
        if self.sweep_key is not None:
            p[self.sweep_key] = trial.suggest_categorical(self.sweep_key, sweep_values)
        return p

    # -- running --------------------------------------------------------------------------------

    def run(self, runs: list[Run], log: Any = print) -> None:
        """Run whatever is not finished yet; return when every planned run is COMPLETE."""
        sweep_values = sorted({r.sweep for r in runs if r.sweep is not None})
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            by_key = self._trials_by_key()
            todo, busy = [], []
            for r in runs:
                states = {t.state for t in by_key.get(self._key(r.params(self.sweep_key)), [])}
                if TrialState.COMPLETE in states:
                    continue
                (busy if TrialState.RUNNING in states else todo).append(r)
            done = len(runs) - len(todo) - len(busy)
            if not todo and not busy:
                return
            if not todo:
                log(f"waiting for {len(busy)} run(s) held by another worker or a crashed run "
                    f"(taken over once its heartbeat is stale)")
                time.sleep(self.poll_s)
                continue
            r = todo[0]
            waiting = [t for t in by_key.get(self._key(r.params(self.sweep_key)), [])
                       if t.state == TrialState.WAITING]
            if not waiting:
                self.study.enqueue_trial(r.params(self.sweep_key))
            label = f"{condition_name(r.condition)}, seed {r.seed}" + \
                (f", {self.sweep_key}={r.sweep:g}" if r.sweep is not None else "")
            log(f"[{done + 1}/{len(runs)}] {label}")
            self.study.optimize(lambda t: self._objective(t, sweep_values), n_trials=1)

    def _objective(self, trial: optuna.Trial, sweep_values: list[float]) -> float:
        p = self._suggest(trial, sweep_values)
        cond = frozenset(f for f in FACTORS if p[f])
        run = Run(cond, p["seed"], p.get(self.sweep_key) if self.sweep_key else None)
        cfg = run_config(self.ctx.cfg, self.params, run, self.sweep_key)
        rows = monte_carlo_rows(self.ctx, run.seed, self.fraction) if self.fraction else None
        result = run_student(self.ctx, cfg, rows=rows, desc=f"{p['condition']} s{run.seed}")
        m = result.metrics
        shape = repr(cfg.student)
        if shape not in self._profiles:
            prof = profile(result.model, self.ctx.device, batch=cfg.student_train.batch_size)
            self._profiles[shape] = {f"{k}_{stat}_ms": v[f"{stat}_ms"]
                                     for k, v in prof.items() if k.startswith("latency")
                                     for stat in ("median", "p90")}
        record_run(trial, m, self._profiles[shape])
        return float(m["val_acc"])


def results_table(trials: list[FrozenTrial], metric: str, sweep_key: str | None = None,
                  sweep_value: float | None = None) -> Table:
    """{condition: {seed: metric}} from the COMPLETE trials (one sweep value, if any)."""
    table: Table = {}
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        if sweep_key is not None and t.params.get(sweep_key) != sweep_value:
            continue
        cond = frozenset(f for f in FACTORS if t.params.get(f))
        if metric == "val_acc":
            value = t.value
        elif metric.startswith("robust_test_") and metric != "robust_test_acc":
            value = t.user_attrs.get("robust", {}).get(metric.removeprefix("robust_test_"))
        else:
            value = t.user_attrs["metrics"].get(metric)
        if value is not None:
            table.setdefault(cond, {})[int(t.params["seed"])] = float(value)
    return table

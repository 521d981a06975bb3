"""Ablations: every combination of the method's factors, over seeds, paired.

Factors: ``kd`` and ``at`` (on/off) and the overlay, whose levels are map sources (none,
ig, shuffled, random, gradcam, ...; ``ig`` as a factor means none|ig). Every condition of a
replicate shares the split, the teacher, the maps, the student's initial weights, the data
order with its crops and flips, and the overlay's own random stream (docs/design.md,
section 9, rule 1), so comparisons are paired by replicate. Replicate r trains at
``student_train.seed + 1000 + r``, never a seed a search trial used.

Runs are trials of an Optuna study beside the search (``<study>.ablation``), one per
(condition, replicate), with the factors and the replicate as parameters: the dashboard
shows them, and a re-run skips finished runs, redoes failed ones, and takes over runs whose
worker died (heartbeats). A lock is held from "which planned run is next?" until its trial
is RUNNING, so concurrent workers never run a run twice, and no trial outside the plan is
ever created or counted.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from kdig_study.config import (
    KD_METHODS,
    MAP_SOURCES,
    SWEEP_NAMES,
    AnalysisConfig,
    StudyConfig,
    apply_params,
    kd_level,
)
from kdig_study.corruptions import robust_key, robust_metric
from kdig_study.data import stratified_order
from kdig_study.experiment import Context, run_student
from kdig_study.measure import latency_columns, profile
from kdig_study.objectives import record_provenance, record_run
from kdig_study.optuna_adapter import rdb_storage_of, stored_trial
from kdig_study.seeds import ablation_seed
from kdig_study.slots import DONE, RUN, Next, SlotLock, claim_and_run, held_runs
from kdig_study.stats import (
    Condition,
    Design,
    Judgement,
    Table,
    analyse,
    by_family,
    condition_name,
    conditions,
    named_conditions,
    overlay_sources,
    primary_pair,
)
from kdig_study.sweep import JOIN, NO_SWEEP, Level, Sweep
from kdig_study.tracking import Guarded, Tracker

Params = dict[str, Any]


@dataclass(frozen=True)
class AblationName:
    """What an ablation study's name says: its search study, the subset fraction of a
    Monte-Carlo ablation, the swept keys of a sweep (``Sweep.name``: ``k``, or ``k1-x-k2``
    crossed)."""

    search: str
    fraction: float | None = None
    sweep_key: str | None = None


_KEY = '|'.join(map(re.escape, SWEEP_NAMES))
_NAME = re.compile(r"(?P<search>.+)\.ablation(?:-mc(?P<fraction>[0-9.e+-]+?))?"
                   rf"(?:-sweep-(?P<sweep_key>(?:{_KEY})(?:{JOIN}(?:{_KEY}))?))?")


def ablation_study_name(search: str, fraction: float | None = None,
                        sweep_key: str | None = None) -> str:
    """The ablation study beside search study ``search``: ``<search>.ablation``, then
    ``-mc<fraction>`` for Monte-Carlo subsets, ``-sweep-<key>`` for a sweep (``Sweep.name``:
    ``<key1>-x-<key2>`` crossed)."""
    return (f"{search}.ablation" + (f"-mc{fraction:g}" if fraction is not None else "")
            + (f"-sweep-{sweep_key}" if sweep_key else ""))


def parse_ablation_study_name(name: str) -> AblationName | None:
    """The inverse of :func:`ablation_study_name`; None for any other study name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    try:
        fraction = float(m["fraction"]) if m["fraction"] is not None else None
    except ValueError:
        return None
    return AblationName(m["search"], fraction, m["sweep_key"])


def analyse_metric(table: Table, design: Design, controls: tuple[str, ...],
                   metric: str, analysis: AnalysisConfig, only: tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    """:func:`kdig_study.stats.analyse` of one metric's table, judged as ``analysis``
    declares (alpha, equivalence margin in points), the primary comparison counted on its
    declared metric only; ``only``: the conditions run (--conditions), all where empty."""
    judge = Judgement(alpha=analysis.alpha, margin=analysis.equivalence_margin / 100)
    a = analyse(table, design, controls, judge,
                primary_pair(analysis, design, controls, only), only)
    if metric != analysis.metric:
        for r in a["comparisons"]:
            r["primary"] = False
        a["primary"] = None
    return a


def robust_by_family(table_of: Callable[[str], Table], families: Iterable[str],
                     design: Design, controls: tuple[str, ...], analysis: AnalysisConfig,
                     robust: dict[str, Any], only: tuple[str, ...] = ()
                     ) -> dict[str, Any] | None:
    """The robust comparisons under each corruption family (``table_of(metric)``: that
    metric's table; ``robust``: the analysis over all families), as
    :func:`kdig_study.stats.by_family` with each family's own analysis under "families";
    None where no family has results."""
    out = {}
    for family in families:
        table = table_of(robust_metric(family))
        if table:
            out[family] = analyse_metric(table, design, controls, robust_metric(family),
                                         analysis, only)
    return by_family(robust, out) | {"families": out} if out else None


def pilot_sd(storage: Any, pair: tuple[Condition, Condition], metric: str
             ) -> tuple[float, str, int] | None:
    """(sd of the per-replicate differences A - B on ``metric``, study name, replicates) of
    the plain ablation in the store with the most replicates of both conditions (not a
    Monte-Carlo one nor a sweep: their replicates differ in kind); None where none has 2.
    An ablation is known by what it recorded of itself, whatever its name (--study-name),
    or, where it recorded nothing (made before that was recorded), by its name."""
    best: tuple[float, str, int] | None = None
    for frozen in optuna.get_all_study_summaries(storage, include_best_trial=False):
        name, info = frozen.study_name, frozen.user_attrs.get("ablation")
        if info is not None:
            plain = info.get("fraction") is None and info.get("sweep_key") is None
        else:
            parsed = parse_ablation_study_name(name)
            plain = parsed is not None and parsed.fraction is None and parsed.sweep_key is None
        if not plain:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        table = results_table(planned_trials(study.get_trials(deepcopy=False), None), metric)
        a, b = table.get(pair[0], {}), table.get(pair[1], {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) >= 2 and (best is None or len(seeds) > best[2]):
            best = (statistics.stdev([a[s] - b[s] for s in seeds]), name, len(seeds))
    return best


def overlay_level(cond: Condition) -> str:
    """The overlay's level in a condition: a map source, or "none"."""
    return next((t for t in cond if t in MAP_SOURCES), "none")


@dataclass(frozen=True)
class Run:
    condition: Condition
    replicate: int  # r: the student trains at student_train.seed + 1000 + r
    sweep: Level = ()  # the level of the ablation's Sweep, if any: one value per key
    teacher: int | None = None  # k of --teachers K (K > 1): see teacher_config

    @property
    def name(self) -> str:
        return condition_name(self.condition)

    def params(self, sweep: Sweep) -> dict[str, Any]:
        kd = kd_level(self.condition)
        p: dict[str, Any] = {"condition": self.name, "replicate": self.replicate,
                             # 0/1 for the plain kd factor; 0 or the method for kd=...
                             "kd": kd if kd in KD_METHODS else int(kd is not None),
                             "at": int("at" in self.condition),
                             "overlay": overlay_level(self.condition)}
        p.update(sweep.params(self.sweep))
        if self.teacher is not None:
            p["teacher"] = self.teacher
        return p

    def label(self, sweep: Sweep) -> str:
        return f"{self.name}, replicate {self.replicate}" + \
            (f", teacher {self.teacher}" if self.teacher is not None else "") + \
            (f", {sweep.text(self.sweep)}" if sweep else "")


def run_of(params: dict[str, Any], sweep: Sweep) -> Run:
    """The planned run a trial's parameters describe."""
    kd = params.get("kd")
    cond = {"at"} if params.get("at") else set()
    if kd in KD_METHODS:
        cond.add(str(kd))
    elif kd:
        cond.add("kd")
    if params.get("overlay", "none") != "none":
        cond.add(str(params["overlay"]))
    teacher = params.get("teacher")
    return Run(frozenset(cond), int(params["replicate"]), sweep.level_of(params),
               None if teacher is None else int(teacher))


def plan(design: Design, replicates: list[int], sweep: Sweep = NO_SWEEP,
         controls: tuple[str, ...] = (), teachers: int = 1, only: tuple[str, ...] = ()
         ) -> list[Run]:
    """Replicates outermost (then teachers) within each sweep level, so an interrupted
    ablation has whole replicates to analyse. ``teachers`` > 1: every replicate under each
    teacher; ``only``: the conditions run (--conditions), all where empty."""
    ks: list[int | None] = list(range(teachers)) if teachers > 1 else [None]
    return [Run(c, r, v, k) for v in sweep.levels() for r in replicates for k in ks
            for c in conditions(design, controls, only)]


def teacher_config(cfg: StudyConfig, teacher: int | None) -> StudyConfig:
    """The config of teacher k of --teachers K: the study's teacher trained at
    teacher_train.seed + k (k = 0, or None: the study's own teacher, the search's)."""
    if not teacher:
        return cfg
    train = dataclasses.replace(cfg.teacher_train, seed=cfg.teacher_train.seed + teacher)
    return dataclasses.replace(cfg, teacher_train=train)


def run_config(base: StudyConfig, params: Params, run: Run, sweep: Sweep) -> StudyConfig:
    """One run's config: the condition's parameters, its factors switched, its seed."""
    cfg = apply_params(base, params)
    level = overlay_level(run.condition)
    kd = kd_level(run.condition)
    method = dataclasses.replace(cfg.method, kd=kd is not None, at="at" in run.condition,
                                 ig=level != "none")
    if kd in KD_METHODS:  # a level of kd=none|METHOD|...: that loss, its study-file settings
        cfg = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, method=kd))
    ig = dataclasses.replace(cfg.ig, source=level if level != "none" else cfg.ig.source)
    train = dataclasses.replace(cfg.student_train,
                                seed=ablation_seed(cfg.student_train.seed, run.replicate))
    return sweep.apply(dataclasses.replace(cfg, method=method, ig=ig, student_train=train),
                       run.sweep)


def monte_carlo_rows(ctx: Context, replicate: int, fraction: float) -> torch.Tensor:
    """A stratified random subset (``fraction`` of the students' training set), the same
    for every condition of a replicate."""
    train_set, _ = ctx.data.train_subset(ctx.cfg.student_train.train_size)
    n = max(len(ctx.data.classes), round(fraction * len(train_set)))
    return stratified_order(train_set.labels, seed=10_000 + replicate)[:n].sort().values


class AblationRunner:
    """Runs an ablation's planned runs as trials of its study, shared by any number of
    workers (see the module's docstring)."""

    def __init__(self, ctx: Context, study: optuna.Study, params: dict[str, Params],
                 design: Design, sweep: Sweep = NO_SWEEP,
                 fraction: float | None = None, poll_s: float = 5.0,
                 storage: RDBStorage | None = None, controls: tuple[str, ...] = (),
                 teachers: int = 1, tracker: Tracker | None = None,
                 only: tuple[str, ...] = ()) -> None:
        """``params``: each condition's method hyperparameters, by condition name;
        ``storage``: the study's RDB storage (for the lock that hands out runs);
        ``controls``: map sources run with KD on only, beside the factorial design;
        ``teachers``: K of --teachers K; ``tracker``: --track's, fed each run's epochs;
        ``only``: the conditions run (--conditions), all where empty."""
        self.ctx, self.study, self.params = ctx, study, params
        self.tracker = tracker or Guarded([])
        self.teachers = teachers
        self.design, self.sweep, self.fraction = design, sweep, fraction
        self.poll_s = poll_s
        self.lock = SlotLock(storage or rdb_storage_of(study), study.study_name)
        self._profiles: dict[str, dict[str, Any]] = {}
        self._names = list(named_conditions(design, controls, only))
        self._overlay = ["none", *overlay_sources(design, controls)]
        methods = [str(k) for k in design.get("kd", (None, "kd"))[1:]]
        self._kd: list[Any] = [0, 1] if methods == ["kd"] else [0, *methods]

    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's planned parameters (fixed by the queue), as trial parameters."""
        p = {"condition": trial.suggest_categorical("condition", self._names),
             "replicate": trial.suggest_int("replicate", 0, 1_000_000),
             "kd": trial.suggest_categorical("kd", self._kd),
             "at": trial.suggest_categorical("at", [0, 1]),
             "overlay": trial.suggest_categorical("overlay", self._overlay)}
        for key, values in zip(self.sweep.keys, self.sweep.values, strict=True):
            # sorted: the one value space every trial of the study declares, as given or not
            p[key] = trial.suggest_categorical(key, sorted(values))
        if self.teachers > 1:
            p["teacher"] = trial.suggest_int("teacher", 0, self.teachers - 1)
        return p

    def run(self, runs: list[Run], log: Any = print,
            on_finished: Callable[[], None] | None = None) -> None:
        """Run whatever is not finished yet; return when every planned run is COMPLETE.
        ``on_finished``: called after each run this process finished."""
        planned = set(runs)

        def decide() -> Next:
            state = run_states(self.study.get_trials(deepcopy=False), self.sweep)
            todo = [r for r in runs if TrialState.COMPLETE not in state.get(r, set())
                    and TrialState.RUNNING not in state.get(r, set())]
            busy = [r for r in runs if TrialState.COMPLETE not in state.get(r, set())
                    and TrialState.RUNNING in state.get(r, set())]
            if not todo and not busy:
                return DONE
            if not todo:
                return Next("wait", lambda: (
                    f"waiting for {len(busy)} planned run(s) held by other workers "
                    f"({held_runs(self.study, [r.params(self.sweep) for r in busy])}); "
                    f"a run whose worker died is taken over once its heartbeat is stale"))
            r = todo[0]
            if TrialState.WAITING not in state.get(r, set()):
                self.study.enqueue_trial(r.params(self.sweep))
            done = len(runs) - len(todo) - len(busy)
            log(f"[{done + 1}/{len(runs)}] {r.label(self.sweep)}", flush=True)
            return RUN

        def finished(study: optuna.Study, trial: FrozenTrial) -> None:
            if trial.state == TrialState.COMPLETE and on_finished is not None:
                on_finished()

        claim_and_run(self.study, self.lock, decide,
                      lambda trial: self._objective(trial, planned),
                      self.poll_s, log=log,
                      callbacks=[finished, self.tracker.finished])

    def _objective(self, trial: optuna.Trial, planned: set[Run]) -> float:
        fixed = stored_trial(self.study, trial).system_attrs.get("fixed_params")
        states = run_states(self.study.get_trials(deepcopy=False), self.sweep)
        if not fixed or run_of(fixed, self.sweep) not in planned or \
                TrialState.COMPLETE in states.get(run_of(fixed, self.sweep), set()):
            # A queued trial this invocation did not plan (e.g. the retry of a run of a
            # larger plan, or of a run finished meanwhile): never invent, repeat or count a
            # run outside the plan.
            trial.set_user_attr("skipped", "outside this invocation's plan, or already done")
            raise optuna.TrialPruned("outside the plan")
        p = self._suggest(trial)
        run = run_of(p, self.sweep)
        ctx = teacher_context(self.ctx, run.teacher)
        cfg = run_config(ctx.cfg, self.params[run.name], run, self.sweep)
        rows = monte_carlo_rows(ctx, run.replicate, self.fraction) if self.fraction \
            else None
        record_provenance(trial, ctx, cfg)
        tracker = self.tracker
        result = run_student(ctx, cfg, rows=rows, desc=f"{run.name} r{run.replicate}" + (
            f" t{run.teacher}" if run.teacher is not None else ""),
            on_epoch=(lambda stats: tracker.epoch(self.study.study_name, trial.number, stats))
            if tracker else None)
        shape = repr(cfg.student)
        if shape not in self._profiles:
            self._profiles[shape] = latency_columns(
                profile(result.model, self.ctx.device, batch=cfg.student_train.batch_size,
                        how=cfg.measure, image_size=self.ctx.data.image_size))
        record_run(trial, result.metrics, self._profiles[shape])
        return float(result.metrics.val_acc)


_CONTEXTS: dict[tuple[int, int], Context] = {}


def teacher_context(ctx: Context, teacher: int | None) -> Context:
    """The context of teacher k (:func:`teacher_config`): the same data, device and
    corruption suite, its own teacher and maps; one per process and teacher."""
    if not teacher:
        return ctx
    key = (id(ctx), teacher)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = ctx.with_config(teacher_config(ctx.cfg, teacher))
    return _CONTEXTS[key]


def run_states(trials: list[FrozenTrial], sweep: Sweep) -> dict[Run, set[TrialState]]:
    out: dict[Run, set[TrialState]] = {}
    for t in trials:
        params = dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))
        if "replicate" not in params:
            continue
        out.setdefault(run_of(params, sweep), set()).add(t.state)
    return out


def planned_trials(trials: list[FrozenTrial], runs: list[Run] | None,
                   sweep: Sweep = NO_SWEEP) -> list[FrozenTrial]:
    """The first COMPLETE trial of every planned run (``runs``; None: every run the trials
    describe): what the statistics count, never a run outside the plan or a run twice."""
    wanted = set(runs) if runs is not None else None
    seen: dict[Run, FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE or "replicate" not in t.params:
            continue
        r = run_of(t.params, sweep)
        if (wanted is None or r in wanted) and r not in seen:
            seen[r] = t
    return list(seen.values())


# The pairing unit of a --teachers ablation pooled over its teachers: replicate r under
# teacher k is unit k * TEACHER_UNIT + r (replicates are fewer than this).
TEACHER_UNIT = 1_000_000


def results_table(trials: list[FrozenTrial], metric: str, sweep: Sweep = NO_SWEEP,
                  level: Level = (), teacher: int | None = None) -> Table:
    """{condition: {unit: metric}} from COMPLETE trials (one sweep level, if any); the unit
    is the replicate, or with several teachers (k, replicate) as one number (TEACHER_UNIT),
    pooled, unless ``teacher`` picks one teacher's runs. Pass :func:`planned_trials` to
    count only a plan's runs."""
    table: Table = {}
    for t in trials:
        if t.state != TrialState.COMPLETE or "replicate" not in t.params:
            continue
        if sweep and sweep.level_of(t.params) != level:
            continue
        if teacher is not None and t.params.get("teacher") != teacher:
            continue
        run = run_of(t.params, sweep)
        unit = run.replicate if run.teacher is None or teacher is not None else \
            run.teacher * TEACHER_UNIT + run.replicate
        key = robust_key(metric)
        if metric == "val_acc":
            value = t.value
        elif key is not None:
            value = t.user_attrs.get("robust", {}).get(key)
        else:
            value = t.user_attrs["metrics"].get(metric)
        if value is not None:
            table.setdefault(run.condition, {})[unit] = float(value)
    return table

"""The hyperparameter search's parts: its sampler and pruner, and the worker loop that runs
trials until the study holds the number of finished trials asked for (used by the
`optimize` command, the benchmarks and, for the pruner, `pruning`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdig_study import formats
from kdig_study.config import StudyConfig
from kdig_study.optuna_adapter import heartbeat_interval
from kdig_study.seeds import sampler_seed
from kdig_study.slots import DONE, RUN, Next, SlotLock, claim_and_run, held_runs


def make_sampler(cfg: StudyConfig, seed: int | None, worker: int | None = None,
                 trials_before: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler for one process: seeded by the study (or --seed) when a single
    process starts an empty study, else by a seed derived from the worker index and the
    trials already there, so workers and resumed runs never replay the same proposals."""
    seed = sampler_seed(cfg.search.seed if seed is None else seed, worker, trials_before)
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)


def percentile_pruner(percentile: float, warmup: int) -> optuna.pruners.PercentilePruner:
    """The search's median/percentile pruner (also replayed by `kdig_study.pruning`)."""
    return optuna.pruners.PercentilePruner(percentile, n_startup_trials=3, n_warmup_steps=warmup)


def prune_warmup(cfg: StudyConfig) -> int:
    """Epochs before the median pruner may prune (0 in the file: a quarter of them)."""
    return cfg.search.prune_warmup or max(1, cfg.student_train.epochs // 4)


def describe_pruner(cfg: StudyConfig) -> str:
    if cfg.search.pruner != "median":
        return cfg.search.pruner
    return (f"median (percentile {cfg.search.prune_percentile:g}, from epoch "
            f"{prune_warmup(cfg)} of {cfg.student_train.epochs})")


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    epochs = cfg.student_train.epochs
    if cfg.search.pruner == "median":
        return percentile_pruner(cfg.search.prune_percentile, prune_warmup(cfg))
    if cfg.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def _trial_line(study: optuna.Study, n_trials: int, prefix: str) -> Any:
    def callback(_: optuna.Study, trial: FrozenTrial) -> None:
        done = finished_trials(study)
        if trial.state == TrialState.COMPLETE:
            val = trial.values[0]
        else:
            val = (list(trial.intermediate_values.values()) or [float("nan")])[-1]
        test = trial.user_attrs.get("test_acc")
        metrics = trial.user_attrs.get("metrics", {})
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else float("nan")
        params = formats.params(trial.params, digits=3)
        robust = metrics.get("robust_test_acc")
        print(f"{prefix}trial {trial.number} {trial.state.name.lower()}: val {val:.2%}"
              + (f", test {test:.2%}" if test is not None else "")
              + (f", robust test {robust:.2%}" if robust is not None else "")
              + f", {metrics.get('epochs_run', '?')} epochs, {seconds:.0f} s ({params}) "
                f"[{done}/{n_trials}]", flush=True)
    return callback


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
               timeout: float | None, lock: SlotLock, poll_s: float, prefix: str = "",
               callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()
               ) -> None:
    """Run trials until the study holds ``n_trials`` finished ones and none is running;
    ``callbacks`` (Optuna's) are called after each trial this worker ran."""

    def decide() -> Next:
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
        running = states[TrialState.RUNNING]
        if states[TrialState.WAITING] or finished + running < n_trials:
            return RUN
        if running == 0:
            return DONE
        # trials of other workers (or of a dead one, until it goes stale)
        return Next("wait", lambda: (
            f"{prefix}waiting for {running} running trial(s) of other workers "
            f"({held_runs(study)}); a trial whose worker died is failed and retried once its "
            f"heartbeat is over {2 * (heartbeat_interval(study) or 0)} s old (--heartbeat S)"))

    if not claim_and_run(study, lock, decide, objective, poll_s, timeout=timeout,
                         callbacks=[_trial_line(study, n_trials, prefix), *callbacks]):
        print(f"{prefix}--timeout reached: no new trials started", flush=True)


def finished_trials(study: optuna.Study) -> int:
    """COMPLETE and PRUNED trials: what counts towards a search's trial budget."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               for t in study.get_trials(deepcopy=False))


def search_sources(cfg: StudyConfig) -> list[str]:
    """The map sources a search may overlay: the `source` choices, or the study's source."""
    space = cfg.search.space.get("source")
    return [str(c) for c in space.choices] if space else [cfg.ig.source]

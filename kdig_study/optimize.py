"""Search a study's hyperparameters with Optuna; the store keeps every trial.

    python -m kdig_study.optimize --study kd_ig
    python -m kdig_study.optimize --study kd_ig --scale cpu --n-trials 20 --workers 2
    python -m kdig_study.optimize --study kd_ig --storage postgresql+psycopg://host/db

Trains or loads the teacher, computes or loads the IG maps, then runs trials until the study
holds --n-trials finished (complete or pruned) trials: re-running the same command resumes.
Several workers (--workers N here, or the same command on other machines against one
PostgreSQL store) share the work and never start more trials than asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from kdig_study.cli import Parser, add_study_args, load_from_args, run
from kdig_study.config import StudyConfig
from kdig_study.errors import KdigError
from kdig_study.experiment import Context
from kdig_study.measure import default_threads, profile
from kdig_study.models import build_model, count_params
from kdig_study.objectives import Objective, relevant_space
from kdig_study.store import (SlotLock, artifact_store, default_url, open_storage, open_study,
                              quiet_optuna_logs)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.optimize", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    p.add_argument("--n-trials", type=int, default=None,
                   help="finished trials wanted in the study, in total (default: the study's)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after S s")
    p.add_argument("--storage", default=None,
                   help="study store URL (default: sqlite:///storage/kdig.db)")
    p.add_argument("--study-name", default=None, help="default: <study>-<scale>")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    p.add_argument("--pruner", default=None, choices=["median", "hyperband", "none"],
                   help="override the study file's pruner (a different config: give it its "
                        "own --study-name)")
    p.add_argument("--heartbeat", type=int, default=60, metavar="S",
                   help="worker heartbeat interval; a trial silent for 2 x S s is failed and "
                        "retried")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return p


def make_sampler(cfg: StudyConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    seed = cfg.search.seed if seed is None else seed
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    epochs = cfg.student_train.epochs
    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 4))
    if cfg.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def banner(cfg: StudyConfig, n_trials: int) -> str:
    student = count_params(build_model(cfg.student))
    n_train = cfg.student_train.train_size or "all"
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    expected = f"; expected about {cfg.expected_minutes:.0f} min on a 2-core CPU" \
        if cfg.expected_minutes else ""
    mode = "+".join(k.upper() for k in ("kd", "ig", "at") if getattr(cfg.method, k)) or "alone"
    return (f"study {cfg.name} at scale {cfg.scale} ({gpu}): {n_trials} trials of a "
            f"{student / 1e6:.2f} M-parameter {cfg.student.arch} student ({mode}) on {n_train} "
            f"training images x {cfg.student_train.epochs} epochs{expected}")


def _record_teacher(study: optuna.Study, ctx: Context) -> None:
    """Teacher accuracy and cost beside the study, for reports (once)."""
    if "teacher" in study.user_attrs:
        return
    t = ctx.teacher()
    prof = profile(t.model, ctx.device, batch=ctx.cfg.student_train.batch_size)
    study.set_user_attr("teacher", {
        "val_acc": t.meta["val_acc"], "test_acc": t.meta["test_acc"], "path": str(t.path),
        "fingerprint": t.fingerprint, "wall_s": t.meta["wall_s"], **prof})
    study.set_user_attr("data", {"origin": ctx.data.origin, "train": len(ctx.data.train),
                                 "val": len(ctx.data.val), "test": len(ctx.data.test)})


def _trial_line(study: optuna.Study, n_trials: int, prefix: str) -> Any:
    def callback(_: optuna.Study, trial: FrozenTrial) -> None:
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in study.get_trials(deepcopy=False))
        if trial.state == TrialState.COMPLETE:
            val = trial.values[0]
        else:
            val = (list(trial.intermediate_values.values()) or [float("nan")])[-1]
        test = trial.user_attrs.get("test_acc")
        metrics = trial.user_attrs.get("metrics", {})
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else float("nan")
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in trial.params.items())
        robust = metrics.get("robust_test_acc")
        print(f"{prefix}trial {trial.number} {trial.state.name.lower()}: val {val:.2%}"
              + (f", test {test:.2%}" if test is not None else "")
              + (f", robust test {robust:.2%}" if robust is not None else "")
              + f", {metrics.get('epochs_run', '?')} epochs, {seconds:.0f} s ({params}) "
                f"[{done}/{n_trials}]", flush=True)
    return callback


def run_worker(study: optuna.Study, objective: Objective, n_trials: int,
               timeout: float | None, lock: SlotLock, poll_s: float, prefix: str = "") -> None:
    """Run trials until the study holds ``n_trials`` finished ones and none is running."""
    start = time.monotonic()
    callback = _trial_line(study, n_trials, prefix)
    while timeout is None or time.monotonic() - start < timeout:
        with lock.held_until_released():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            states = Counter(t.state for t in study.get_trials(deepcopy=False))
            finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
            running = states[TrialState.RUNNING]
            if not states[TrialState.WAITING] and finished + running >= n_trials:
                if running == 0:
                    return
                wait = True  # trials of other workers (or of a dead one, until it goes stale)
            else:
                wait = False

                def released_then_run(trial: optuna.Trial) -> float:
                    lock.release()  # the trial is RUNNING in the store: its slot is taken
                    return objective(trial)

                study.optimize(released_then_run, n_trials=1, callbacks=[callback])
        if wait:
            time.sleep(poll_s)
    print(f"{prefix}--timeout reached: no new trials started", flush=True)


def _spawn_workers(args: argparse.Namespace, n: int) -> int:
    """N copies of this command, one per worker; threads split so workers x threads <= cores,
    and one GPU each where there are several."""
    threads = max(1, default_threads() // n)
    gpus = torch.cuda.device_count()
    procs = []
    argv = [a for a in sys.argv[1:]]
    for i in range(n):
        env = os.environ.copy() | {"OMP_NUM_THREADS": str(threads),
                                   "KDIG_THREADS": str(threads)}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        procs.append(subprocess.Popen([sys.executable, "-m", "kdig_study.optimize", *argv,
                                       "--worker-index", str(i), "--no-progress"], env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # a terminal's Ctrl-C reached them too; make sure, then wait
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    failed = [c for c in codes if c != 0]
    if failed:
        raise KdigError(f"{len(failed)} of {n} workers failed (exit codes {failed}); "
                        f"run the same command again to finish the study")
    return 0


def main() -> int:
    args = _parser().parse_args()
    cfg = load_from_args(args)
    if args.pruner is not None:
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search,
                                                                  pruner=args.pruner))
    n_trials = args.n_trials if args.n_trials is not None else cfg.search.n_trials
    if n_trials < 1 or args.workers < 1 or args.heartbeat < 1:
        raise KdigError("--n-trials, --workers and --heartbeat must be >= 1")
    worker = args.worker_index
    if worker is None:
        print(banner(cfg, n_trials), flush=True)
    if os.environ.get("KDIG_THREADS"):
        torch.set_num_threads(int(os.environ["KDIG_THREADS"]))
    quiet_optuna_logs()
    url = args.storage or default_url()
    storage = open_storage(url, heartbeat_interval=args.heartbeat)
    name = args.study_name or f"{cfg.name}-{cfg.scale}"
    multi = len(cfg.search.objectives) > 1
    if multi and worker is None:
        print(f"multi-objective study ({', '.join(cfg.search.objectives)}): Optuna does not "
              f"prune multi-objective trials, so every trial runs all its epochs", flush=True)
    pruner = optuna.pruners.NopPruner() if multi else make_pruner(cfg)
    study = open_study(storage, name, cfg, make_sampler(cfg, args.seed), pruner,
                       ["maximize"] * len(cfg.search.objectives), url)
    if multi and worker is None:
        from optuna_dashboard import set_objective_names

        set_objective_names(study, [o.replace("_", " ") for o in cfg.search.objectives])
    progress = not args.no_progress and worker is None
    ctx = Context.create(cfg, args.data_dir, args.device, progress=progress)
    if worker is None:
        # Teacher and IG maps once, here, before any worker needs them.
        _record_teacher(study, ctx)
        if cfg.method.ig:
            ctx.maps()
        if args.workers > 1:
            print(f"{args.workers} workers, {max(1, default_threads() // args.workers)} "
                  f"threads each", flush=True)
            _spawn_workers(args, args.workers)
            _summary(study, n_trials, url)
            return 0
    prefix = f"[worker {worker}] " if worker is not None else ""
    space = relevant_space(cfg)
    if worker is None:
        print(f"searching {', '.join(space) or 'nothing'} with {cfg.search.sampler.upper()}, "
              f"pruner {cfg.search.pruner}; store {url}, study '{name}'", flush=True)
    objective = Objective(ctx, prune=cfg.search.pruner != "none", artifacts=artifact_store())
    run_worker(study, objective, n_trials, args.timeout, SlotLock(storage, name),
               poll_s=max(1.0, args.heartbeat / 2), prefix=prefix)
    if worker is None:
        _summary(study, n_trials, url)
    return 0


def _summary(study: optuna.Study, n_trials: int, url: str) -> None:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    print(f"study '{study.study_name}': " + ", ".join(f"{v} {k}" for k, v in
                                                     sorted(states.items())))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best_trials = study.best_trials if len(study.directions) > 1 else \
        ([max(complete, key=lambda t: t.values[0])] if complete else [])
    if len(study.directions) > 1 and best_trials:
        print(f"Pareto front: {len(best_trials)} trials")
    for best in best_trials:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best.params.items())
        values = ", ".join(f"{v:.2%}" for v in best.values)
        print(f"best: trial {best.number}, objective {values}, test "
              f"{best.user_attrs.get('test_acc', float('nan')):.2%} ({params})")
    print(f"store: {url}; open it with: python -m kdig_study.dashboard --storage {url}")


if __name__ == "__main__":
    run(main)

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
import math
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from kdig_study import formats
from kdig_study.cli import Parser, add_study_args, load_from_args, run, spawn_workers
from kdig_study.config import StudyConfig, fixed_trial, method_name, relevant_space
from kdig_study.errors import KdigError

if TYPE_CHECKING:
    import optuna

    from kdig_study.experiment import Context


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.optimize", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, trains_students=True, tracks=True)
    p.add_argument("--n-trials", type=int, default=None,
                   help="finished trials wanted in the study, in total (default: the study's)")
    p.add_argument("--timeout", type=float, default=None,
                   help="start no trial S s after this command started (teacher and maps "
                        "included); default search.timeout (0: none)")
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--storage", default=None,
                   help="study store URL (default: sqlite:///storage/kdig.db)")
    p.add_argument("--study-name", default=None, help="default: <study>-<scale>")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    p.add_argument("--enqueue-fixed", action="store_true",
                   help="run the study file's own settings as the search's first trial")
    p.add_argument("--pruner", default=None, choices=["median", "hyperband", "none"],
                   help="override the study file's pruner (a different config: give it its "
                        "own --study-name)")
    p.add_argument("--heartbeat", type=int, default=60, metavar="S",
                   help="worker heartbeat interval; a trial silent for 2 x S s is failed and "
                        "retried")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return p


def cached_parts(ctx: Context) -> dict[str, bool]:
    """Which of the expensive parts are already in the cache: the teacher, and every map
    store `optimize` computes up front (without training or computing anything)."""
    from kdig_study.attribution.sources import source_spec
    from kdig_study.attribution.store import MapSpec, index_hash, open_store
    from kdig_study.engine import resolve_precision
    from kdig_study.experiment import adaptive_spec_fields, ig_counts
    from kdig_study.search import search_sources
    from kdig_study.teacher import teacher_fingerprint, teacher_path

    cfg = ctx.cfg
    fp = teacher_fingerprint(cfg, ctx.data, ctx.device)
    teacher = teacher_path(fp).is_file()
    maps = not cfg.method.ig
    if cfg.method.ig and teacher:
        _, index = ctx.data.train_subset(cfg.student_train.train_size)
        ig = MapSpec(teacher=fp, data=ctx.data.fingerprint, images=index_hash(index),
                     n_images=int(index.numel()), method=cfg.ig.method,
                     baseline=cfg.ig.baseline, reduce=cfg.ig.reduce, counts=ig_counts(cfg),
                     precision=resolve_precision(cfg.ig.precision, ctx.device))
        if cfg.ig.target_gap:
            ig = dataclasses.replace(ig, **adaptive_spec_fields(cfg))  # type: ignore[arg-type]
        store = open_store(ig)
        maps = store is not None and all(
            open_store(source_spec(ig, s, cfg.ig, store)) is not None
            for s in search_sources(cfg) if s != "ig")
    outputs = False
    if teacher and (cfg.method.kd or cfg.method.at) and cfg.teacher_cache.enabled:
        from kdig_study.experiment import teacher_stream
        from kdig_study.models import build_model, taps

        _, index = ctx.data.train_subset(cfg.student_train.train_size)
        tap = taps(build_model(cfg.student, len(ctx.data.classes)), cfg.student,
                   cfg.teacher)[1] if cfg.method.at else None
        stream = teacher_stream(ctx, cfg, fp, index, tap)
        outputs = stream.cached_epochs() >= cfg.student_train.epochs
    return {"teacher": teacher, "maps": maps, "teacher_outputs": outputs}


def banner(cfg: StudyConfig, n_trials: int, to_run: int | None = None,
           cached: dict[str, bool] | None = None) -> str:
    """The first line: study, scale, size, and the expected wall time of what is left:
    the trials still to run and the parts not cached yet, from the study file's measured
    per-part minutes."""
    import torch

    from kdig_study.models import build_model, count_params

    student = count_params(build_model(cfg.student))
    n_train = cfg.student_train.train_size or "all"
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    mode = method_name(cfg.method)
    to_run = n_trials if to_run is None else to_run
    cached = cached or {"teacher": False, "maps": False}
    e = cfg.expected
    parts, minutes, unmeasured = [], 0.0, 0
    for part, needed in (("teacher", True), ("maps", cfg.method.ig)):
        if not needed:
            continue
        if cached[part]:
            parts.append(f"{part} cached")
        elif getattr(e, part):
            minutes += getattr(e, part)
            parts.append(f"{part} ~{getattr(e, part):.0f} min")
        else:  # 0: not measured on any machine yet (a total would leave it out)
            unmeasured += 1
            parts.append(f"{part} not measured")
    if (cfg.method.kd or cfg.method.at) and cfg.teacher_cache.enabled and e.trial_cached:
        # the trials share one data stream: its first run writes the teacher's outputs
        first = 0 if cached.get("teacher_outputs") else min(1, to_run)
        minutes += first * e.trial + (to_run - first) * e.trial_cached
        parts.append(f"{to_run} trial(s) to run x ~{e.trial_cached:.1f} min reading the "
                     f"teacher's outputs" + (f" (the first ~{e.trial:.1f} min writes them)"
                                             if first else ", cached"))
    else:
        minutes += to_run * e.trial
        parts.append(f"{to_run} trial(s) to run x ~{e.trial:.1f} min")
    if e.trial and not unmeasured:
        expected = f"; expected about {minutes:.0f} min on {e.machine} ({', '.join(parts)})"
    else:  # no total: say what is known (a trial of unmeasured length says nothing)
        shown = parts if e.trial else parts[:-1]
        expected = f" ({', '.join(shown)}; measured on {e.machine})" \
            if len(shown) > unmeasured else ""
    return (f"study {cfg.name} at scale {cfg.scale} ({gpu}): {n_trials} trials of a "
            f"{student / 1e6:.2f} M-parameter {cfg.student.arch} student ({mode}) on {n_train} "
            f"training images x {cfg.student_train.epochs} epochs{expected}")


def prepare(study: optuna.Study, ctx: Context) -> None:
    """Teacher and maps before any trial, each summarised in one line (from the cache too):
    a user needs both before trusting trials built on them."""
    from kdig_study.attribution.store import gap_summary
    from kdig_study.objectives import attach_gallery
    from kdig_study.search import search_sources
    from kdig_study.store import artifact_store

    cfg = ctx.cfg
    t0 = time.perf_counter()
    t = ctx.teacher()
    how = f"trained now in {(time.perf_counter() - t0) / 60:.1f} min" if t.trained_now \
        else "from the cache"
    print(f"teacher ({cfg.teacher.arch}, {t.meta['params']:,} parameters, {how}): validation "
          f"accuracy {t.meta['val_acc']:.2%}, test accuracy {t.meta['test_acc']:.2%}",
          flush=True)
    _record_teacher(study, ctx)
    if not cfg.method.ig:
        return
    sources = search_sources(cfg)
    for source in sources:
        t0 = time.perf_counter()
        report = ctx.maps(None, source)
        store = report.store
        how = f"computed in {(time.perf_counter() - t0) / 60:.1f} min" \
            if report.computed_images else "from the cache"
        line = f"{source} maps ({store.meta['spec']['n_images']:,} images, {how})"
        if source == "ig":
            line += f": {gap_summary(store)}; stop above {cfg.ig.max_gap:.0%}"
        print(line, flush=True)
    if len(sources) > 1:
        attach_gallery(study, artifact_store(), ctx.gallery(sources))


def _record_teacher(study: optuna.Study, ctx: Context) -> None:
    """Teacher accuracy and cost beside the study, for reports (once)."""
    from kdig_study.measure import profile

    if "teacher" in study.user_attrs:
        return
    t = ctx.teacher()
    prof = profile(t.model, ctx.device, batch=ctx.cfg.student_train.batch_size,
                   how=ctx.cfg.measure, image_size=ctx.data.image_size)
    study.set_user_attr("teacher", {
        "val_acc": t.meta["val_acc"], "test_acc": t.meta["test_acc"], "path": str(t.path),
        "fingerprint": t.fingerprint, "wall_s": t.meta["wall_s"], **prof})
    study.set_user_attr("data", {"origin": ctx.data.origin, "train": len(ctx.data.train),
                                 "val": len(ctx.data.val), "test": len(ctx.data.test),
                                 "classes": len(ctx.data.classes),
                                 "image_size": ctx.data.image_size})


def record_latency(study: optuna.Study, ctx: Context) -> dict[str, Any]:
    """Teacher and student latency measured together, in this one process, with every core
    this process may use and nothing else training (not inside a worker while others train):
    the figures the report shows. The search does not vary the student's shape, so the best
    trial's student has exactly the measured architecture."""
    from kdig_study.measure import default_threads, profile
    from kdig_study.models import build_model

    cfg = ctx.cfg
    student = build_model(cfg.student, len(ctx.data.classes))
    batch = cfg.student_train.batch_size
    size = ctx.data.image_size
    out = {"teacher": profile(ctx.teacher().model, ctx.device, batch=batch, how=cfg.measure,
                              image_size=size),
           "student": profile(student, ctx.device, batch=batch, how=cfg.measure,
                              image_size=size),
           "threads": default_threads(), "when": "after the search, one process"}
    study.set_user_attr("latency", out)
    return out


def main() -> int:
    started = time.time()
    args = _parser().parse_args()
    cfg = load_from_args(args)
    if args.pruner is not None:
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search,
                                                                  pruner=args.pruner))
    n_trials = args.n_trials if args.n_trials is not None else cfg.search.n_trials
    if n_trials < 1 or args.workers < 1 or args.heartbeat < 1:
        raise KdigError("--n-trials, --workers and --heartbeat must be >= 1")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise KdigError(f"--timeout {args.timeout}: allowed: a finite number of seconds > 0")
    fixed = fixed_trial(cfg) if args.enqueue_fixed else None  # checked before any study
    timeout = args.timeout if args.timeout is not None else cfg.search.timeout or None
    # one deadline for the command and its --workers processes (they get it as --deadline)
    deadline = args.deadline if args.deadline is not None else \
        None if timeout is None else started + timeout
    import optuna
    import torch

    from kdig_study.experiment import Context
    from kdig_study.measure import default_threads
    from kdig_study.objectives import Objective
    from kdig_study.search import (
        describe_pruner,
        finished_trials,
        make_pruner,
        make_sampler,
        run_worker,
    )
    from kdig_study.slots import SlotLock
    from kdig_study.store import (
        artifact_store,
        default_url,
        open_storage,
        open_study,
        quiet_optuna_logs,
    )
    from kdig_study.tracking import make_tracker

    worker = args.worker_index
    tracker = make_tracker(args.track)  # a missing package: one line, before any training
    threads = os.environ.get("KDIG_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise KdigError(f"KDIG_THREADS={threads}: allowed: a whole number >= 1 (torch "
                            f"threads per worker)")
        torch.set_num_threads(int(threads))
    quiet_optuna_logs()
    url = args.storage or default_url()
    storage = open_storage(url, heartbeat_interval=args.heartbeat)
    name = args.study_name or f"{cfg.name}-{cfg.scale}"
    multi = len(cfg.search.objectives) > 1
    pruner = optuna.pruners.NopPruner() if multi else make_pruner(cfg)
    # the data first: its fingerprint is part of the study's identity, and a config the data
    # refuses (e.g. a validation split larger than the pool) must not leave a study behind
    ctx = Context.create(cfg, args.data_dir, args.device,
                         progress=not args.no_progress and worker is None)
    new = name not in optuna.get_all_study_names(storage)
    study = open_study(storage, name, cfg, make_sampler(cfg, args.seed), pruner,
                       ["maximize"] * len(cfg.search.objectives), url,
                       **ctx.study_identity())
    study.sampler = make_sampler(cfg, args.seed, worker, len(study.get_trials(deepcopy=False)))
    if multi and worker is None:
        from optuna_dashboard import set_objective_names

        set_objective_names(study, [o.replace("_", " ") for o in cfg.search.objectives])
    artifact_store(check_writable=True)  # before any training, not after the first trial
    if fixed is not None and worker is None:
        study.enqueue_trial(fixed, skip_if_exists=True)
        print(f"enqueued the study file's settings as a trial: {formats.params(fixed)}",
              flush=True)
    if worker is None:
        finished = finished_trials(study)
        print(banner(cfg, n_trials, max(0, n_trials - finished), cached_parts(ctx)), flush=True)
        print(f"data: {ctx.data.describe()}", flush=True)
        if multi:
            print(f"multi-objective study ({', '.join(cfg.search.objectives)}): Optuna does not "
                  f"prune multi-objective trials, so every trial runs all its epochs",
                  flush=True)
        # Teacher and every map source the search may pick, once, here, before any worker
        # needs them.
        try:
            prepare(study, ctx)
        except KdigError:
            # a check of the teacher or the maps failed (e.g. the completeness-gap stop):
            # a study this command made and nothing ran in would block the name for every
            # later run with a fixed config
            if new and not study.get_trials(deepcopy=False):
                optuna.delete_study(study_name=name, storage=storage)
            raise
        if args.workers > 1:
            print(f"{args.workers} workers, {max(1, default_threads() // args.workers)} "
                  f"threads each", flush=True)
            spawn_workers("kdig_study.optimize", sys.argv[1:] + (
                [] if deadline is None else ["--deadline", repr(deadline)]), args.workers)
            _after_search(study, ctx, n_trials, url, finished)
            return 0
    prefix = f"[worker {worker}] " if worker is not None else ""
    space = relevant_space(cfg)
    if worker is None:
        print(f"searching {', '.join(space) or 'nothing'} with {cfg.search.sampler.upper()}, "
              f"pruner {describe_pruner(cfg)}; store {url}, study '{name}'"
              + (f"; tracking to {tracker.where()}" if tracker else ""), flush=True)
    objective = Objective(ctx, prune=cfg.search.pruner != "none",
                          artifacts=artifact_store(check_writable=True), tracker=tracker)
    try:
        run_worker(study, objective, n_trials,
                   None if deadline is None else max(0.0, deadline - time.time()),
                   SlotLock(storage, name),
                   poll_s=max(1.0, args.heartbeat / 2), prefix=prefix,
                   callbacks=[tracker.finished])
    finally:
        tracker.close()
    if worker is None:
        _after_search(study, ctx, n_trials, url, finished)
    return 0


def _after_search(study: optuna.Study, ctx: Context, n_trials: int, url: str,
                  finished_before: int) -> None:
    """Latency is measured again only when this command finished trials (or none is
    recorded): a resume with nothing left to run changes nothing and measures nothing."""
    from kdig_study.search import finished_trials

    if finished_trials(study) > finished_before or "latency" not in study.user_attrs:
        record_latency(study, ctx)
    _summary(study, n_trials, url)


def _summary(study: optuna.Study, n_trials: int, url: str) -> None:
    from kdig_study.objectives import choose_best, teacher_cache_line

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    print(f"study '{study.study_name}': " + ", ".join(f"{v} {k}" for k, v in
                                                     sorted(states.items())))
    chosen, rule = choose_best(study)
    best_trials = study.best_trials if len(study.directions) > 1 else \
        ([chosen] if chosen is not None else [])
    if len(study.directions) > 1 and best_trials:
        print(f"Pareto front: {len(best_trials)} trials; chosen for ablations and reports: "
              f"trial {chosen.number} ({rule})")  # type: ignore[union-attr]
    for best in best_trials:
        params = formats.params(best.params)
        values = ", ".join(f"{v:.2%}" for v in best.values)
        print(f"best: trial {best.number}, objective {values}, test "
              f"{best.user_attrs.get('test_acc', float('nan')):.2%} ({params})")
    print(teacher_cache_line(trials, "the study's trials"))
    print(f"store: {url}; open it with: python -m kdig_study.dashboard --storage {url}")


if __name__ == "__main__":
    run(main)

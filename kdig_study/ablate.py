"""Ablation of a study's method: every combination of its factors, over seeds, paired.

    python -m kdig_study.ablate --study kd_ig --scale cpu --seeds 10 --params fixed
    python -m kdig_study.ablate --study kd_ig --params per-condition
    python -m kdig_study.ablate --study kd_ig --factors kd,overlay=none|ig|shuffled|gradcam
    python -m kdig_study.ablate --study kd_ig --params fixed --controls shuffled,random,gradcam
    python -m kdig_study.ablate --study kd_ig --controls shuffled,constant \
        --conditions KD,KD+IG,KD+shuffled,KD+constant      (KD held on, the overlay varied)
    python -m kdig_study.ablate --study kd_ig --factors kd,ig,at --params best.toml
    python -m kdig_study.ablate --study kd_ig --factors "kd=none|hinton|dkd|dist|lskd,ig"
    python -m kdig_study.ablate --study kd_ig --monte-carlo 5 --fraction 0.8
    python -m kdig_study.ablate --study kd_ig --sweep drop_blocks=3,5,7,9 --seeds 2
    python -m kdig_study.ablate --study kd_ig --sweep ig.overlay_strength=0.25,0.5 \
        --sweep student_train.epochs=8,16      (two sweeps crossed: 4 levels)

Hyperparameters (--params), the design every table says it comes from:
  fixed          (the default) every condition at the study file's own settings (no
                 condition tuned)
  per-condition  each condition at the best trial of its own search, same budget: the
                 studies student, kd, ig, kd_ig at this scale, and for any other condition
                 (a KD method, a control) the study file's search with that condition's
                 settings, run here first (study `<search study>.tune-<condition>`)
  best           every condition at the best trial of the KD+IG search (tuned for KD+IG only)
  FILE.toml      every condition at a [params] table
Replicate r trains at student_train.seed + 1000 + r: never a seed a search trial used.
Runs live in the same store as the search, in the study `<search study>.ablation`; a
re-run skips finished runs. Each finished run is also written to the run ledger
`<--out>/<study>.runs.json` (a few KB a run: commit it), and a store that lacks a ledger's
runs (a fresh machine) takes them back, if the ablation and its teacher are the same; so
with the searches that tune conditions (`<--out>/<their study>.trials.json`).
Statistics (paired by replicate; primary comparison KD+IG - KD
on test accuracy; Holm-adjusted p-values; d_z; the minimum detectable difference) are
printed and written as JSON and CSV.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdig_study import formats
from kdig_study.cli import Parser, add_study_args, load_from_args, run, spawn_workers
from kdig_study.config import (
    BINARY_FACTORS,
    FACTORS,
    KD_METHODS,
    MAP_SOURCES,
    SWEEP_KEYS,
    SWEEP_NAMES,
    StudyConfig,
    apply_params,
    at_pair_problem,
    condition_study,
    kd_level,
    load_params,
    load_study,
    param_values,
)
from kdig_study.errors import KdigError
from kdig_study.paths import atomic_write, safe_name, writable_folder, write_json
from kdig_study.seeds import ABLATION_SEED_OFFSET, ablation_seed
from kdig_study.sweep import Sweep, parse_sweeps

if TYPE_CHECKING:
    import optuna

    from kdig_study.ablation import Params, Run
    from kdig_study.experiment import Context
    from kdig_study.stats import Table
    from kdig_study.tracking import Tracker

METRICS = (("test_acc", "test accuracy"), ("robust_test_acc", "test accuracy under corruptions"),
           ("val_acc", "validation accuracy"))
DESIGNS = ("best", "per-condition", "fixed")
_DESIGN_TEXT = {
    "best": "every condition at the best trial of the KD+IG search (tuned for KD+IG only)",
    "per-condition": "each condition at the best trial of its own search, same budget",
    "fixed": "every condition at the study file's own settings (no condition tuned)",
    "file": "every condition at the parameters of a file",
}


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kdig_study.ablate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, trains_students=True, tracks=True)
    p.add_argument("--seeds", type=int, default=10,
                   help="replicates per condition (default 10, the paper's count)")
    p.add_argument("--factors", default="kd,ig",
                   help="comma list of kd, ig, at, overlay=none|ig|SOURCE|... (map sources: "
                        f"{', '.join(MAP_SOURCES)}) and kd=none|METHOD|... (KD methods: "
                        f"{', '.join(KD_METHODS)}); ig means overlay=none|ig, kd the study "
                        f"file's method")
    p.add_argument("--controls", default="",
                   help="comma list of map sources run with KD on only (KD+shuffled, ...), "
                        "beside the factorial design of --factors (which needs kd and ig), "
                        "each compared with KD and with KD+IG")
    p.add_argument("--conditions", default="", metavar="NAMES",
                   help="comma list: run only these of the design's conditions (e.g. "
                        "KD,KD+IG,KD+shuffled,KD+constant); comparisons need both of their "
                        "conditions, factorial effects every cell; default: all")
    p.add_argument("--params", default=None,
                   help="fixed (default: the study file's settings for every condition) | "
                        "per-condition | best | FILE.toml with [params] (see above)")
    p.add_argument("--storage", default=None, help="default: sqlite:///storage/kdig.db")
    p.add_argument("--from-study", default=None,
                   help="the search study for --params best, and the prefix of the searches "
                   "--params per-condition runs, <name>.tune-<condition> (default: "
                   "<study>-<scale>)")
    p.add_argument("--teachers", type=int, default=1, metavar="K",
                   help="K teachers (seeds teacher_train.seed + 0..K-1), each with its own maps "
                        "and controls; every replicate runs under each; analysed per teacher "
                        "and pooled with a random teacher effect")
    p.add_argument("--monte-carlo", type=int, default=0, metavar="R",
                   help="R replicates on stratified random subsets of the training set")
    p.add_argument("--fraction", type=float, default=0.8, help="subset size for --monte-carlo")
    p.add_argument("--sweep", action="append", default=None, metavar="KEY=V1,V2,...",
                   help=f"also vary the student: {' or '.join(SWEEP_KEYS)} (compression sweep),"
                        f" or any of SECTION.KEY (dose-response), e.g. ig.overlay_strength; "
                        f"given twice, the two are crossed")
    p.add_argument("--study-name", default=None,
                   help="name of the ablation study (default: <search study>.ablation[...]); "
                        "e.g. a second ablation with other --params")
    p.add_argument("--out", default="reports", help="folder for the JSON and CSV results")
    p.add_argument("--heartbeat", type=int, default=60, metavar="S")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the plan (on a GPU they share it)")
    p.add_argument("--plan", action="store_true",
                   help="print the seeds the declared [analysis] needs (from a pilot sd), "
                        "then stop: nothing runs")
    p.add_argument("--pilot-sd", type=float, default=None, metavar="POINTS",
                   help="for --plan: the sd of the primary comparison's per-seed differences "
                        "(default: from the ablation in the store with the most pairs)")
    p.add_argument("--reanalyse", default=None, metavar="FILE.json",
                   help="judge a finished ablation's results JSON, or a stopped one's run "
                        "ledger (its complete replicates), under the declared [analysis]: "
                        "tables, verdicts, plain words; nothing runs; writes "
                        "<name>.verdicts.json to --out")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return p


# The factors that take levels (--factors NAME=none|LEVEL|...): what a level is, and those allowed.
_LEVELS = {"overlay": ("map source", MAP_SOURCES), "kd": ("KD method", KD_METHODS)}


def parse_factors(text: str, cfg: StudyConfig) -> dict[str, tuple[str | None, ...]]:
    """``kd,ig``, ``kd,overlay=none|ig|shuffled`` or ``kd=none|hinton|dkd,ig`` -> the design
    (factor -> levels)."""
    design: dict[str, tuple[str | None, ...]] = {}
    allowed = f"allowed: {', '.join(FACTORS)}, overlay=none|ig|SOURCE|..., kd=none|METHOD|..."
    for item in (f.strip() for f in text.split(",")):
        if not item:
            continue
        name, eq, levels = item.partition("=")
        key = "overlay" if name in ("ig", "overlay") else name
        if key in design:
            raise KdigError(f"--factors {text}: {name!r} repeated (ig and overlay are one "
                            f"factor); {allowed}")
        if eq:
            if name not in _LEVELS:
                raise KdigError(f"--factors {text}: only overlay and kd take levels; {allowed}")
            what, choices = _LEVELS[name]
            lv = [x.strip() for x in levels.split("|")]
            bad = [x for x in lv if x not in ("none", *choices)]
            if bad or "none" not in lv or len(lv) < 2 or len(set(lv)) != len(lv):
                raise KdigError(f"--factors {text}: {name} levels must be distinct, include "
                                f"none and at least one {what} ({', '.join(choices)})"
                                + (f"; unknown: {', '.join(repr(b) for b in bad)}" if bad else ""))
            design[key] = (None, *[x for x in lv if x != "none"])
        elif name in BINARY_FACTORS:
            design[key] = BINARY_FACTORS[name]
        else:
            raise KdigError(f"--factors {text}: unknown factor {name!r}; {allowed}")
    if not design:
        raise KdigError(f"--factors {text!r}: no factor given; {allowed}")
    problem = at_pair_problem(cfg.teacher, cfg.student) if "at" in design else None
    if problem:
        raise KdigError(f"--factors {text}: {problem}")
    return design


def parse_conditions(text: str, design: dict[str, tuple[str | None, ...]],
                     controls: tuple[str, ...]) -> tuple[str, ...]:
    """``KD,KD+IG,KD+shuffled`` -> those of the design's conditions, in the design's order;
    () (all) where empty or naming every one (the same ablation as without the flag)."""
    from kdig_study.stats import analyse, named_conditions

    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        return ()
    names = list(named_conditions(design, controls))
    bad = [x for x in items if x not in names or items.count(x) > 1]
    if bad or len(items) < 2:
        raise KdigError(f"--conditions {text}: "
                        + (f"{', '.join(repr(b) for b in dict.fromkeys(bad))} unknown or "
                           f"repeated; " if bad else "give at least two conditions; ")
                        + f"this design's conditions (--factors, --controls): "
                          f"{', '.join(names)}")
    if len(items) == len(names):
        return ()
    only = tuple(n for n in names if n in items)
    empty = analyse({}, design, controls, only=only)
    if not empty["comparisons"] and not empty["effects"]:
        raise KdigError(f"--conditions {text}: no comparison among these (a pair needs a "
                        f"condition and its reference: the student, the same without the "
                        f"overlay, or KD+IG for a control); e.g. KD,KD+IG, or add student")
    return only


def parse_controls(text: str, design: dict[str, tuple[str | None, ...]]) -> tuple[str, ...]:
    """``shuffled,random`` -> the control sources, each run with KD on (the design must hold
    KD and the IG overlay: the controls are compared with KD and KD+IG)."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        return ()
    from kdig_study.stats import overlay_sources

    levels = overlay_sources(design)
    if "kd" not in design or "ig" not in levels:
        raise KdigError(f"--controls {text}: controls run with KD and are compared with KD+IG; "
                        f"--factors must include kd and ig (e.g. --factors kd,ig)")
    allowed = [s for s in MAP_SOURCES if s != "ig"]
    bad = [x for x in items if x not in allowed or x in levels or items.count(x) > 1]
    if bad:
        raise KdigError(f"--controls {text}: {', '.join(repr(b) for b in dict.fromkeys(bad))} "
                        f"unknown, repeated or already an overlay level; allowed: "
                        f"{', '.join(allowed)}")
    return items


def _best(storage: Any, name: str, url: str, cfg: StudyConfig, study_file: str
          ) -> tuple[Params, dict[str, Any]]:
    """The chosen trial's parameters of search study ``name``, and where they came from."""
    import optuna

    from kdig_study.objectives import choose_best

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise KdigError(f"no study '{name}' in {url}: run `python -m kdig_study.optimize "
                        f"--study {study_file} --scale {cfg.scale}` first, or give --params "
                        f"fixed or FILE.toml") from None
    best, rule = choose_best(study)
    if best is None:
        raise KdigError(f"study '{name}' in {url} has no completed trials: let "
                        f"`python -m kdig_study.optimize --study {study_file} --scale "
                        f"{cfg.scale}` finish some, or give --params fixed or FILE.toml")
    return dict(best.params), {"study": name, "trial": best.number, "rule": rule,
                               "val_acc": best.values[0]}


def say_params(params: dict[str, Params], origin: dict[str, Any]) -> None:
    """One line per search whose trial some condition takes (--params best shares one)."""
    said: set[str] = set()
    for n, o in origin.items():
        if "study" in o and o["study"] not in said:
            said.add(o["study"])
            print(f"parameters of trial {o['trial']} of '{o['study']}' (val acc "
                  f"{o['val_acc']:.2%}; rule: {o['rule']}): " + formats.params(params[n]))


def condition_params(args: argparse.Namespace, storage: Any, url: str, cfg: StudyConfig,
                     conds: dict[str, frozenset[str]]
                     ) -> tuple[str, dict[str, Params], dict[str, Any]]:
    """(design, parameters per condition, where each came from); ``conds``: the
    conditions by name."""
    names = list(conds)
    search_name = args.from_study or f"{cfg.name}-{cfg.scale}"
    if args.params == "best":
        params, origin = _best(storage, search_name, url, cfg, cfg.name)
        return "best", {n: params for n in names}, {n: origin for n in names}
    if args.params == "fixed":
        return "fixed", {n: {} for n in names}, {n: {"study file": cfg.source} for n in names}
    if args.params == "per-condition":
        tuned = {n: condition_search(search_name, cfg.scale, n) for n in names
                 if condition_study(n) is None}  # no study file of its own: tuned here
        tune_conditions(args, cfg, {n: (conds[n], tuned[n]) for n in tuned}, storage, url)
        out, origin = {}, {}
        for n in names:
            if n in tuned:
                out[n], origin[n] = _best(storage, tuned[n], url, cfg, cfg.name)
                origin[n]["settings"] = condition_settings(cfg, conds[n])
            else:  # its own study file (student, kd, ig, kd_ig)
                out[n], origin[n] = _best(storage, condition_search(search_name, cfg.scale, n),
                                          url, cfg, condition_study(n) or cfg.name)
        return "per-condition", out, origin
    params = load_params(args.params)
    return "file", {n: dict(params) for n in names}, {n: {"file": args.params} for n in names}


def tune_study_name(search_name: str, condition: str) -> str:
    """The search that tunes ``condition`` for --params per-condition, where no study file
    is named after it: ``kd_ig-cpu.tune-DKD+shuffled``."""
    return f"{search_name}.tune-{condition}"


def condition_search(search_name: str, scale: str, condition: str) -> str:
    """The search study --params per-condition takes ``condition``'s parameters from: its
    own study file's at this scale, else the one run for it (:func:`tune_study_name`)."""
    study_file = condition_study(condition)
    return f"{study_file}-{scale}" if study_file is not None else \
        tune_study_name(search_name, condition)


def condition_settings(cfg: StudyConfig, cond: frozenset[str]) -> list[str]:
    """The --set items that make the study file's search one of ``cond``: its switches, its
    KD method and map source, and those held out of the search (the condition fixes them)."""
    from kdig_study.ablation import overlay_level

    kd = kd_level(cond)
    source = overlay_level(cond)
    out = [f"method.kd={str(kd is not None).lower()}",
           f"method.ig={str(source != 'none').lower()}",
           f"method.at={str('at' in cond).lower()}"]
    hold = list(cfg.search.hold)
    if kd in KD_METHODS:
        out.append(f"kd.method={json.dumps(kd)}")
        hold.append("kd_method")
    if source != "none":
        out.append(f"ig.source={json.dumps(source)}")
        hold.append("source")
    return out + [f"search.hold={json.dumps(sorted(set(hold)))}"]


def tune_conditions(args: argparse.Namespace, cfg: StudyConfig,
                    todo: dict[str, tuple[frozenset[str], str]], storage: Any, url: str
                    ) -> None:
    """Run (or top up) the search that tunes each condition of ``todo`` (name -> (its
    levels, its search study)): the study file's own search (its trial budget, sampler
    and seed, like every condition's) with the condition's settings, as `optimize` in
    child processes (their progress, resume and signals), --workers of them at once. Each
    search's finished trials are kept in its ledger in --out (:func:`search_ledger_path`),
    and a store that lacks the search takes them from there."""
    import optuna

    from kdig_study.ledger import import_search_ledger, search_ledger_path, write_search_ledger
    from kdig_study.search import finished_trials

    paths = {n: search_ledger_path(Path(args.out), tuned) for n, (_, tuned) in todo.items()}
    pending = []
    for n, (cond, tuned) in todo.items():
        added = import_search_ledger(paths[n], storage, tuned)
        if added:
            print(f"{added} finished trial(s) of the search tuning {n} taken from its ledger "
                  f"{paths[n]} (this store lacked it)", flush=True)
        try:
            study = optuna.load_study(study_name=tuned, storage=storage)
        except KeyError:  # not begun yet
            pending.append(n)
            continue
        _check_tuning_config(study, tuning_config(args, cfg, cond), n, paths[n], url)
        _check_tuning_machine(args, cfg, study, n, paths[n], url)
        if finished_trials(study) < cfg.search.n_trials:
            pending.append(n)

    def save(n: str) -> None:  # as each search ends, and after a stop: its finished trials
        try:
            write_search_ledger(paths[n], optuna.load_study(study_name=todo[n][1],
                                                            storage=storage))
        except KeyError:  # never begun
            pass

    try:
        _run_tunings(args, cfg, {n: todo[n] for n in pending}, url, save)
    finally:
        for n in todo:
            save(n)


def tuning_config(args: argparse.Namespace, cfg: StudyConfig, cond: frozenset[str]
                  ) -> StudyConfig:
    """The config the search tuning ``cond`` runs with (:func:`_run_tunings`' --set items)."""
    return load_study(args.study, cfg.scale, [*args.overrides, *condition_settings(cfg, cond)])


def _check_tuning_config(study: Any, want: StudyConfig, name: str, path: Path, url: str
                         ) -> None:
    """Refuse a tuning search made with another config: a finished one (from the store or
    its ledger) would otherwise hand its parameters to a changed design unnoticed, since
    `optimize`, which refuses a changed config, never runs again for it."""
    from kdig_study.store import changed_keys, study_attrs

    if study.user_attrs.get("config_fingerprint") in (None, want.fingerprint()):
        return
    keys = changed_keys(study.user_attrs.get("config", {}), study_attrs(want)["config"])
    raise KdigError(
        f"--params per-condition: the search tuning {name} (study '{study.study_name}', "
        f"ledger {path}) was made with another config (changed: "
        f"{', '.join(keys[:6]) or 'unknown'}{' ...' if len(keys) > 6 else ''}): restore the "
        f"config, or move the ledger away and delete the study (`optuna delete-study "
        f"--study-name '{study.study_name}' --storage {url}`) to tune again")


def _check_tuning_machine(args: argparse.Namespace, cfg: StudyConfig, study: Any, name: str,
                          path: Path, url: str) -> None:
    """Refuse, before the teacher trains, a tuning search whose trials trained at another
    precision or bf16 kernel family than this machine's (its ledger made on another kind of
    machine): their teacher comes out as other weights here, which _check_tuning_teacher
    would say only after an hour of training it."""
    from kdig_study.engine import bf16_kernels, resolve_device, resolve_precision
    from kdig_study.ledger import check_machine

    device = resolve_device(args.device)
    precision = resolve_precision(cfg.student_train.precision, device)
    check_machine([{"user_attrs": t.user_attrs} for t in study.get_trials(deepcopy=False)],
                  precision, bf16_kernels(precision, device),
                  f"--params per-condition: the search tuning {name} (study "
                  f"'{study.study_name}', ledger {path})",
                  f"finish it on a machine like the ledger's, or tune again here: move the "
                  f"ledger away and delete the study (`optuna delete-study --study-name "
                  f"'{study.study_name}' --storage {url}`)")


def _run_tunings(args: argparse.Namespace, cfg: StudyConfig,
                 todo: dict[str, tuple[frozenset[str], str]], url: str,
                 ended: Callable[[str], None]) -> None:
    """The tuning searches as `optimize` child processes: one after another, or with
    --workers N, N at once (each with its share of the cores, its lines prefixed with its
    condition). Searches of different conditions share nothing but the teacher, maps and
    teacher outputs, each made once under a lock: each runs as it would alone (its study,
    budget, sampler seed), on fewer threads (float sums may differ in their last bits).
    ``ended(name)`` runs as each search ends (its ledger is written then, not after the
    slowest)."""
    import subprocess

    from kdig_study.cli import run_children

    parallel = max(1, min(args.workers, len(todo)))
    cmds = {}
    for name, (cond, tuned) in todo.items():
        cmd = [sys.executable, "-m", "kdig_study.optimize", "--study", args.study, "--scale",
               cfg.scale, "--study-name", tuned, "--storage", url, "--device", args.device]
        for item in [*args.overrides, *condition_settings(cfg, cond)]:
            cmd += ["--set", item]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        if args.track:
            cmd += ["--track", args.track]
        if args.no_progress or parallel > 1:  # bars of several searches would overwrite
            cmd.append("--no-progress")
        if getattr(args, "no_teacher_cache", False):
            cmd.append("--no-teacher-cache")
        cmds[name] = cmd

    def announce(name: str) -> None:
        cond, tuned = todo[name]
        print(f"tuning {name} ({cfg.search.n_trials} trials, the study file's search with "
              f"{' '.join(condition_settings(cfg, cond))}): study '{tuned}'"
              + (f"; {parallel} searches at once" if parallel > 1 else ""), flush=True)

    codes: dict[str, int] = {}
    if parallel == 1:  # in this terminal: the search's own progress bars
        for name, cmd in cmds.items():
            announce(name)
            codes[name] = subprocess.call(cmd)
            ended(name)
            if codes[name] != 0:
                break
    else:
        _prepare_searches(args, cfg, todo)
        for name in cmds:
            announce(name)
        codes = run_children(list(cmds.items()), parallel, lambda name, _: ended(name))
    failed = next((n for n in cmds if codes.get(n, 0) != 0), None)
    if failed is not None:  # the searches not yet started stay so: one failure stops all
        raise KdigError(f"--params per-condition: the search tuning {failed} (study "
                        f"'{todo[failed][1]}') stopped with exit status {codes[failed]}; "
                        f"run the command again to resume it")


def _prepare_searches(args: argparse.Namespace, cfg: StudyConfig,
                      todo: dict[str, tuple[frozenset[str], str]]) -> None:
    """The teacher and the maps that searches about to run at once need, made here on every
    core: otherwise the first search makes them, under a lock, on its share of the cores
    while the others wait."""
    import time

    from kdig_study.experiment import Context
    from kdig_study.search import search_sources

    t0, made = time.perf_counter(), []
    ctx: Context | None = None
    for cond, _ in todo.values():
        tcfg = tuning_config(args, cfg, cond)
        ctx = Context.create(tcfg, args.data_dir, args.device, not args.no_progress) \
            if ctx is None else ctx.with_config(tcfg)
        if ctx.teacher().trained_now:
            made.append("the teacher")
        for source in search_sources(tcfg) if tcfg.method.ig else []:
            if ctx.maps(None, source).computed_images:
                made.append(f"the {source} maps")
    if made:
        print(f"made {', '.join(made)} for the searches here, on every core, in "
              f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def search_seeds(storage: Any, names: list[str]) -> dict[int, set[str]]:
    """Every student seed a trial of these search studies trained at, with its studies."""
    import optuna

    seeds: dict[int, set[str]] = {}
    for name in names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False):
            seed = t.user_attrs.get("metrics", {}).get("seed")
            if seed is not None:
                seeds.setdefault(int(seed), set()).add(name)
    return seeds


def effective(cfg: StudyConfig, params: Params) -> dict[str, Any]:
    """The method settings a condition actually trains with (file values filled in)."""
    return param_values(apply_params(cfg, params))


def _maps_up_front(ctx: Context, params: dict[str, Params], runs: list[Run],
                   sweep: Sweep) -> None:
    """Every teacher and map store the plan's runs use, trained or computed (or opened)
    before the first run."""
    from kdig_study.ablation import run_config, teacher_context
    from kdig_study.experiment import store_counts

    needed: dict[tuple[int, tuple[int, ...], str], set[int]] = {}  # -> the steps run at
    for r in runs:
        c = run_config(ctx.cfg, params[r.name], r, sweep)
        if c.method.ig:
            key = (r.teacher or 0, store_counts(ctx.cfg, c.ig.steps), c.ig.source)
            needed.setdefault(key, set()).add(c.ig.steps)
    for teacher in sorted({r.teacher or 0 for r in runs}):
        teacher_context(ctx, teacher).teacher()
    for (teacher, counts, source), steps in sorted(needed.items()):
        teacher_context(ctx, teacher).maps(counts, source, tuple(sorted(steps)))


def render(analysis: dict[str, Any], title: str) -> str:
    from kdig_study.stats import WILCOXON_MIN_N, verdict_text

    pts, pval = formats.points, formats.p_value
    lines = [title, f"  {'condition':<16}{'n':>3}{'mean':>8}{'sd':>7}{'min':>8}{'max':>8}"]
    for s in analysis["summaries"]:
        lines.append(f"  {s['condition']:<16}{s['n']:>3}{pts(s['mean']):>8}{pts(s['sd']):>7}"
                     f"{pts(s['min']):>8}{pts(s['max']):>8}")
    rows = analysis["comparisons"] + analysis["effects"]
    names = [("* " if r["primary"] else "") + r["name"] +
             (" (effect)" if r["kind"] == "effect" else "") for r in rows]
    heading = "comparison (paired) / effect"  # was cut to its first 26 characters
    w = max(len(n) for n in [heading, *names]) + 1
    # p columns 10 wide: 3 significant digits take up to 9 ("7.19e-11" ran into its Holm)
    p_cols = ("t_p", "t_p_holm", "wilcoxon_p", "wilcoxon_p_holm", "tost_p", "tost_p_holm")
    lines.append(f"  {heading:<{w}}{'n':>3}{'mean':>8}  {'95% CI':<17}"
                 + "".join(f"{h:>10}" for h in ("t p", "Holm", "Wilc. p", "Holm", "TOST p",
                                                 "Holm"))
                 + f"{'d_z':>7}{'MDE':>7}  verdict")
    for name, r in zip(names, rows, strict=True):
        ci = f"[{pts(r['ci_low'], sign=True)}, {pts(r['ci_high'], sign=True)}]"
        lines.append(f"  {name:<{w}}{r['n']:>3}{pts(r['mean'], sign=True):>8}  {ci:<17}"
                     + "".join(f"{pval(r[k]):>10}" for k in p_cols)
                     + f"{formats.number(r['d_z']):>7}{pts(r['mde']):>7}  {verdict_text(r)}")
    notes = []
    if analysis.get("primary"):
        notes.append(f"* primary comparison, declared in advance: {analysis['primary']}")
    alpha, margin = analysis["alpha"], analysis["equivalence_margin"]
    notes.append(f"Holm: {analysis['correction']}; d_z = mean / sd of the per-replicate "
                 f"differences; MDE = the smallest true difference (points) the paired t-test "
                 f"detects with 80% power at the row's Holm level (alpha {alpha:g} / the "
                 f"number of rows still in the step-down) with this n and sd; TOST: two "
                 f"one-sided t-tests against +-{pts(margin)} points; verdict: better/worse "
                 f"where the Holm t p < {alpha:g}, equivalent where the Holm TOST p < {alpha:g}, "
                 f"else inconclusive with the n each test would need (80% power, this sd; "
                 f"equivalence: if the true difference is 0)")
    ns = {r["n"] for r in analysis["comparisons"] + analysis["effects"]}
    if any(n < WILCOXON_MIN_N for n in ns):
        notes.append(f"Wilcoxon n/a where n < {WILCOXON_MIN_N}: the exact two-sided test "
                     f"cannot reach p < 0.05 there (n = 5: smallest p 0.0625)")
    return "\n".join(lines + [f"  {n}" for n in notes])


def render_families(split: dict[str, Any], group: str | None) -> str:
    """Each comparison's mean difference under each corruption family (points) with its
    verdict's mark, and a line where one family carries most of an aggregate difference."""
    pts = formats.points
    families = list(split["families"])
    mark = {"better": "+", "worse": "-", "equivalent": "=", "inconclusive": "?"}
    w = max(len(r["name"]) for r in split["comparisons"]) + 2
    cw = max(len(f) for f in families) + 2
    head = "".join(f"{f:>{cw}}" for f in families)
    lines = ["test accuracy under corruptions, by family: mean paired difference, points "
             "(+ better, - worse, = equivalent, ? inconclusive; Holm within each family)"
             + (f" ({group})" if group else ""),
             f"  {'comparison':<{w}}{'all':>10}{head}"]
    notes = []
    def cell(row: dict[str, Any]) -> str:  # "+0.54?": the difference and its verdict's mark
        return pts(row["mean"], sign=True) + mark[row["verdict"].split(" ")[0].rstrip(",")]

    for r in split["comparisons"]:
        cells = "".join(f"{cell(c):>{cw}}" for c in r["families"].values())
        total = cell(r)
        lines.append(f"  {r['name']:<{w}}{total:>10}{cells}")
        c = r["carried_by"]
        if c is not None:
            notes.append(f"  {r['name']}: {c['family']} carries {c['share']:.0%} of the "
                         f"{pts(r['mean'], sign=True)} points (there "
                         f"{pts(c['family_mean'], sign=True)}; the other families "
                         f"{pts(c['rest_mean'], sign=True)} on average)")
    return "\n".join(lines + notes)


def _csv(blocks: list[tuple[str, str, dict[str, Any]]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["n", "mean", "ci_low", "ci_high", "t_p", "t_p_holm", "wilcoxon_p",
            "wilcoxon_p_holm", "tost_p", "tost_p_holm", "eq_ci_low", "eq_ci_high", "d_z",
            "level", "mde", "verdict", "n_equivalence", "n_detect", "primary"]
    w.writerow(["group", "metric", "kind", "name", "sd", "min", "max", *cols])
    for group, metric, a in blocks:
        for s in a["summaries"]:
            w.writerow([group, metric, "condition", s["condition"], s["sd"], s["min"], s["max"],
                        s["n"], s["mean"], *[""] * (len(cols) - 2)])
        for r in a["comparisons"] + a["effects"]:
            w.writerow([group, metric, r["kind"], r["name"], "", "", "",
                        *[r[c] for c in cols]])
    return buf.getvalue()


def _finite(obj: Any) -> Any:
    """NaN -> None, so the JSON is strict (NaN is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


@dataclass(frozen=True)
class _Setup:
    """An ablation resolved from the command line: its design, parameters, seeds and runs."""

    cfg: StudyConfig
    design: dict[str, tuple[str | None, ...]]
    controls: tuple[str, ...]
    sweep: Sweep
    fraction: float | None  # the subsets' fraction of a Monte-Carlo ablation, else None
    search_name: str
    names: list[str]  # the conditions
    mode: str  # the design of the parameters: best | per-condition | fixed | file
    params: dict[str, Params]
    origin: dict[str, Any]
    replicates: int
    seeds: dict[int, int]  # replicate -> student seed
    runs: list[Run]
    teachers: int = 1  # K of --teachers K
    only: tuple[str, ...] = ()  # the conditions run (--conditions); () for all

    @property
    def levels(self) -> dict[str, list[str]]:
        return {f: [lv or "none" for lv in v] for f, v in self.design.items()}


# (design, controls, sweep)
# (design, controls, sweep, the conditions run: () for all)
_Options = tuple[dict[str, tuple[str | None, ...]], tuple[str, ...], Sweep, tuple[str, ...]]


# An ablation's plan is built, stored and analysed whole: 10,000 runs is 100 seeds of a
# 3-factor design with 3 controls and a 9-value sweep, far past any study's budget.
MAX_RUNS = 10_000


def _options(args: argparse.Namespace, cfg: StudyConfig) -> _Options:
    """The design, controls and sweep the arguments ask for, checked before any store opens."""
    design = parse_factors(args.factors, cfg)
    controls = parse_controls(args.controls, design)
    only = parse_conditions(args.conditions, design, controls)
    sweep = parse_sweeps(args.sweep, cfg)
    if args.seeds < 1 or args.monte_carlo < 0 or not 0 < args.fraction <= 1 or \
            args.heartbeat < 1 or args.workers < 1 or args.teachers < 1:
        raise KdigError("--seeds, --teachers, --workers and --heartbeat must be >= 1, "
                        "--monte-carlo >= 0, 0 < --fraction <= 1")
    if args.teachers > 1 and cfg.teacher.weights:
        raise KdigError(f"--teachers {args.teachers}: teacher.weights = "
                        f"{cfg.teacher.weights!r} gives one teacher; teachers as replicates "
                        f"are trained here at distinct seeds (leave teacher.weights empty)")
    from kdig_study.stats import conditions

    # bounded before anything is built: `--seeds 100000000` took 18.7 GB planning its runs
    n_conditions = len(conditions(design, controls, only))
    levels = len(sweep.levels())
    runs = n_conditions * (args.monte_carlo or args.seeds) * levels * args.teachers
    if runs > MAX_RUNS:
        raise KdigError(f"--seeds {args.monte_carlo or args.seeds}: {runs:,} runs planned "
                        f"({n_conditions} conditions"
                        + (f" x {levels} sweep levels" if sweep else "")
                        + (f" x {args.teachers} teachers" if args.teachers > 1 else "")
                        + f"); allowed: at most {MAX_RUNS:,} runs per ablation")
    return design, controls, sweep, only


def seeds_plan(cfg: StudyConfig, options: _Options, url: str, pilot_sd: float | None) -> str:
    """How many seeds the declared analysis needs for its primary comparison, from a pilot
    sd (given in points, or measured on the ablation in the store with the most pairs):
    at alpha and at Holm's strictest step (alpha / the family's rows)."""
    from kdig_study.stats import analyse, n_for_detection, n_for_equivalence, primary_pair

    design, controls, _, only = options
    a = cfg.analysis
    pair = primary_pair(a, design, controls, only)
    if pair is None:
        raise KdigError(f"--plan: the primary comparison {a.primary!r} is not among this "
                        f"ablation's conditions; declare one with --set analysis.primary='A - B'")
    if pilot_sd is not None:
        if not (math.isfinite(pilot_sd) and pilot_sd > 0):
            raise KdigError(f"--pilot-sd {pilot_sd}: allowed: a number of points > 0")
        sd, origin = pilot_sd / 100, "--pilot-sd"
    else:
        from kdig_study.ablation import pilot_sd as measured_sd
        from kdig_study.store import open_storage

        try:
            storage = open_storage(url, existing=True)
        except KdigError:  # no store yet: nothing measured to plan from
            storage = None
        found = measured_sd(storage, pair, a.metric) if storage is not None else None
        if found is None:
            raise KdigError(f"--plan needs a pilot sd of {a.primary}: no ablation in {url} has "
                            f"2 or more replicates of both; give --pilot-sd POINTS, or run a "
                            f"small ablation first (e.g. --seeds 5)")
        sd, name, n = found
        origin = f"study '{name}', {n} replicates"
    empty = analyse({}, design, controls, primary=pair, only=only)
    rows = len(empty["comparisons"]) + len(empty["effects"])
    margin = a.equivalence_margin / 100
    lines = [f"plan for {a.primary} on {a.metric}: equivalence margin +-"
             f"{a.equivalence_margin:g} points, pilot sd of the per-seed differences "
             f"{100 * sd:.3f} points ({origin}); 80% power"]
    for level, label in ((a.alpha, f"alpha {a.alpha:g}"),
                         (a.alpha / rows, f"alpha {a.alpha:g} / {rows} (Holm's strictest "
                                          f"step, {rows} rows in the family)")):
        eq, det = n_for_equivalence(sd, margin, level), n_for_detection(margin, sd, level)
        lines.append(f"  at {label}: {eq if eq is not None else '> 100,000'} seeds show "
                     f"equivalence if the true difference is 0; {det} seeds detect a true "
                     f"difference of +-{a.equivalence_margin:g} points")
    return "\n".join(lines)


def resolve_plan(args: argparse.Namespace, cfg: StudyConfig, options: _Options, storage: Any,
                 url: str) -> _Setup:
    """Every condition's parameters, the replicates' seeds (none a search trial used) and the
    planned runs."""
    from kdig_study.ablation import plan
    from kdig_study.stats import named_conditions

    design, controls, sweep, only = options
    search_name = args.from_study or f"{cfg.name}-{cfg.scale}"
    conds = named_conditions(design, controls, only)
    names = list(conds)
    mode, params, origin = condition_params(args, storage, url, cfg, conds)
    if args.worker_index is None:  # the parent says it; its workers resolve the same
        say_params(params, origin)
    replicates = args.monte_carlo or args.seeds
    seeds = {r: ablation_seed(cfg.student_train.seed, r) for r in range(replicates)}
    searches = [search_name] + [condition_search(search_name, cfg.scale, n) for n in names]
    used = search_seeds(storage, sorted(set(searches)))
    clash = sorted(set(seeds.values()) & set(used))
    if clash:
        raise KdigError(f"ablation seeds {clash} were used by search trials of "
                        f"{', '.join(sorted(set().union(*(used[s] for s in clash))))}: a "
                        f"replicate would be a run the search selected on its luck; change "
                        f"student_train.seed")
    runs = plan(design, list(range(replicates)), sweep, controls, args.teachers, only)
    return _Setup(cfg, design, controls, sweep,
                  args.fraction if args.monte_carlo else None, search_name, names, mode,
                  params, origin, replicates, seeds, runs, args.teachers, only)


def open_ablation_study(storage: Any, url: str, name: str, setup: _Setup,
                        ctx: Context) -> optuna.Study:
    """The ablation study, created or resumed; refused if it ran with another design,
    parameters, levels, fraction, sweep or data. Records the ablation's identity beside it."""
    import optuna

    from kdig_study.store import open_study

    study = open_study(storage, name, setup.cfg, optuna.samplers.RandomSampler(),
                       optuna.pruners.NopPruner(), ["maximize"], url,
                       **ctx.study_identity())
    old = study.user_attrs.get("ablation")
    ident = check_recorded(old, setup, name, url)
    study.set_user_attr("ablation", ident | {
        "analysis": (old or {}).get("analysis", dataclasses.asdict(setup.cfg.analysis)),
        "search_study": setup.search_name, "origin": setup.origin,
        "design_text": _DESIGN_TEXT[setup.mode],
        "seeds": {str(r): s for r, s in setup.seeds.items()} | (old or {}).get("seeds", {})})
    return study


def recorded_ablation(storage: Any, name: str) -> dict[str, Any] | None:
    """What ablation study ``name`` recorded of itself in the store, None where it is not
    there (yet)."""
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get("ablation")
    except KeyError:
        return None


def check_recorded(old: dict[str, Any] | None, setup: _Setup, name: str, url: str
                   ) -> dict[str, Any]:
    """This ablation's identity (as the study records it), refused in one line where the
    study recorded another (``old``: what it recorded; None for a new study)."""
    ident = {"design": setup.mode, "params": setup.params, "levels": setup.levels,
             "fraction": setup.fraction, **setup.sweep.identity()}
    if setup.controls:  # only where given: ablations recorded before controls still match
        ident["controls"] = list(setup.controls)
    if setup.teachers > 1:  # likewise
        ident["teachers"] = setup.teachers
    if setup.only:  # likewise
        ident["conditions"] = list(setup.only)
    declared = dataclasses.asdict(setup.cfg.analysis)
    if old is not None and old.get("analysis", declared) != declared:
        was = old["analysis"]
        diff = ", ".join(f"{k} {was.get(k)!r} -> {v!r}" for k, v in declared.items()
                         if was.get(k) != v)
        raise KdigError(f"ablation study '{name}' in {url} declared another analysis before it "
                        f"ran ({diff}); an analysis is declared before the runs: restore "
                        f"[analysis], or give this one its own --study-name")
    # the keys recorded only where given count when either side has them
    keys = [*ident, *(k for k in ("controls", "teachers", "conditions") if k not in ident)]
    if old is not None and any(old.get(k) != ident.get(k) for k in keys):
        changed = [k for k in keys if old.get(k) != ident.get(k)]
        raise KdigError(f"ablation study '{name}' in {url} ran with another {', '.join(changed)}"
                        f" ({', '.join(f'{k}={old.get(k)}' for k in changed)}); give this one "
                        f"its own --study-name, or run it as it was")
    return ident


def analysis_text(cfg: StudyConfig, has_primary: bool = True) -> str:
    """The declared analysis in words (the banner's and --reanalyse's first line)."""
    a = cfg.analysis
    primary = f"primary {a.primary} on {dict(METRICS)[a.metric]}" if has_primary else \
        "no primary comparison (its conditions are not in this ablation)"
    return (f"{primary}; every row judged at family-wise alpha {a.alpha:g} (Holm), "
            f"equivalence by TOST within +-{a.equivalence_margin:g} points")


def analysis_line(setup: _Setup) -> str:
    """The declared analysis, as the banner says it before any run."""
    from kdig_study.stats import primary_pair

    pair = primary_pair(setup.cfg.analysis, setup.design, setup.controls, setup.only)
    return "analysis (declared in [analysis], recorded on the study): " + \
        analysis_text(setup.cfg, pair is not None)


def _announce(setup: _Setup, name: str, url: str, default_design: bool) -> None:
    s = setup
    print(f"ablation '{name}': {len(s.runs)} runs ({len(s.names)} conditions x {s.replicates} "
          f"{'Monte-Carlo subsets' if s.fraction is not None else 'replicates'}"
          + (f" x {s.teachers} teachers (teacher_train.seed {s.cfg.teacher_train.seed}.."
             f"{s.cfg.teacher_train.seed + s.teachers - 1})" if s.teachers > 1 else "")
          + (f" x {len(s.sweep.levels())} levels of {' x '.join(s.sweep.keys)}" if s.sweep
             else "")
          + f"), store {url}", flush=True)
    print(analysis_line(s), flush=True)
    print(f"design: --params {s.mode}{' (the default)' if default_design else ''}: "
          f"{_DESIGN_TEXT[s.mode]}; replicate seeds "
          f"{s.seeds[0]}..{s.seeds[s.replicates - 1]} (student_train.seed "
          f"{s.cfg.student_train.seed} + {ABLATION_SEED_OFFSET} + r)", flush=True)


def _ledger(args: argparse.Namespace, setup: _Setup, study: optuna.Study,
            ctx: Context) -> Callable[[], None]:
    """Add back the runs the store lacks from the study's run ledger (first process only);
    return what rewrites the ledger after each finished run."""
    from kdig_study.ablation import planned_trials, run_of, teacher_context
    from kdig_study.engine import bf16_kernels, resolve_precision
    from kdig_study.ledger import import_ledger, ledger_path, write_ledger

    def teacher_sha256(params: dict[str, Any]) -> Any:
        return teacher_context(ctx, run_of(params, setup.sweep).teacher).teacher() \
            .meta.get("sha256")

    path = ledger_path(Path(args.out), study.study_name)
    if args.worker_index is None:
        precision = resolve_precision(setup.cfg.student_train.precision, ctx.device)
        added = import_ledger(path, study, lambda p: run_of(p, setup.sweep), teacher_sha256,
                              precision, bf16_kernels(precision, ctx.device))
        if added:
            print(f"{added} finished run(s) taken from the run ledger {path} (this store "
                  f"lacked them)", flush=True)

    def write() -> None:
        write_ledger(path, study, planned_trials(study.get_trials(deepcopy=False), setup.runs,
                                                 setup.sweep))
    return write


def _check_tuning_teacher(setup: _Setup, storage: Any, ctx: Context) -> None:
    """Refuse, in one line, a tuning search whose trials learned from a teacher with other
    weights than this machine's (its trials taken from a ledger made on another machine):
    the runs would not be at the parameters tuned for their own teacher."""
    import optuna

    from kdig_study.ablation import teacher_context

    if setup.mode != "per-condition":
        return
    sha = teacher_context(ctx, 0).teacher().meta.get("sha256")
    for n in setup.names:
        if condition_study(n) is not None:  # a search the user ran, not ablate
            continue
        name = condition_search(setup.search_name, setup.cfg.scale, n)
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        other = {t.user_attrs.get("provenance", {}).get("teacher_sha256") for t in trials} \
            - {None, sha}
        if other:
            raise KdigError(f"the search tuning {n} (study '{name}') learned from a teacher "
                            f"whose weights differ from this machine's (checksum "
                            f"{sorted(other)[0][:12]}, here {str(sha)[:12]}): put that "
                            f"teacher in the cache (KDIG_CACHE), or tune again: delete the "
                            f"study (optuna delete-study --study-name '{name}') and move its "
                            f".trials.json ledger out of --out")


def _run(args: argparse.Namespace, setup: _Setup, study: optuna.Study, storage: Any,
         ctx: Context, tracker: Tracker) -> None:
    """The planned runs: maps up front (first process), then here or in --workers processes;
    the run ledger is read first and rewritten after each finished run."""
    from kdig_study.ablation import AblationRunner, overlay_level
    from kdig_study.objectives import attach_gallery
    from kdig_study.stats import overlay_sources
    from kdig_study.store import artifact_store

    worker = args.worker_index
    write_ledger = _ledger(args, setup, study, ctx)
    if worker is None:
        _maps_up_front(ctx, setup.params, setup.runs, setup.sweep)
        _check_tuning_teacher(setup, storage, ctx)
        run = {overlay_level(r.condition) for r in setup.runs}  # --conditions may drop some
        levels_on = [s for s in overlay_sources(setup.design, setup.controls) if s in run]
        if levels_on:
            attach_gallery(study, artifact_store(), ctx.gallery(levels_on))
    if worker is None and args.workers > 1:
        spawn_workers("kdig_study.ablate", sys.argv[1:], args.workers)
    else:
        prefix = f"[worker {worker}] " if worker is not None else ""
        try:
            AblationRunner(ctx, study, setup.params, setup.design, setup.sweep,
                           setup.fraction, poll_s=max(1.0, args.heartbeat / 2),
                           storage=storage, controls=setup.controls, teachers=setup.teachers,
                           tracker=tracker, only=setup.only).run(
                setup.runs, log=lambda *a, **k: print(prefix + " ".join(map(str, a)), **k),
                on_finished=write_ledger)
        finally:
            tracker.close()
    if worker is None:
        write_ledger()  # also when every run was already finished, or taken from the ledger


def analyse_group(table_of: Callable[[str], Table], design: dict[str, tuple[str | None, ...]],
                  controls: tuple[str, ...], cfg: StudyConfig, group: str | None,
                  blocks: list[tuple[str, str, dict[str, Any]]], only: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    """Every metric's analysis of one group of runs (``table_of(metric)``: its table), the
    robust comparisons by corruption family, and the plain words made from the verdicts:
    printed, appended to ``blocks`` (the CSV's), returned (the JSON's). ``only``: the
    conditions run (--conditions), all where empty."""
    from kdig_study.ablation import analyse_metric, robust_by_family
    from kdig_study.stats import plain_words

    res: dict[str, Any] = {}
    label = group or "all"
    for metric, title in METRICS:
        table = table_of(metric)
        if not table:  # e.g. robustness switched off
            continue
        res[metric] = analyse_metric(table, design, controls, metric, cfg.analysis, only)
        blocks.append((label, metric, res[metric]))
        print(render(res[metric], f"{title}, % ({group})" if group else f"{title}, %"))
    split = None
    if "robust_test_acc" in res:
        split = robust_by_family(table_of, cfg.robustness.corruptions, design, controls,
                                 cfg.analysis, res["robust_test_acc"], only)
    if split is not None:
        blocks.extend((label, f"robust_test_{f}", a) for f, a in split["families"].items())
        res["robust_by_family"] = split
        print(render_families(split, group))
    declared = res.get(cfg.analysis.metric)
    if declared is not None:
        res["plain_words"] = plain_words(declared, split)
        print("In plain words (made from the verdicts above):"
              + "".join(f"\n  {line}" for line in res["plain_words"]))
    return res


def run_row(number: int, params: dict[str, Any], value: float | None,
            user_attrs: dict[str, Any]) -> dict[str, Any]:
    """One finished run as a flat row of the results JSON: its parameters, validation
    accuracy, metrics and robust accuracies."""
    from kdig_study.corruptions import robust_metric

    return {"number": number, **params, "val_acc": value, **user_attrs.get("metrics", {}),
            **{robust_metric(k): v for k, v in user_attrs.get("robust", {}).items()}}


def _ledger_results(path: Path, cfg: StudyConfig) -> dict[str, Any]:
    """A run ledger as the part of a results JSON that --reanalyse reads (factors,
    controls, conditions, runs), checked against this command's study config (the ledger's
    runs must have been made with it)."""
    from kdig_study.ledger import read_ledger

    data = read_ledger(path)
    header = data.get("header", {})
    ablation = header.get("ablation", {})
    if header.get("config_fingerprint") != cfg.fingerprint():
        raise KdigError(f"--reanalyse {path}: its runs were made with another study config "
                        f"than --study {cfg.name} --scale {cfg.scale} with these --set items; "
                        f"give the study, scale and --set items the ablation ran with")
    if ablation.get("sweep_key") or ablation.get("teachers", 1) > 1:
        raise KdigError(f"--reanalyse {path}: a sweep's or several teachers' ledger; run "
                        f"`ablate` with its command on a machine like the ledger's")
    recorded = ablation.get("analysis")
    if recorded is not None and recorded != dataclasses.asdict(cfg.analysis):
        print(f"note: the ablation declared {recorded} before it ran; judged here under "
              f"{dataclasses.asdict(cfg.analysis)}")
    return {"factors": ablation["levels"], "controls": ablation.get("controls", []),
            "conditions": ablation.get("conditions", []),
            "runs": [run_row(r.get("number", i), r["params"], r["value"], r["user_attrs"])
                     for i, r in enumerate(data["runs"])]}


def complete_replicates(runs: list[dict[str, Any]], names: Iterable[str]
                        ) -> tuple[list[dict[str, Any]], list[int]]:
    """The runs of the replicates that hold every condition in ``names``, and the
    replicates left out: every comparison of the family then has the same n (a stopped
    study's last, partial replicate would otherwise enter some rows and not others)."""
    have: dict[int, set[str]] = {}
    for r in runs:
        have.setdefault(int(r["replicate"]), set()).add(r["condition"])
    partial = sorted(k for k, v in have.items() if not set(names) <= v)
    return [r for r in runs if int(r["replicate"]) not in partial], partial


def reanalyse(path: Path, cfg: StudyConfig, out_dir: Path) -> None:
    """The analysis of a results JSON that ``ablate`` wrote (its ``runs``, ``factors`` and
    ``controls``) or of a run ledger (``<study>.runs.json``: what a stopped study holds),
    under this command's declared [analysis]: e.g. a study run before equivalence tests and
    verdicts existed, judged now, or a study that cannot go on (its machine is gone), judged
    on its complete replicates; the runs untouched."""
    from kdig_study.stats import design_from_levels, named_conditions, primary_pair

    try:
        done = json.loads(path.read_text())
        if isinstance(done, dict) and "header" in done:
            done = _ledger_results(path, cfg)
        levels, runs = done["factors"], done["runs"]
        controls = tuple(done.get("controls", ()))
        only = tuple(done.get("conditions", ()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise KdigError(f"--reanalyse {path}: not a results JSON or run ledger of ablate "
                        f"({type(e).__name__}: {e})") from None
    if any(k in r for r in runs for k in SWEEP_NAMES):
        raise KdigError(f"--reanalyse {path}: a sweep's results; re-run `ablate` on its store")
    if any(r.get("teacher") for r in runs):  # replicates nest under teachers: not one table
        raise KdigError(f"--reanalyse {path}: several teachers' results; re-run `ablate` on "
                        f"its store")
    design = design_from_levels(levels)
    names = named_conditions(design, controls, only)
    runs, partial = complete_replicates(runs, names)
    if not runs:
        raise KdigError(f"--reanalyse {path}: no replicate holds every condition "
                        f"({', '.join(names)}); nothing to pair")
    if partial:
        print(f"left out {len(partial)} replicate(s) that lack a condition "
              f"({', '.join(map(str, partial))}): every comparison has the same n")

    def table_of(metric: str) -> Table:
        table: Table = {}
        for r in runs:
            if r.get(metric) is not None and r["condition"] in names:
                table.setdefault(names[r["condition"]], {})[int(r["replicate"])] = \
                    float(r[metric])
        return table

    blocks: list[tuple[str, str, dict[str, Any]]] = []
    replicates = sorted({int(r["replicate"]) for r in runs})
    has_primary = primary_pair(cfg.analysis, design, controls, only) is not None
    print(f"{path}: {len(runs)} runs of {len(names)} conditions x {len(replicates)} "
          f"replicates; analysis: " + analysis_text(cfg, has_primary))
    results = {"all": analyse_group(table_of, design, controls, cfg, None, blocks, only)}
    stem = path.stem.removesuffix(".runs")  # a ledger's verdicts sit beside its results
    target = out_dir / f"{safe_name(stem)}.verdicts.json"
    write_json(target, _finite({"source": str(path), "analysis":
                                dataclasses.asdict(cfg.analysis), "replicates": replicates,
                                "left_out": partial, "results": results}))
    print(f"written: {target}")


def teacher_effects(table_of: Callable[[int], Table], setup: _Setup,
                    pooled: dict[str, Any]) -> list[dict[str, Any]]:
    """Every comparison of the declared metric pooled over the teachers with a random
    teacher effect (stats.random_teacher), from each teacher's paired differences
    (``table_of(k)``: teacher k's table); printed and returned."""
    from kdig_study.stats import named_conditions, random_teacher

    names = named_conditions(setup.design, setup.controls, setup.only)
    tables = {k: table_of(k) for k in range(setup.teachers)}
    out = []
    print(f"random teacher effect on {dict(METRICS)[setup.cfg.analysis.metric]} (pooled over "
          f"{setup.teachers} teachers; Wald interval, and the t interval on the teacher means):")
    for row in pooled.get(setup.cfg.analysis.metric, {}).get("comparisons", []):
        a, b = (names[x] for x in row["name"].split(" - "))
        diffs = {k: [t[a][r] - t[b][r] for r in sorted(set(t.get(a, {})) & set(t.get(b, {})))]
                 for k, t in tables.items()}
        fit = random_teacher(diffs, setup.cfg.analysis.alpha)
        out.append({"name": row["name"], "primary": row["primary"]} | fit)
        def pts(x: float) -> str:
            return formats.points(x, sign=True)

        if math.isfinite(fit["mean"]):
            print(f"  {('* ' if row['primary'] else '') + row['name']:<30} {pts(fit['mean']):>7}"
                  f"  [{pts(fit['ci_low'])}, {pts(fit['ci_high'])}]  p {formats.p_value(fit['p'])}"
                  f"  teacher sd {formats.points(fit['teacher_sd'])}  teacher means "
                  + ", ".join(pts(v) for v in fit["teacher_means"].values())
                  + f"  t on means [{pts(fit['means_t_ci'][0])}, {pts(fit['means_t_ci'][1])}]")
    return out


def condition_values(s: _Setup, name: str) -> dict[str, Any]:
    """Condition ``name``'s parameters as its runs train with them: its own (searched or
    given), the study file's for the rest, and the KD method its level names (a DKD
    condition is recorded as dkd, not as the study file's method)."""
    from kdig_study.stats import named_conditions

    values = effective(s.cfg, s.params[name]) | s.params[name]
    method = kd_level(named_conditions(s.design, s.controls).get(name, ()))
    return values | ({"kd_method": method} if method in KD_METHODS else {})


def results_identity(s: _Setup) -> dict[str, Any]:
    """What an ablation's results JSON records of the ablation that wrote it: all another
    ablation must share to write its results over them (more seeds of the same ablation do)."""
    return _finite({"design": s.mode,
                    "params": {n: condition_values(s, n) for n in s.params},
                    "factors": s.levels, "controls": list(s.controls), "conditions": s.names,
                    "teachers": s.teachers, "scale": s.cfg.scale,
                    "analysis": dataclasses.asdict(s.cfg.analysis), **s.sweep.identity()})


# What results written before a key was recorded held (a key absent with no default here
# is not compared: those files cannot say).
_RECORDED_BEFORE = {"teachers": 1}


def _differs(key: str, old: Any, new: Any) -> bool:
    """Whether a recorded identity value differs; a condition's parameters are compared on
    those both record (a parameter added later, e.g. kd_method, was at its default before)."""
    if key != "params" or not isinstance(old, dict) or set(old) != set(new):
        return old != new
    return any(not isinstance(old[c], dict)
               or any(old[c][p] != v for p, v in new[c].items() if p in old[c]) for c in new)


def check_results_file(path: Path, setup: _Setup) -> None:
    """Refuse, in one line and before any run, an ablation whose results would be written
    over ``path`` when ``path`` holds another ablation's (a fresh store does not know the
    name was used: ``--teachers`` or ``--conditions`` without ``--study-name`` get the plain
    ablation's name)."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise KdigError(f"{path}: not an ablation's results ({type(e).__name__}: {e}); this "
                        f"ablation would write its results there: move it away, or give this "
                        f"one its own --study-name or --out") from None
    mine = json.loads(json.dumps(results_identity(setup)))  # as the file holds it
    changed = [k for k, v in mine.items() if (k in old or k in _RECORDED_BEFORE)
               and _differs(k, old.get(k, _RECORDED_BEFORE.get(k)), v)]
    if changed:
        diff = ", ".join(k if k in ("params", "analysis") else
                         f"{k} {old.get(k, _RECORDED_BEFORE.get(k))} -> {mine[k]}"
                         for k in changed)
        raise KdigError(f"{path} holds the results of another ablation named "
                        f"'{old.get('study', path.stem)}' (differs in {diff}); give this one its "
                        f"own --study-name, or another --out")


def analyse_and_write(setup: _Setup, study: optuna.Study, out_dir: Path) -> None:
    """Statistics of the planned runs per sweep group and metric: printed, and written as
    JSON and CSV."""
    from kdig_study.ablation import planned_trials, results_table
    from kdig_study.objectives import teacher_cache_line
    from kdig_study.stats import primary_pair

    s = setup
    name = study.study_name
    trials = planned_trials(study.get_trials(deepcopy=False), s.runs, s.sweep)
    blocks: list[tuple[str, str, dict[str, Any]]] = []
    groups = [(s.sweep.text(v), v) for v in s.sweep.levels()] if s.sweep else [("all", ())]
    out: dict[str, Any] = {
        "study": name, **results_identity(s), "design_text": _DESIGN_TEXT[s.mode],
        "origin": s.origin, "replicates": s.replicates,
        "seeds": {str(r): v for r, v in s.seeds.items()},
        "primary": f"{s.cfg.analysis.primary} on {dict(METRICS)[s.cfg.analysis.metric]}"
        if primary_pair(s.cfg.analysis, s.design, s.controls, s.only) is not None else None,
        "results": {}}
    print(f"design: {_DESIGN_TEXT[s.mode]} (--params {s.mode})")
    if s.teachers > 1:
        print(f"{s.teachers} teachers: each table pools every (teacher, replicate) pair, then "
              f"each teacher's own; the random teacher effect follows each group")
    for group, value in groups:
        out["results"][group] = analyse_group(
            lambda metric, value=value: results_table(trials, metric, s.sweep, value),
            s.design, s.controls, s.cfg, group if s.sweep or s.teachers > 1 else None,
            blocks, s.only)
        for k in range(s.teachers if s.teachers > 1 else 0):
            out["results"][f"{group}, teacher {k}"] = analyse_group(
                lambda metric, value=value, k=k: results_table(trials, metric, s.sweep,
                                                                value, teacher=k),
                s.design, s.controls, s.cfg, f"{group}, teacher {k}", blocks, s.only)
        if s.teachers > 1:
            out["results"][group]["random_teacher"] = teacher_effects(
                lambda k, value=value: results_table(trials, s.cfg.analysis.metric,
                                                     s.sweep, value, teacher=k),
                s, out["results"][group])
    out["runs"] = [run_row(t.number, t.params, t.value, t.user_attrs) for t in trials]
    stem = safe_name(name)
    write_json(out_dir / f"{stem}.json", _finite(out))
    text = _csv(blocks)
    atomic_write(out_dir / f"{stem}.csv", lambda tmp: tmp.write_text(text))
    print(teacher_cache_line(trials, "the ablation's runs"))
    print(f"written: {out_dir / (stem + '.json')}, {out_dir / (stem + '.csv')}")


def main() -> int:
    args = _parser().parse_args()
    # the symmetric design unless asked: `best` tunes KD+IG alone (ablations.md, Designs)
    default_design = args.params is None
    args.params = args.params or "fixed"
    cfg = load_from_args(args)
    options = _options(args, cfg)  # bad arguments fail before the store is opened
    from kdig_study.tracking import make_tracker

    tracker = make_tracker(args.track)  # a missing package: one line, before any run
    if args.worker_index is None:  # where the results go, checked before any run
        writable_folder(Path(args.out), "--out")
    from kdig_study.ablation import ablation_study_name
    from kdig_study.store import default_url, open_storage, quiet_optuna_logs

    quiet_optuna_logs()
    url = args.storage or default_url()
    if args.reanalyse:
        reanalyse(Path(args.reanalyse), cfg, Path(args.out))
        return 0
    if args.plan:
        print(seeds_plan(cfg, options, url, args.pilot_sd))
        return 0
    storage = open_storage(url, heartbeat_interval=args.heartbeat)
    setup = resolve_plan(args, cfg, options, storage, url)
    from kdig_study.stats import primary_pair

    primary_pair(setup.cfg.analysis, setup.design, setup.controls, setup.only)  # before the study
    name = args.study_name or ablation_study_name(setup.search_name, setup.fraction,
                                                  setup.sweep.name or None)
    if args.worker_index is None:  # before the data: a study's own record first, then the
        # results file (workers write none), and no study is created where either refuses
        check_recorded(recorded_ablation(storage, name), setup, name, url)
        check_results_file(Path(args.out) / f"{safe_name(name)}.json", setup)
    from kdig_study.experiment import Context

    # the data before the study: its fingerprint is part of the study's identity
    ctx = Context.create(setup.cfg, args.data_dir, args.device, progress=not args.no_progress)
    study = open_ablation_study(storage, url, name, setup, ctx)
    _announce(setup, name, url, default_design)
    if args.worker_index is None:
        print(f"data: {ctx.data.describe()}", flush=True)
        if tracker:
            print(f"tracking every run to {tracker.where()}", flush=True)
    _run(args, setup, study, storage, ctx, tracker)
    if args.worker_index is None:
        analyse_and_write(setup, study, Path(args.out))
    return 0


if __name__ == "__main__":
    run(main)

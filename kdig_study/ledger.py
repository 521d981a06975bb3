"""An ablation's finished runs as a small JSON file beside its results (the run ledger), so
that a study of many hours outlives the machine its store is on.

``ablate`` rewrites ``<out>/<study>.runs.json`` after every finished run and, when it opens
its study, adds back the ledger's runs the store lacks (a fresh machine, a deleted store) as
COMPLETE trials with every attribute they had. The store stays the record; the ledger is its
portable copy, small enough to commit (a few KB per run), unlike the database.

A ledger is taken only by the same ablation: the same config, data, design, parameters,
levels, sweep and declared analysis (its header), and runs whose teacher had the same
weights, checked by their checksum (a teacher trained again on another machine must be the
same file, or the runs learned from another teacher). Runs made at another precision, or
under bf16 on a CPU of another bf16 kernel family, are refused before the teacher is trained
(they would fail its checksum an hour later). Anything else is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from kdig_study.errors import KdigError
from kdig_study.paths import safe_name, write_json

VERSION = 1
# What a ledger must share with the study it is added to (besides the ablation's identity).
_IDENTITY = ("config_fingerprint", "data_fingerprint")


def ledger_path(out_dir: Path, study_name: str) -> Path:
    return out_dir / f"{safe_name(study_name)}.runs.json"


def _header(study: optuna.Study) -> dict[str, Any]:
    attrs = study.user_attrs
    ablation = {k: v for k, v in attrs.get("ablation", {}).items()
                if k not in ("seeds", "origin", "design_text", "search_study")}
    return {k: attrs.get(k) for k in _IDENTITY} | {"ablation": ablation}


def _run(t: FrozenTrial) -> dict[str, Any]:
    one = t.values is not None and len(t.values) == 1  # a pruned or multi-objective trial: None
    return {"number": t.number, "params": t.params, "value": t.values[0] if one else None,
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "from_ledger"},
            "fixed_params": t.system_attrs.get("fixed_params"),
            "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
            "start": t.datetime_start.isoformat() if t.datetime_start else None,
            "complete": t.datetime_complete.isoformat() if t.datetime_complete else None}


def write_ledger(path: Path, study: optuna.Study, complete: list[FrozenTrial]) -> None:
    """The study's finished runs (``complete``: its planned COMPLETE trials), atomically,
    under a lock so that workers never interleave."""
    with FileLock(f"{path}.lock"):
        write_json(path, {"version": VERSION, "study": study.study_name,
                          "header": _header(study), "runs": [_run(t) for t in complete]})


def read_ledger(path: Path, items: str = "runs") -> dict[str, Any]:
    """A ledger's contents (version, study, header, runs; a search's: its ``trials``), or a
    one-line error."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION or not isinstance(data.get(items), list):
            raise ValueError(f"version {data.get('version')!r}, no list of {items}")
        return data
    except (OSError, ValueError, AttributeError) as e:
        what = "run ledger of ablate" if items == "runs" else "search ledger"
        raise KdigError(f"{path}: not a {what} ({type(e).__name__}: {e}); move it away to "
                        f"start without it") from None


def _precision(run: dict[str, Any]) -> str | None:
    """The precision a run trained at (recorded in its metrics), None where not recorded."""
    return run["user_attrs"].get("metrics", {}).get("precision")


def _kernels(run: dict[str, Any]) -> str | None:
    """The CPU bf16 kernel family a run trained with (recorded in its metrics since
    2026-12-07), None where not recorded or not a CPU bf16 run."""
    return run["user_attrs"].get("metrics", {}).get("kernels")


def _same_teacher(run: dict[str, Any], teacher_sha256: Any) -> bool:
    recorded = run["user_attrs"].get("provenance", {})
    if recorded.get("teacher") is None:  # a run without a teacher (the student alone)
        return True
    return recorded.get("teacher_sha256") == teacher_sha256(run["params"])


def check_machine(records: list[dict[str, Any]], precision: str | None, kernels: str | None,
                  whose: str, remedy: str) -> None:
    """Refuse, before anything costly, ledger records (runs or search trials) trained at
    another precision or, at bf16 on a CPU, with another bf16 kernel family than this
    machine's ``precision`` and ``kernels`` (engine.bf16_kernels): the teacher would come out
    as other weights here, which its checksum says only after it trained. ``whose`` starts
    the message ("<ledger>: its runs"), ``remedy`` ends it."""
    other = sorted({p for p in (_precision(r) for r in records) if p not in (None, precision)})
    if precision is not None and other:
        # "auto" resolves by the hardware (bf16 where the CPU or GPU has fast bf16): a run
        # here would not be the ledger's run, and the teacher check would come an hour later
        raise KdigError(f"{whose} trained at {'/'.join(other)} and this machine trains at "
                        f"{precision} (precision 'auto' follows the hardware: bf16 needs AMX, "
                        f"AVX512-BF16 or a GPU with native bf16); what is made here could not "
                        f"be pooled with them: {remedy}")
    if precision == "bf16":  # an fp32 ledger's records were refused just above
        families = sorted({k for k in (_kernels(r) for r in records) if k not in (None, kernels)})
        if families:
            raise KdigError(f"{whose} trained with {'/'.join(families)} bf16 kernels and this "
                            f"machine {'uses ' + kernels if kernels else 'runs bf16 on a GPU'}: "
                            f"the same recipe trains to other weights on each, so what is made "
                            f"here could not be pooled with them: {remedy}")


def import_ledger(path: Path, study: optuna.Study, run_key: Any, teacher_sha256: Any,
                  precision: str | None = None, kernels: str | None = None) -> int:
    """Add the ledger's runs that ``study`` has no COMPLETE trial of; return how many.
    ``run_key(params)``: a run's identity; ``teacher_sha256(params)``: the checksum of the
    teacher this machine has for that run (called only where a run used one, and only after
    the precision check: it may train the teacher); ``precision``: the precision runs train
    at here, and ``kernels`` the CPU bf16 kernel family they use (engine.bf16_kernels),
    both checked against the runs' own before anything costly."""
    if not path.is_file():
        return 0
    data = read_ledger(path)
    mine, theirs = _header(study), data.get("header", {})
    if theirs != mine:
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if "ablation" in keys:
            a, b = mine.get("ablation", {}), theirs.get("ablation", {})
            keys += sorted(f"ablation.{k}" for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise KdigError(f"{path}: its runs are of another ablation (differs in "
                        f"{', '.join(keys)}); give this one its own --study-name or --out, or "
                        f"run it as the ledger's was")
    done = {run_key(t.params) for t in study.get_trials(deepcopy=False,
                                                         states=(TrialState.COMPLETE,))}
    missing = list({run_key(r["params"]): r for r in data["runs"]
                    if run_key(r["params"]) not in done}.values())
    check_machine(missing, precision, kernels, f"{path}: its runs",
                  f"finish it on a machine like the ledger's, analyse what it holds with "
                  f"`ablate --reanalyse {path}`, or start with another --out")
    for run in missing:  # every run checked before any is added
        if not _same_teacher(run, teacher_sha256):
            raise KdigError(f"{path}: run {run['params'].get('condition')} r"
                            f"{run['params'].get('replicate')} learned from a teacher whose "
                            f"weights differ from this machine's (checksum); its runs cannot "
                            f"be pooled with runs made here: put the ledger's teacher in the "
                            f"cache (KDIG_CACHE), or start with another --out")
    study.add_trials([_frozen(run, path) for run in missing])
    return len(missing)


def _frozen(record: dict[str, Any], path: Path) -> FrozenTrial:
    """A ledger's record (:func:`_run`; a search's also has ``state`` and ``values``) as the
    trial it was, marked as taken from ``path``."""
    return create_trial(
        state=TrialState[record.get("state", "COMPLETE")],
        values=record["values"] if "values" in record else [record["value"]],
        params=record["params"],
        distributions={k: json_to_distribution(d) for k, d in record["distributions"].items()},
        user_attrs=record["user_attrs"] | {"from_ledger": str(path)},
        system_attrs={"fixed_params": record["fixed_params"]} if record["fixed_params"] else {},
        intermediate_values={int(k): v for k, v in record["intermediate_values"].items()})


# A search that tunes one condition for `ablate --params per-condition` lives only in the
# store; its ledger (`<out>/<search>.trials.json`) is its portable copy, so that an ablation
# whose tuning spans machines keeps the searches already run.
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_IMPORTING = "importing"  # the marker a half-imported search carries (a killed import)


def search_ledger_path(out_dir: Path, study_name: str) -> Path:
    return out_dir / f"{safe_name(study_name)}.trials.json"


def write_search_ledger(path: Path, study: optuna.Study) -> int:
    """The search's finished trials (complete and pruned) with the study's attributes,
    atomically; returns how many trials it holds."""
    trials = study.get_trials(deepcopy=False, states=_FINISHED)
    with FileLock(f"{path}.lock"):
        write_json(path, {
            "version": VERSION, "kind": "search", "study": study.study_name,
            "directions": [d.name.lower() for d in study.directions],
            "user_attrs": {k: v for k, v in study.user_attrs.items() if k != "ledger_import"},
            "trials": [{**_run(t), "values": t.values, "state": t.state.name}
                       for t in trials]})
    return len(trials)


def import_search_ledger(path: Path, storage: Any, name: str) -> int:
    """Make search ``name`` from its ledger where the store lacks it (a fresh machine, a
    deleted store); return how many trials it took. A store that has the search keeps it
    (the store is the record) unless a killed import left it half made: that one is made
    again."""
    if not path.is_file():
        return 0
    try:
        sid = storage.get_study_id_from_name(name)
        if storage.get_study_user_attrs(sid).get("ledger_import") != _IMPORTING:
            return 0
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    data = read_ledger(path, "trials")
    if data.get("kind") != "search" or data.get("study") != name:
        raise KdigError(f"{path}: holds {data.get('kind', '?')} '{data.get('study')}', not the "
                        f"search '{name}'; move it away to run the search again")
    study = optuna.create_study(storage=storage, study_name=name,
                                directions=data["directions"])
    study.set_user_attr("ledger_import", _IMPORTING)
    for k, v in data["user_attrs"].items():
        study.set_user_attr(k, v)
    study.add_trials([_frozen(t, path) for t in data["trials"]])
    study.set_user_attr("ledger_import", str(path))
    return len(data["trials"])

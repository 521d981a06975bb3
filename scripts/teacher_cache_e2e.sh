#!/usr/bin/env bash
# The teacher-output cache end to end: one search (or one ablation) run twice on a warm
# teacher and IG-map cache, first with --no-teacher-cache, then with the teacher-output cache
# starting empty (the first run of each data stream computes and writes it, the later ones
# read it). Writes each one's wall time from its first trial's start to its last trial's end
# (teacher, maps, data loading and the analysis fall outside it), and whether the two agree
# trial for trial (parameters, states, values; for an ablation also every run's accuracies).
#
#   bash scripts/teacher_cache_e2e.sh search OUT.json [ARG ...]
#   bash scripts/teacher_cache_e2e.sh ablate OUT.json [ARG ...]
#
# search: `optimize --n-trials $N_TRIALS` (default 20); ablate: `ablate --params fixed
# --seeds $SEEDS --controls $CONTROLS` (defaults 3 and shuffled,random,gradcam). STUDY
# (default kd_ig) and SCALE (default cpu) from the environment; the other arguments go to
# both runs. Its own store and cache in a temporary folder; SEED_CACHE=DIR copies a cache's
# teachers, maps and decoded data (never its teacher outputs or checkpoints) into it first,
# so no teacher is trained again.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=$1 out=$2
shift 2
case $kind in search|ablate) ;; *) echo "first argument: search or ablate, not '$kind'" >&2; exit 2;; esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KDIG_STORAGE="$work/storage" KDIG_CACHE="$work/cache"
mkdir -p "$KDIG_CACHE"
if [[ -n ${SEED_CACHE:-} ]]; then
  for entry in "$SEED_CACHE"/*; do
    case $(basename "$entry") in teacher_outputs|checkpoints) ;; *) cp -a "$entry" "$KDIG_CACHE/";; esac
  done
fi
py=.venv/bin/python
common=(--study "${STUDY:-kd_ig}" --scale "${SCALE:-cpu}" --no-progress "$@")

if [[ $kind == search ]]; then
  echo "warm-up: teacher and maps (one trial, teacher-output cache off)"
  $py -m kdig_study.optimize "${common[@]}" --study-name e2e-warm --n-trials 1 --no-teacher-cache
  for name in computing cached; do
    flag=(); [[ $name == computing ]] && flag=(--no-teacher-cache)
    echo "search ${name/cached/reading} the teacher's outputs"
    $py -m kdig_study.optimize "${common[@]}" --study-name "e2e-$name" \
      --n-trials "${N_TRIALS:-20}" "${flag[@]}"
  done
else
  # Teacher and every map store are made before an ablation's first run, so outside its span.
  for name in computing cached; do
    flag=(); [[ $name == computing ]] && flag=(--no-teacher-cache)
    echo "ablation ${name/cached/reading} the teacher's outputs"
    $py -m kdig_study.ablate "${common[@]}" --study-name "e2e-$name" --params fixed \
      --seeds "${SEEDS:-3}" --controls "${CONTROLS:-shuffled,random,gradcam}" \
      --out "$work/out-$name" "${flag[@]}"
  done
fi

$py - "$kind" "$out" "sqlite:///$KDIG_STORAGE/kdig.db" "$work" "$*" <<'EOF'
import json
import sys
from datetime import datetime

import optuna
import torch

from kdig_study.store import open_storage
from kdig_study.teacher_outputs import device_kind

kind, out, url, work, args = sys.argv[1:]
# What a run must reproduce exactly; timings and provenance may differ.
ACCURACIES = ("best_epoch", "epochs_run", "val_acc", "test_acc", "robust_val_acc",
              "robust_test_acc")


def search(name):
    storage = open_storage(url, read_only=True)
    trials = optuna.load_study(study_name=f"e2e-{name}", storage=storage).get_trials(deepcopy=False)
    rows = [(t.params, t.state.name, t.values, t.intermediate_values) for t in trials]
    return rows, [t.datetime_start for t in trials], [t.datetime_complete for t in trials], {
        "states": {s: sum(t.state.name == s for t in trials)
                   for s in sorted({t.state.name for t in trials})},
        "epochs_run": sum(len(t.intermediate_values) for t in trials),
        "teacher_steps_cached": sum(t.user_attrs.get("metrics", {}).get(
            "teacher_steps_cached", 0) for t in trials)}


def ablation(name):
    with open(f"{work}/out-{name}/e2e-{name}.runs.json") as f:
        runs = json.load(f)["runs"]
    metrics = [r["user_attrs"]["metrics"] for r in runs]
    rows = [(r["params"], r["value"], {k: m.get(k) for k in ACCURACIES})
            for r, m in zip(runs, metrics)]
    when = [datetime.fromisoformat(r["start"]) for r in runs]
    return sorted(rows, key=json.dumps), when, \
        [datetime.fromisoformat(r["complete"]) for r in runs], {
            "teacher_steps_cached": sum(m.get("teacher_steps_cached", 0) for m in metrics),
            "teacher_steps_computed": sum(m.get("teacher_steps_computed", 0) for m in metrics)}


res = {"what": f"one {kind} run twice on a warm teacher and map cache: --no-teacher-cache, "
               "then the teacher-output cache starting empty; wall_s from the first "
               "trial's start to the last trial's end",
       "kind": kind, "machine": device_kind(torch.device("cpu")), "args": args}
rows = {}
for name in ("computing", "cached"):
    rows[name], starts, ends, extra = (search if kind == "search" else ablation)(name)
    res[name] = {"trials": len(rows[name]),
                 "wall_s": round((max(ends) - min(starts)).total_seconds(), 1), **extra}
res["speedup"] = round(res["computing"]["wall_s"] / res["cached"]["wall_s"], 3)
res["identical_trials"] = rows["computing"] == rows["cached"]
with open(out, "w") as f:
    json.dump(res, f, indent=2)
print(json.dumps(res, indent=2))
EOF

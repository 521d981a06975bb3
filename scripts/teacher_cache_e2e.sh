#!/usr/bin/env bash
# The teacher-output cache end to end: one search run twice on one warm cache (teacher and
# IG maps made first, outside the timing), first with --no-teacher-cache, then with the cache
# starting empty (its first trial computes and writes the stream, the others read it). Writes
# each search's wall time from its first trial's start to its last trial's end, and whether
# the two searches agree trial for trial (parameters, states, values).
#
#   bash scripts/teacher_cache_e2e.sh OUT.json [--set SECTION.KEY=VALUE ...]
#
# N_TRIALS (default 20) and SCALE (default cpu) from the environment; the rest of the
# arguments go to both searches. Its own store and cache in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KDIG_STORAGE="$work/storage" KDIG_CACHE="$work/cache"
py=.venv/bin/python
common=(--study kd_ig --scale "${SCALE:-cpu}" --no-progress "$@")

echo "warm-up: teacher and maps (one trial, teacher-output cache off)"
$py -m kdig_study.optimize "${common[@]}" --study-name e2e-warm --n-trials 1 --no-teacher-cache
echo "search computing the teacher's outputs"
$py -m kdig_study.optimize "${common[@]}" --study-name e2e-computing \
  --n-trials "${N_TRIALS:-20}" --no-teacher-cache
echo "search reading the teacher-output cache"
$py -m kdig_study.optimize "${common[@]}" --study-name e2e-cached --n-trials "${N_TRIALS:-20}"

$py - "$out" "sqlite:///$KDIG_STORAGE/kdig.db" "$*" <<'EOF'
import json
import platform
import sys

import optuna

from kdig_study.store import open_storage

out, url, sets = sys.argv[1], sys.argv[2], sys.argv[3]
storage = open_storage(url, read_only=True)


def search(name):
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return trials, {
        "trials": len(trials), "wall_s": round(span.total_seconds(), 1),
        "states": {s: sum(t.state.name == s for t in trials)
                   for s in sorted({t.state.name for t in trials})},
        "epochs_run": sum(len(t.intermediate_values) for t in trials),
    }


a, computing = search("e2e-computing")
b, cached = search("e2e-cached")
same = [(t.params, t.state, t.values, t.intermediate_values) for t in a] == \
    [(t.params, t.state, t.values, t.intermediate_values) for t in b]
res = {"what": "one search run twice on a warm teacher and map cache: --no-teacher-cache, "
               "then the teacher-output cache starting empty",
       "machine": platform.processor() or platform.machine(), "sets": sets,
       "computing": computing, "cached": cached,
       "speedup": round(computing["wall_s"] / cached["wall_s"], 3),
       "identical_trials": same}
with open(out, "w") as f:
    json.dump(res, f, indent=2)
print(json.dumps(res, indent=2))
EOF

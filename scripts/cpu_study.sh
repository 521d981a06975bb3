#!/usr/bin/env bash
# The cpu-scale study of docs/results.md, step by step, each step's wall time logged.
#   bash scripts/cpu_study.sh [STEP ...]     (default: every step, in order)
# Steps: teacher maps sources adaptive ablation search-unpruned search pruning export report
# Every step resumes from the store and the cache; results (JSON, CSV) go to reports/results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=reports/results
mkdir -p "$OUT" logs

step() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name: $*" | tee -a logs/cpu_study.times
  "$@"
  echo "== $name: $(( $(date +%s) - t0 )) s" | tee -a logs/cpu_study.times
}

run_step() {
  case "$1" in
    teacher)  step teacher "$PY" -m kdig_study.train --study kd_ig --role teacher --scale cpu \
                --no-progress --json "$OUT/teacher-cpu.json" ;;
    maps)     step maps "$PY" -m kdig_study.attribute --study kd_ig --scale cpu \
                --source ig,shuffled,random,gradcam --no-progress ;;
    sources)  step sources "$PY" -m kdig_study.attribute --study kd_ig --scale cpu --source all \
                --no-progress ;;
    adaptive) step adaptive "$PY" -m kdig_study.attribute --study kd_ig --scale cpu \
                --set ig.target_gap=0.01 --no-progress --no-sanity ;;
    ablation) step ablation "$PY" -m kdig_study.ablate --study kd_ig --scale cpu --params fixed \
                --seeds 10 --factors kd,ig --controls shuffled,random,gradcam --out "$OUT" \
                --no-progress ;;
    search-unpruned) step search-unpruned "$PY" -m kdig_study.optimize --study kd_ig --scale cpu \
                --pruner none --study-name kd_ig-cpu-nopruning --n-trials 20 --no-progress ;;
    search)   step search "$PY" -m kdig_study.optimize --study kd_ig --scale cpu --n-trials 20 \
                --no-progress ;;
    pruning)  step pruning "$PY" -m kdig_study.pruning --study kd_ig --scale cpu \
                --unpruned kd_ig-cpu-nopruning --out "$OUT" ;;
    export)   step export "$PY" -m kdig_study.export --study kd_ig --scale cpu --int8 \
                --no-progress && cp storage/exports/kd_ig-cpu/export.json "$OUT/export-cpu.json" ;;
    report)   step report "$PY" -m kdig_study.report --study kd_ig --scale cpu ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then
  set -- teacher maps ablation sources adaptive search-unpruned search pruning export report
fi
for s in "$@"; do run_step "$s"; done

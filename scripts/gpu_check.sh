#!/usr/bin/env bash
# The device check (README, "On a GPU"): training img/s with 1, 2, 4, 8 workers on one GPU,
# IG against Captum, the 45,000-image map store and the projected paper protocol.
#   bash scripts/gpu_check.sh [OUT]     (default: $OUT, else gpu_check_out)
# Extra arguments go to python -m kdig_study.gpu_check (e.g. --tiny on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
[ $# -gt 0 ] && shift
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" -m kdig_study.gpu_check --out "$out" "$@"
